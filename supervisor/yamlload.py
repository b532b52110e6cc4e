"""YAML loading that remembers where every key and value was written.

Theory of operation: PyYAML's composer (the libyaml C parser when available)
turns the text into a node graph whose nodes carry ``start_mark``. We walk
that graph once and build a small tree of our own -- ``Scalar``, ``Seq`` and
``Map`` -- in which each value keeps its ``Location`` (1-based line and
column) and each mapping entry also keeps the location of its key. Scalars are
resolved exactly as ``yaml.safe_load`` would (YAML 1.1: ``0660`` is the octal
int 432, ``yes`` is True), but the source text and whether it was quoted are
kept too, so the config layer can say "quote it" and can turn ``PORT: 8080``
into the string "8080" rather than a re-printed number.

Nothing here raises for a broken document: syntax errors, duplicate keys,
unknown tags and recursive aliases all become ``Problem`` objects returned
next to the documents, so that one pass reports everything. Aliases are
converted once and shared (the tree is immutable), which keeps "billion
laughs" documents linear; ``to_plain`` (the one place a tree is expanded)
stops after ``PLAIN_LIMIT`` values, so an error message never pays for an
alias bomb either. Nesting deeper than ``MAX_DEPTH`` is refused from the event
stream before anything recursive runs (PyYAML's composer recurses per level).
Reader errors (control characters) are located from their offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from supervisor.errors import Location, Problem

# The C loader when PyYAML was built with libyaml; same results, much faster.
_Loader: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_MERGE_TAG = "tag:yaml.org,2002:merge"
MAX_DEPTH = 64  # nested collections; real unit files need 4
PLAIN_LIMIT = 1000  # values expanded by to_plain before it gives up
_NULL_TAG = "tag:yaml.org,2002:null"


@dataclass(frozen=True, slots=True, eq=False)
class Scalar:
    """A resolved scalar with its source text and whether it was quoted."""

    value: object
    location: Location
    text: str = ""
    quoted: bool = False


@dataclass(frozen=True, slots=True, eq=False)
class Seq:
    """A YAML sequence."""

    items: tuple[Value, ...]
    location: Location


@dataclass(frozen=True, slots=True, eq=False)
class Entry:
    """One ``key: value`` pair of a mapping; the key is always its source text."""

    key: str
    key_location: Location
    value: Value


@dataclass(frozen=True, slots=True, eq=False)
class Map:
    """A YAML mapping, in document order."""

    entries: dict[str, Entry]
    location: Location

    def get(self, key: str) -> Value | None:
        entry = self.entries.get(key)
        return None if entry is None else entry.value


Value = Scalar | Seq | Map


def child_path(parent: str, key: str | int) -> str:
    """The key path of a child: ``listen[1].tcp`` style."""
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def to_plain(value: Value) -> object:
    """The plain Python value (dict, list, scalar) of a located value.

    Raises:
        ValueError: the value expands (through aliases) to more than ``PLAIN_LIMIT`` values.
    """
    budget = [PLAIN_LIMIT]
    return _plain(value, budget)


def _plain(value: Value, budget: list[int]) -> object:
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(f"is too large: more than {PLAIN_LIMIT} values where one was expected")
    if isinstance(value, Scalar):
        return value.value
    if isinstance(value, Seq):
        return [_plain(item, budget) for item in value.items]
    return {key: _plain(entry.value, budget) for key, entry in value.entries.items()}


def kind_of(value: Value) -> str:
    """How a located value reads in an error message, without expanding it."""
    if isinstance(value, Seq):
        return "a list"
    if isinstance(value, Map):
        return "a mapping"
    from supervisor.values import describe  # values imports nothing of ours: no cycle

    return describe(value.value)


def is_empty_document(value: Value) -> bool:
    """True for a document with nothing in it (``---`` followed by nothing)."""
    return isinstance(value, Scalar) and value.value is None and value.text == "" and not value.quoted


def _location(file: str, mark: Any) -> Location:
    if mark is None:
        return Location(file)
    return Location(file, mark.line + 1, mark.column + 1)


def compose(text: str, file: str) -> tuple[list[Value], list[Problem]]:
    """Parse every YAML document of ``text``; ``file`` is the name used in locations.

    Returns the documents and the problems found. On a syntax error no
    document is returned: the single problem points at the error.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: only from a caller's str, never a file
        where = location_of_prefix(file, text[: exc.start])
        return [], [Problem(where, "", f"invalid text: character U+{ord(text[exc.start]):04X} cannot be encoded")]
    try:
        too_deep = _too_deep(text, file)
        if too_deep is not None:
            return [], [too_deep]
        nodes = list(yaml.compose_all(text, Loader=_Loader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "cannot be parsed"
        if exc.context and exc.problem:
            what = f"{exc.problem} ({exc.context})"
        return [], [Problem(_location(file, mark), "", f"invalid YAML: {what}")]
    except yaml.reader.ReaderError as exc:  # control characters
        return [], [Problem(_offset_location(text, file, exc.position), "", f"invalid YAML: {_reader_reason(exc)}")]
    except yaml.YAMLError as exc:
        return [], [Problem(Location(file, 1, 1), "", f"invalid YAML: {str(exc)[:200]}")]
    converter = _Converter(file)
    documents = [converter.convert(node, "") for node in nodes]
    return documents, converter.problems


def _too_deep(text: str, file: str) -> Problem | None:
    """The first collection nested deeper than ``MAX_DEPTH``, found from the (iterative) event stream."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                return Problem(
                    _location(file, event.start_mark), "", f"invalid YAML: nested deeper than {MAX_DEPTH} levels"
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return None


def _offset_location(text: str, file: str, position: int) -> Location:
    """The line and column of a reader error's offset (bytes of UTF-8 for libyaml, characters otherwise)."""
    if _Loader is not yaml.SafeLoader:
        prefix = text.encode("utf-8", "surrogatepass")[:position].decode("utf-8", "ignore")
    else:
        prefix = text[:position]
    return location_of_prefix(file, prefix)


def location_of_prefix(file: str, prefix: str) -> Location:
    """The location just after ``prefix`` (the text before the point to locate)."""
    line = prefix.count("\n") + 1
    column = len(prefix) - (prefix.rfind("\n") + 1) + 1
    return Location(file, line, column)


def _reader_reason(exc: yaml.reader.ReaderError) -> str:
    character = exc.character
    code = character if isinstance(character, int) else ord(character) if character else 0
    return f"character U+{code:04X} is not allowed ({exc.reason})"


class _Converter:
    """Walks one file's node graph; see the module docstring."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []
        self._constructor = yaml.constructor.SafeConstructor()
        self._done: dict[int, Value] = {}
        self._active: set[int] = set()

    def problem(self, mark: yaml.Mark | None, path: str, message: str) -> None:
        self.problems.append(Problem(_location(self.file, mark), path, message))

    def convert(self, node: yaml.Node, path: str) -> Value:
        known = self._done.get(id(node))
        if known is not None:
            return known
        location = _location(self.file, node.start_mark)
        if id(node) in self._active:
            self.problem(node.start_mark, path, "recursive alias")
            return Scalar(None, location)
        self._active.add(id(node))
        try:
            value: Value
            if isinstance(node, yaml.MappingNode):
                value = Map(self._entries(node, path), location)
            elif isinstance(node, yaml.SequenceNode):
                value = Seq(
                    tuple(self.convert(item, child_path(path, i)) for i, item in enumerate(node.value)),
                    location,
                )
            else:
                value = self._scalar(node, path, location)
        finally:
            self._active.discard(id(node))
        self._done[id(node)] = value
        return value

    def _scalar(self, node: yaml.Node, path: str, location: Location) -> Scalar:
        try:
            resolved = self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            self.problem(node.start_mark, path, f"invalid value: {problem[:200]}")
            resolved = None
        except Exception as exc:  # PyYAML's constructors are not total over hostile text
            # ValueError for "2001-02-30", "!!int 0xfff+f" or a 5,000-digit int, KeyError
            # for "!!bool maybe", AttributeError for "!!timestamp x", ...: all located.
            tag = str(node.tag).rsplit(":", 1)[-1]
            self.problem(node.start_mark, path, f"invalid value: not a valid {tag} ({str(exc)[:100]})")
            resolved = None
        style = getattr(node, "style", None)
        return Scalar(resolved, location, str(node.value), quoted=style not in (None, ""))

    def _entries(self, node: yaml.MappingNode, path: str) -> dict[str, Entry]:
        entries: dict[str, Entry] = {}
        merged: dict[str, Entry] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                self._merge(value_node, path, merged)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(key_node.start_mark, path, "mapping keys must be plain strings")
                continue
            key = str(key_node.value)
            key_path = child_path(path, key)
            first = entries.get(key)
            if first is not None:
                self.problem(
                    key_node.start_mark,
                    key_path,
                    f"duplicate key (first given at line {first.key_location.line})",
                )
                continue
            entries[key] = Entry(key, _location(self.file, key_node.start_mark), self.convert(value_node, key_path))
        # Explicit keys win over merged ones (YAML merge-key semantics).
        for key, entry in merged.items():
            entries.setdefault(key, entry)
        return entries

    def _merge(self, node: yaml.Node, path: str, into: dict[str, Entry]) -> None:
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        for source in sources:
            value = self.convert(source, path)
            if not isinstance(value, Map):
                self.problem(source.start_mark, path, "a merge key ('<<') needs a mapping or a list of mappings")
                continue
            for key, entry in value.entries.items():
                into.setdefault(key, entry)
