"""``sockvisor import``: the pure translation of xinetd and systemd configurations.

Theory of operation: an importer (``xinetd.import_xinetd``,
``systemd.import_systemd``) reads the source files, parses them with that
program's own syntax rules and translates each service into a unit mapping in
the schema of SPEC section 3, the same plain data a unit file holds. Nothing is
bound, spawned or written; the only effects are reading the source files (and,
for xinetd, resolving host names through a callable that tests replace).

Whatever is not carried over is said twice, as SPEC section 9 asks: once as a
``Dropped`` warning (for stderr, ``FILE:LINE: KEY: not carried over: why``) and
once as a comment in the unit it belongs to. Notes about a semantic difference
that *was* carried over ("sockvisor queues where xinetd refuses") are comments
only. ``render_yaml`` turns one unit into a YAML document that starts with where
it came from; the document loads back to exactly ``ImportedUnit.data``.

Errors: ``ImportSyntaxError`` when an input cannot be parsed (the CLI exits 2),
``ImportReadError`` when a file cannot be read (exit 1). Nothing else escapes,
whatever the input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from supervisor.errors import SockvisorError

__all__ = [
    "Dropped",
    "ImportReadError",
    "ImportResult",
    "ImportSyntaxError",
    "ImportedUnit",
    "order_unit",
    "render_yaml",
]

_SHOWN = 200  # characters of a source value quoted in a warning or comment


def one_line(text: str, limit: int = _SHOWN) -> str:
    """``text`` on one printable line of bounded length (control characters escaped)."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def decimal(text: str, low: int, high: int) -> int | None:
    """``text`` as a number when it is ASCII digits only and within ``low``..``high``, else None.

    Not ``str.isdigit()`` and ``int()``: "²" is a digit to Python but not a number, and a
    number of thousands of digits is a ValueError from ``int()``; neither is one to xinetd or systemd.
    """
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        return None
    number = int(text)
    return number if low <= number <= high else None


@dataclass(frozen=True, slots=True)
class Dropped:
    """One source setting that was not carried over: where it was written, what it was, and why."""

    file: str
    line: int
    key: str
    value: str
    why: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {one_line(self.key)}: not carried over: {one_line(self.why)}"

    @property
    def comment(self) -> str:
        """The comment for the unit: ``not carried over: KEY = VALUE: why``."""
        return f"not carried over: {one_line(self.key)} = {one_line(self.value)}: {one_line(self.why)}"


@dataclass(slots=True)
class ImportedUnit:
    """One translated unit: its name, where it was defined, its mapping, and the comments it carries."""

    name: str
    source: str
    line: int
    data: dict[str, Any]
    comments: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ImportResult:
    """Every unit translated from the inputs, and every setting that was not carried over.

    ``settings`` counts the source settings read (assignment lines, each once however many
    units it applies to); ``carried`` is how many of them were translated without a warning
    (a setting that a later one overrides counts as honoured). The rest are named in
    ``dropped``, or belong to a service that was not imported at all.
    """

    units: list[ImportedUnit] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    settings: int = 0
    carried: int = 0


class ImportSyntaxError(SockvisorError):
    """An input file cannot be parsed; ``str()`` is ``FILE:LINE: message`` (the CLI exits 2)."""

    def __init__(self, file: str, line: int, message: str) -> None:
        self.file = file
        self.line = line
        self.message = one_line(message)
        super().__init__(f"{file}:{line}: {self.message}")


class ImportReadError(SockvisorError):
    """An input file (or one it names) cannot be read or found; ``str()`` is ``FILE: message`` (exit 1)."""

    def __init__(self, file: str, message: str) -> None:
        self.file = file
        self.message = one_line(message)
        super().__init__(f"{file}: {self.message}")


class Collector:
    """What an importer accumulates: units, and warnings recorded once each but commented in every unit."""

    def __init__(self) -> None:
        self.result = ImportResult()
        self._seen: set[Dropped] = set()
        self._read: set[tuple[str, int]] = set()  # (file, line) of every setting read
        self._discarded: set[tuple[str, int]] = set()  # settings of services not imported at all

    def drop(self, unit: ImportedUnit | None, dropped: Dropped) -> None:
        """Record ``dropped``: a comment in ``unit`` (when there is one), a warning once."""
        if unit is not None:
            comment = dropped.comment
            if comment not in unit.comments:
                unit.comments.append(comment)
        if dropped not in self._seen:
            self._seen.add(dropped)
            self.result.dropped.append(dropped)

    def read(self, file: str, line: int) -> None:
        """Count the setting at ``file:line`` as read."""
        self._read.add((file, line))

    def discard(self, file: str, line: int) -> None:
        """The setting at ``file:line`` belongs to a service that is not imported: it is not carried over."""
        self._discarded.add((file, line))

    def finish(self) -> ImportResult:
        """The result, with ``settings`` and ``carried`` counted."""
        warned = {(d.file, d.line) for d in self.result.dropped}
        self.result.settings = len(self._read)
        self.result.carried = len(self._read - warned - self._discarded)
        return self.result


# The order keys are written in: identity, listeners, how it runs, the process,
# per-connection policy, then anything else in the order it was added.
KEY_ORDER = (
    "name", "description", "enabled", "listen", "mode", "pass", "builtin", "backend", "exec",
    "user", "group", "supplementary_groups", "working_directory", "environment_files", "environment",
    "pass_environment", "umask", "nice", "limits", "stderr", "start", "ready", "restart", "restart_delay",
    "start_timeout", "watchdog", "stop_signal", "stop_timeout", "fd_store_max",
    "max_connections", "max_connections_per_source", "rate", "allow", "deny", "access_times",
    "banner", "banner_success", "banner_fail", "log_connections",
)  # fmt: skip
LISTEN_KEY_ORDER = (
    "tcp", "udp", "unix", "unix-dgram", "unix-seqpacket", "fifo", "netlink", "special", "mqueue", "vsock",
    "name", "protocol", "backlog", "ipv6_only", "bind_to_device", "mode", "user", "group", "directory_mode",
)  # fmt: skip


def _ordered(mapping: dict[str, Any], order: tuple[str, ...]) -> dict[str, Any]:
    rank = {key: index for index, key in enumerate(order)}
    keys = sorted(mapping, key=lambda k: (rank.get(k, len(order)), 0))
    return {key: mapping[key] for key in keys}


def order_unit(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its keys (and each listen entry's keys) in the natural order; the rest keep theirs."""
    out = _ordered(data, KEY_ORDER)
    listen = out.get("listen")
    if isinstance(listen, list):
        out["listen"] = [_ordered(e, LISTEN_KEY_ORDER) if isinstance(e, dict) else e for e in listen]
    return out


# libyaml's emitter when PyYAML has it (as supervisor.yamlload reads with libyaml's parser):
# the same documents, several times faster. The representer is Python either way.
_SafeDumper: type[yaml.SafeDumper] | type[yaml.CSafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _Dumper(_SafeDumper):  # type: ignore[valid-type,misc]  # a base chosen at import time
    """A safe dumper that writes strings YAML would read as something else in double quotes ("0660", "yes")."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    # A string the plain style would turn into an int, bool or null ("0660",
    # "on", "~") is double-quoted, the way SPEC writes file modes.
    resolved = dumper.resolve(yaml.ScalarNode, text, (True, False))  # type: ignore[no-untyped-call]  # untyped in the stubs
    style = '"' if resolved != "tag:yaml.org,2002:str" else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _represent_str)


def render_yaml(unit: ImportedUnit) -> str:
    """One unit as a YAML document: ``# imported from FILE:LINE``, its comments, then the mapping.

    ``yaml.safe_load`` of the result gives back ``unit.data``.
    """
    head = [f"# imported from {one_line(unit.source, 4096)}:{unit.line}"]
    head.extend(f"# {one_line(comment, 4096)}" for comment in unit.comments)
    body = yaml.dump(
        unit.data, Dumper=_Dumper, sort_keys=False, default_flow_style=None, allow_unicode=True, width=100
    )
    return "\n".join(head) + "\n" + body
