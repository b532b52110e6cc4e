"""Reading and validating the configuration: YAML files in, a ``Config`` out.

Theory of operation: ``load_config`` finds the main config and the unit files
(SPEC sections 1-2), reads them, and hands each text to ``yamlload.compose``,
which yields located values. A ``_Reader`` then walks every document against
the schema of SPEC section 3 and builds the frozen model objects. Every check
appends a ``Problem`` (location, key path, message) to one list and carries on
with a default, so a single pass reports every problem, never only the first.
If the list is non-empty at the end, ``ConfigError`` carries all of it and no
``Config`` escapes: a caller gets either a fully valid configuration or
every reason why not.

The schema lives in tables (``_UNIT_KEYS``, ``_LISTEN_OPTIONS``, ...) so that
unknown keys, "did you mean" hints and "only applies to ..." messages come
from the same source of truth as the parsing. Value syntax (durations, modes,
addresses) lives in ``values`` and ``addresses``, which raise ``ValueError``;
this module only adds where.

Key paths index lists from 0: ``listen[1]`` is the second listen entry.
File names in messages are relative to the config directory when under it.
This module does I/O only to read files and never reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import os
import re
import shlex
import signal
import socket
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

from supervisor import addresses, values
from supervisor.errors import ConfigError, Location, Problem
from supervisor.model import (
    DEFAULT_CONFIG_DIR,
    FDNAME_MAX,
    LISTEN_OPTION_KINDS,
    RESERVED_ENVIRONMENT,
    Config,
    InetAddress,
    Listen,
    ListenKind,
    LogFormat,
    MainConfig,
    Mode,
    Pass,
    Process,
    Rate,
    Ready,
    Restart,
    Start,
    StartLimit,
    Stderr,
    Unit,
    valid_fdname,
)
from supervisor.yamlload import (
    Map,
    Scalar,
    Seq,
    Value,
    child_path,
    compose,
    is_empty_document,
    kind_of,
    location_of_prefix,
    to_plain,
)

MAIN_CONFIG_NAME = "sockvisor.yaml"
DEFAULT_INCLUDE = ("sockets.d/*.yaml",)
CONFIG_ENV = "SOCKVISOR_CONFIG"

_UNIT_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LOG_LEVELS = ("debug", "info", "warning", "error")
_LIMIT_NAMES = ("nofile", "nproc", "as", "cpu", "core", "fsize", "memlock", "stack")
# Set by sockvisor for every child; a unit may not override them.
# Ranges the daemon can apply (checked at parse time: what check accepts, run applies).
INT_MAX = 2**31 - 1  # setsockopt() takes a C int; so do counts handed to the kernel
MAX_ID = 2**32 - 2  # uid_t/gid_t; (uid_t)-1 means "unchanged"
MAX_KEEPALIVE = 32767.0  # seconds: the kernel's MAX_TCP_KEEPIDLE and MAX_TCP_KEEPINTVL
MAX_WORKERS = 4096
MAX_RATE = 1e9  # connections per second

T = TypeVar("T")
E = TypeVar("E", bound=Enum)

_K = ListenKind
_ALL_KINDS = frozenset(ListenKind)
_TCP = frozenset({_K.TCP})
_UDP = frozenset({_K.UDP})
_INET = frozenset({_K.TCP, _K.UDP})
_STREAM = frozenset({_K.TCP, _K.UNIX, _K.UNIX_SEQPACKET})  # the kinds that listen()
_SOCKETS = _ALL_KINDS - {_K.FIFO}
_UNIX = frozenset({_K.UNIX, _K.UNIX_DGRAM, _K.UNIX_SEQPACKET})
_LOCAL = _UNIX | {_K.FIFO}

_KIND_GROUP_NAMES = {
    _ALL_KINDS: "any",
    _TCP: "tcp",
    _UDP: "udp",
    _INET: "tcp and udp",
    _STREAM: "tcp, unix and unix-seqpacket",
    _SOCKETS: "socket (not fifo)",
    _UNIX: "unix, unix-dgram and unix-seqpacket",
    _LOCAL: "unix, unix-dgram, unix-seqpacket and fifo",
}

# Per-listen options: the kinds each applies to. Their value parsers are in
# _Reader._listen_option; a test checks both tables name the same keys.
# Defaults come from the model, never restated here (tests/unit pins a minimal unit to them).
_UNIT_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(Unit) if f.default is not dataclasses.MISSING
}
_LISTEN_OPTIONS = LISTEN_OPTION_KINDS
# Options about a node in the file system: meaningless for "@abstract" names.
_FILESYSTEM_OPTIONS = ("mode", "user", "group", "directory_mode", "symlinks")
_KIND_KEYS = tuple(kind.value for kind in ListenKind)

_PROCESS_KEYS = (
    "exec", "user", "group", "supplementary_groups", "working_directory", "environment",
    "pass_environment", "umask", "nice", "limits", "stderr", "stop_signal", "stop_timeout",
)  # fmt: skip
_ACCEPT_KEYS = (
    "max_connections", "max_connections_per_source", "rate", "allow", "deny", "log_connections",
)  # fmt: skip
_POOL_KEYS = ("workers", "settle", "max_surge")
_UNIT_KEYS = (
    "name", "description", "enabled", "listen", "mode", "pass", "start", "restart", "restart_delay",
    "restart_delay_max", "restart_reset", "start_limit", "ready", "start_timeout", "watchdog",
    "fd_store_max", *_PROCESS_KEYS, *_ACCEPT_KEYS, *_POOL_KEYS,
)  # fmt: skip
_MODE_ONLY_KEYS: dict[Mode, tuple[str, ...]] = {Mode.ACCEPT: _ACCEPT_KEYS, Mode.POOL: _POOL_KEYS}


# ----------------------------------------------------------------------------
# Public API


def config_path(path: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The config file or directory to read: ``path``, else ``$SOCKVISOR_CONFIG``, else /etc/sockvisor."""
    if path:
        return path
    if environ is not None and environ.get(CONFIG_ENV):
        return environ[CONFIG_ENV]
    return DEFAULT_CONFIG_DIR


def load_config(path: str | None = None, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the whole configuration.

    Args:
        path: a main config file, or a directory holding ``sockvisor.yaml`` and
            ``sockets.d/``; None for ``$SOCKVISOR_CONFIG`` or ``/etc/sockvisor``.
        environ: the environment to take ``SOCKVISOR_CONFIG`` from (never os.environ).
    Returns:
        The configuration, every unit validated (disabled ones included).
    Raises:
        ConfigError: with every problem found, each located.
    """
    source = config_path(path, environ)
    base, main_file = _locate(source)
    problems: list[Problem] = []
    reader = _Reader(problems)
    main = MainConfig()
    if main_file is not None:
        text = _read(main_file, _display(main_file, base), problems)
        if text is not None:
            main = reader.main_from_text(text, _display(main_file, base))

    units: list[Unit] = []
    for file in _unit_files(base, main.include, exclude=main_file):
        display = _display(file, base)
        text = _read(file, display, problems)
        if text is not None:
            units.extend(reader.units_from_text(text, display, _stem(file)))
    reader.check_across_units(units)
    if problems:
        raise ConfigError(problems)
    return Config(main=main, units=tuple(_anchor_exec(u, base) for u in units), source=source)


def _anchor_exec(unit: Unit, base: str) -> Unit:
    """A relative program path with a slash (``examples/web.py``) is relative to the config directory.

    systemd requires absolute paths; this extension lets a config directory
    ship its own programs (the example config does). Bare names are searched
    on the child's PATH at spawn time.
    """
    program = unit.process.exec[0]
    if "/" not in program or os.path.isabs(program):
        return unit
    anchored = os.path.normpath(os.path.join(os.path.abspath(base), program))
    process = dataclasses.replace(unit.process, exec=(anchored, *unit.process.exec[1:]))
    return dataclasses.replace(unit, process=process)


def load_main(path: str | None = None, *, environ: Mapping[str, str] | None = None) -> MainConfig:
    """Read only the main config (for control commands: a broken unit must not hide the control socket).

    Args:
        path: as for ``load_config``.
        environ: the environment to take ``SOCKVISOR_CONFIG`` from.
    Returns:
        The main config; all defaults when a config directory has no ``sockvisor.yaml``.
    Raises:
        ConfigError: the path does not exist or the main config is invalid.
    """
    base, main_file = _locate(config_path(path, environ))
    if main_file is None:
        return MainConfig()
    problems: list[Problem] = []
    display = _display(main_file, base)
    text = _read(main_file, display, problems)
    main = MainConfig() if text is None else _Reader(problems).main_from_text(text, display)
    if problems:
        raise ConfigError(problems)
    return main


def load_units_from_text(text: str, file: str = "<string>", *, stem: str | None = None) -> tuple[Unit, ...]:
    """Parse the units of one unit file's text (``stem`` names a lone unit without ``name``).

    Raises:
        ConfigError: with every problem, located in ``file``.
    """
    problems: list[Problem] = []
    reader = _Reader(problems)
    units = reader.units_from_text(text, file, stem if stem is not None else _stem(file))
    reader.check_across_units(units)
    if problems:
        raise ConfigError(problems)
    return tuple(units)


def parse_main(text: str, file: str = MAIN_CONFIG_NAME) -> MainConfig:
    """Parse the main config's text (``include``, ``control``, ``log``).

    Raises:
        ConfigError: with every problem, located in ``file``.
    """
    problems: list[Problem] = []
    main = _Reader(problems).main_from_text(text, file)
    if problems:
        raise ConfigError(problems)
    return main


def describe_unit(unit: Unit) -> str:
    """A one-line summary for ``sockvisor check``: mode, listeners and command."""
    mode = unit.mode.value
    if unit.mode is Mode.POOL:
        mode = f"pool of {unit.workers} worker{'s' if unit.workers != 1 else ''}"
    count = len(unit.listen)
    listeners = ", ".join(listen.display for listen in unit.listen)
    line = (
        f"{unit.name}: {mode}, {count} listener{'s' if count != 1 else ''} ({listeners}), "
        f"exec {shlex.join(unit.process.exec)}"
    )
    return line if unit.enabled else f"{line} (disabled)"


# ----------------------------------------------------------------------------
# Files


def _locate(source: str) -> tuple[str, str | None]:
    """The config directory and the main config file (None: none, use defaults) of a config path."""
    if os.path.isdir(source):
        candidate = os.path.join(source, MAIN_CONFIG_NAME)
        return source, candidate if os.path.isfile(candidate) else None
    if os.path.exists(source):
        return os.path.dirname(source) or ".", source
    raise ConfigError([Problem(Location(source), "", "no such file or directory")])


def _display(file: str, base: str) -> str:
    """``file`` relative to the config directory when it is under it."""
    absolute, root = os.path.abspath(file), os.path.abspath(base)
    if absolute.startswith(root.rstrip(os.sep) + os.sep):
        return os.path.relpath(absolute, root)
    return file


def _stem(file: str) -> str:
    name = os.path.basename(file)
    stem, _ = os.path.splitext(name)
    return stem


def _read(file: str, display: str, problems: list[Problem]) -> str | None:
    try:
        with open(file, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        problems.append(Problem(Location(display), "", f"cannot read: {exc.strerror}"))
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = location_of_prefix(display, data[: exc.start].decode("utf-8", "replace"))
        problems.append(Problem(where, "", f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"))
        return None


def _unit_files(base: str, include: tuple[str, ...], exclude: str | None = None) -> list[str]:
    """Files matched by the include globs, each glob sorted, each file once, never the main config."""
    seen: set[str] = {os.path.realpath(exclude)} if exclude else set()
    files: list[str] = []
    for pattern in include:
        full = pattern if os.path.isabs(pattern) else os.path.join(glob.escape(base), pattern)
        for file in sorted(glob.glob(full, recursive=True)):
            key = os.path.realpath(file)
            if os.path.isfile(file) and key not in seen:
                seen.add(key)
                files.append(file)
    return files


# ----------------------------------------------------------------------------
# Converters: Value -> typed value, raising ValueError. Numbers keep their
# source text where a string is wanted ("PORT: 8080" is "8080").


def _clean(text: str) -> str:
    """Refuse what no file name, argument or variable can hold: NUL, and unencodable (surrogate) characters."""
    if "\x00" in text:
        raise ValueError("must not contain a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"holds a character that cannot be encoded (U+{ord(text[exc.start]):04X})") from None
    return text


def _scalar_text(value: Value, what: str) -> str:
    if isinstance(value, Scalar):
        if isinstance(value.value, str):
            return _clean(value.value)
        if isinstance(value.value, int | float) and not isinstance(value.value, bool):
            return value.text
    raise ValueError(f"expected {what}, got {kind_of(value)}")


def _string(value: Value) -> str:
    if isinstance(value, Scalar) and isinstance(value.value, str):
        return _clean(value.value)
    raise ValueError(f"expected a string, got {kind_of(value)}")


def _nonempty_string(value: Value) -> str:
    text = _string(value)
    if not text:
        raise ValueError("must not be empty")
    return text


def _principal(value: Value) -> str:
    """A user or group: a name, or a numeric id."""
    text = _scalar_text(value, "a user or group name or id")
    if not text or len(text) > 256 or any(c.isspace() or c == ":" or not c.isprintable() for c in text):
        raise ValueError(f"invalid user or group name {values.show(text)}")
    if text.lstrip("-").isdigit() and (len(text) > 12 or not 0 <= int(text) <= MAX_ID):
        raise ValueError(f"invalid id {values.show(text)} (0-{MAX_ID})")
    return text


def _absolute_path(value: Value) -> str:
    text = _string(value)
    if not text.startswith("/"):
        raise ValueError(f"expected an absolute path, got {text!r}")
    return text


def _plain(parse: Callable[[object], T]) -> Callable[[Value], T]:
    return lambda value: parse(to_plain(value))


def _mode(key: str, maximum: int = 0o7777) -> Callable[[Value], int]:
    def convert(value: Value) -> int:
        text = value.text if isinstance(value, Scalar) else None
        return values.parse_mode(to_plain(value), key=key, text=text, maximum=maximum)

    return convert


def _int(minimum: int | None = None, maximum: int | None = None) -> Callable[[Value], int]:
    return _plain(lambda v: values.parse_int(v, minimum=minimum, maximum=maximum))


def _duration(positive: bool = False, maximum: float | None = None) -> Callable[[Value], float]:
    def convert(plain: object) -> float:
        seconds = values.parse_duration(plain, positive=positive)
        if maximum is not None and seconds > maximum:
            raise ValueError(f"duration {values.show(plain)} is too long: the maximum is {maximum:g}s")
        return seconds

    return _plain(convert)


_bool = _plain(values.parse_bool)


def _enum(kind: type[E]) -> Callable[[Value], E]:
    choices = [member.value for member in kind]

    def convert(value: Value) -> E:
        plain = value.value if isinstance(value, Scalar) else None
        if isinstance(plain, str) and plain in choices:
            return kind(plain)
        listed = ", ".join(choices[:-1]) + f" or {choices[-1]}"
        message = f"expected {listed}, got {kind_of(value)}"
        raise ValueError(message + _did_you_mean(plain, choices))

    return convert


def _did_you_mean(word: object, choices: Collection[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _fd_name(value: Value) -> str:
    """A name for LISTEN_FDNAMES, by systemd's rules: printable ASCII, no ':', at most 255."""
    text = _scalar_text(value, "a name")
    if valid_fdname(text):
        return text
    if not text:
        raise ValueError("must not be empty")
    if len(text) > FDNAME_MAX:
        raise ValueError(f"is {len(text)} characters long; the limit is {FDNAME_MAX}")
    raise ValueError(f"invalid fd name {text!r}: printable ASCII without ':'")


def _interface(value: Value) -> str:
    text = _string(value)
    if not 1 <= len(text) <= 15 or "/" in text or any(c.isspace() for c in text):
        raise ValueError(f"invalid network interface name {text!r}")
    return text


def _listen_address(kind: ListenKind, value: Value) -> InetAddress | str:
    if kind.is_inet:
        if isinstance(value, Scalar) and isinstance(value.value, int) and not isinstance(value.value, bool):
            # YAML 1.1 reads "1:30" as sexagesimal 90: use what was written.
            return addresses.parse_inet(value.text)
        return addresses.parse_inet(to_plain(value))
    if kind is ListenKind.FIFO:
        return addresses.parse_fifo_path(to_plain(value))
    return addresses.parse_unix_path(to_plain(value))


@dataclass(frozen=True, slots=True)
class _Option:
    """How one per-listen option is parsed and which model field it fills."""

    convert: Callable[[Value], Any]
    field: str


_LISTEN_PARSERS: dict[str, _Option] = {
    "name": _Option(_fd_name, "name"),
    "backlog": _Option(_int(1, 2**31 - 1), "backlog"),
    "ipv6_only": _Option(_bool, "ipv6_only"),
    "freebind": _Option(_bool, "freebind"),
    "transparent": _Option(_bool, "transparent"),
    "reuse_port": _Option(_bool, "reuse_port"),
    "bind_to_device": _Option(_interface, "bind_to_device"),
    # SO_RCVBUF/SO_SNDBUF take a C int (the kernel then doubles and caps it).
    "receive_buffer": _Option(_plain(lambda v: values.parse_size(v, maximum=INT_MAX)), "receive_buffer"),
    "send_buffer": _Option(_plain(lambda v: values.parse_size(v, maximum=INT_MAX)), "send_buffer"),
    "nodelay": _Option(_bool, "nodelay"),
    "keepalive": _Option(_bool, "keepalive"),
    "keepalive_time": _Option(_duration(positive=True, maximum=MAX_KEEPALIVE), "keepalive_time"),
    "keepalive_interval": _Option(_duration(positive=True, maximum=MAX_KEEPALIVE), "keepalive_interval"),
    "keepalive_probes": _Option(_int(1, 127), "keepalive_probes"),
    "defer_accept": _Option(_duration(), "defer_accept"),
    # SO_MARK takes a C int, as systemd's Mark= does: 2^31 and above cannot be passed.
    "mark": _Option(_int(0, INT_MAX), "mark"),
    "ip_tos": _Option(_int(0, 255), "ip_tos"),
    "ip_ttl": _Option(_int(1, 255), "ip_ttl"),
    "priority": _Option(_int(0, 2**31 - 1), "priority"),
    "broadcast": _Option(_bool, "broadcast"),
    "pass_credentials": _Option(_bool, "pass_credentials"),
    "mode": _Option(_mode("mode"), "mode"),
    "user": _Option(_principal, "user"),
    "group": _Option(_principal, "group"),
    "directory_mode": _Option(_mode("directory_mode"), "directory_mode"),
    "remove_on_stop": _Option(_bool, "remove_on_stop"),
    "symlinks": _Option(lambda v: v, "symlinks"),  # a list: parsed by _Reader._symlinks
}


# ----------------------------------------------------------------------------
# The reader


class _Reader:
    """Walks located YAML values against the schema, appending to ``problems``."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        # Scalars the YAML layer could not resolve: already reported once, not again as "got null".
        self._broken: set[Location | None] = set()

    def problem(self, location: Location | None, path: str, message: str) -> None:
        if location in self._broken:
            return
        self.problems.append(Problem(location, path, message))

    def unit_key(self, doc: Map, key: str, convert: Callable[[Value], T]) -> T:
        """The converted value of the unit key ``key``, or the model's default for it."""
        default: T = _UNIT_DEFAULTS[key]
        return self.get(doc, key, "", convert, default)

    def get(self, mapping: Map, key: str, path: str, convert: Callable[[Value], T], default: T) -> T:
        """The converted value of ``key``, or ``default`` if absent or invalid (then a problem)."""
        entry = mapping.entries.get(key)
        if entry is None:
            return default
        try:
            return convert(entry.value)
        except ValueError as exc:
            self.problem(entry.value.location, child_path(path, key), str(exc))
            return default

    def check_keys(
        self, mapping: Map, path: str, known: Collection[str], misplaced: Mapping[str, str] | None = None
    ) -> None:
        """One problem per key not in ``known``, with a hint where one helps."""
        for key, entry in mapping.entries.items():
            if key in known:
                continue
            message = misplaced[key] if misplaced and key in misplaced else "unknown key" + _did_you_mean(key, known)
            self.problem(entry.key_location, child_path(path, key), message)

    def mapping(self, value: Value, path: str, what: str) -> Map | None:
        if isinstance(value, Map):
            return value
        self.problem(value.location, path, f"expected {what}, got {kind_of(value)}")
        return None

    def sequence(self, mapping: Map, key: str, path: str, what: str) -> Seq | None:
        value = mapping.get(key)
        if value is None:
            return None
        if isinstance(value, Seq):
            return value
        self.problem(value.location, child_path(path, key), f"expected a list of {what}, got {kind_of(value)}")
        return None

    def each(self, seq: Seq | None, path: str, convert: Callable[[Value], T]) -> tuple[T, ...]:
        """Every item of ``seq`` converted; invalid items are problems and are left out."""
        if seq is None:
            return ()
        result: list[T] = []
        for index, item in enumerate(seq.items):
            try:
                result.append(convert(item))
            except ValueError as exc:
                self.problem(item.location, child_path(path, index), str(exc))
        return tuple(result)

    # -- documents ------------------------------------------------------------

    def _documents(self, text: str, file: str) -> list[Value]:
        documents, problems = compose(text, file)
        self.problems.extend(problems)
        self._broken.update(p.location for p in problems if p.message.startswith("invalid value:"))
        return [doc for doc in documents if not is_empty_document(doc)]

    def main_from_text(self, text: str, file: str) -> MainConfig:
        documents = self._documents(text, file)
        if not documents:
            return MainConfig()  # an empty main config means all defaults
        for extra in documents[1:]:
            self.problem(extra.location, "", "the main config holds one mapping, not several documents")
        doc = self.mapping(documents[0], "", "a mapping")
        return MainConfig() if doc is None else self.main(doc)

    def units_from_text(self, text: str, file: str, stem: str) -> list[Unit]:
        before = len(self.problems)
        documents = self._documents(text, file)
        if not documents:
            if len(self.problems) == before:
                self.problem(Location(file, 1, 1), "", "file is empty: expected a unit mapping")
            return []
        units: list[Unit] = []
        for doc in documents:
            mapping = self.mapping(doc, "", "a unit mapping")
            if mapping is not None:
                units.append(self.unit(mapping, stem if len(documents) == 1 else None))
        # Report in reading order, whatever order the checks ran in.
        self.problems[before:] = sorted(self.problems[before:], key=_reading_order)
        return units

    # -- main config ----------------------------------------------------------

    def main(self, doc: Map) -> MainConfig:
        self.check_keys(doc, "", ("include", "control", "log"))
        include: tuple[str, ...] = DEFAULT_INCLUDE
        if "include" in doc.entries:
            include = self.each(self.sequence(doc, "include", "", "glob patterns"), "include", _nonempty_string)
        control_socket = MainConfig().control_socket
        control_mode = MainConfig().control_mode
        control = doc.get("control")
        if control is not None and (mapping := self.mapping(control, "control", "a mapping")) is not None:
            self.check_keys(mapping, "control", ("socket", "mode"))
            control_socket = self.get(mapping, "socket", "control", _plain(addresses.parse_unix_path), control_socket)
            control_mode = self.get(mapping, "mode", "control", _mode("mode"), control_mode)
        log_format: LogFormat | None = None
        log_level = MainConfig().log_level
        log = doc.get("log")
        if log is not None and (mapping := self.mapping(log, "log", "a mapping")) is not None:
            self.check_keys(mapping, "log", ("format", "level"))
            log_format = self.get(mapping, "format", "log", _enum(LogFormat), None)
            log_level = self.get(mapping, "level", "log", _log_level, log_level)
        return MainConfig(
            include=include,
            control_socket=control_socket,
            control_mode=control_mode,
            log_format=log_format,
            log_level=log_level,
        )

    # -- units ----------------------------------------------------------------

    def unit(self, doc: Map, stem: str | None) -> Unit:
        """One unit document; ``stem`` is the default name (None: the name is required)."""
        listen_hint = {key: "is a listen option; put it under a listen entry" for key in _LISTEN_OPTIONS}
        listen_hint.update({kind: "is a listen kind; write it as an entry under listen:" for kind in _KIND_KEYS})
        self.check_keys(doc, "", _UNIT_KEYS, listen_hint)

        name, location = self._unit_name(doc, stem)
        mode_entry = doc.entries.get("mode")
        mode = self.unit_key(doc, "mode", _enum(Mode))
        mode_known = mode_entry is None or (
            isinstance(mode_entry.value, Scalar) and mode_entry.value.value in {m.value for m in Mode}
        )

        listen = self._listens(doc, name, mode if mode_known else None)
        process = self._process(doc, mode if mode_known else None)

        default_pass = Pass.STDIO if mode is Mode.ACCEPT else _UNIT_DEFAULTS["pass_"]
        pass_ = self.get(doc, "pass", "", _enum(Pass), default_pass)
        if mode_known:
            self._check_mode_keys(doc, mode)
            self._check_pass(doc, mode, pass_, len(listen))

        restart_delay = self.unit_key(doc, "restart_delay", _duration(positive=True))
        restart_delay_max = self.unit_key(doc, "restart_delay_max", _duration(positive=True))
        if "restart_delay_max" in doc.entries and restart_delay_max < restart_delay:
            self.problem(
                doc.entries["restart_delay_max"].value.location,
                "restart_delay_max",
                f"must be at least restart_delay ({restart_delay:g}s)",
            )

        return Unit(
            name=name,
            listen=listen,
            process=process,
            mode=mode,
            description=self.unit_key(doc, "description", _string),
            enabled=self.unit_key(doc, "enabled", _bool),
            pass_=pass_,
            start=self.unit_key(doc, "start", _enum(Start)),
            restart=self.unit_key(doc, "restart", _enum(Restart)),
            restart_delay=restart_delay,
            restart_delay_max=restart_delay_max,
            restart_reset=self.unit_key(doc, "restart_reset", _duration()),
            start_limit=self._start_limit(doc),
            ready=self.unit_key(doc, "ready", _enum(Ready)),
            start_timeout=self.unit_key(doc, "start_timeout", _duration(positive=True)),
            watchdog=self.unit_key(doc, "watchdog", _duration(positive=True)),
            fd_store_max=self.unit_key(doc, "fd_store_max", _int(0, 2**16)),
            max_connections=self.unit_key(doc, "max_connections", _int(1, INT_MAX)),
            max_connections_per_source=self.unit_key(doc, "max_connections_per_source", _int(1, INT_MAX)),
            rate=self._rate(doc),
            allow=self.each(self.sequence(doc, "allow", "", "addresses"), "allow", _plain(addresses.parse_network)),
            deny=self.each(self.sequence(doc, "deny", "", "addresses"), "deny", _plain(addresses.parse_network)),
            log_connections=self.unit_key(doc, "log_connections", _bool),
            workers=self.unit_key(doc, "workers", _int(1, MAX_WORKERS)),
            settle=self.unit_key(doc, "settle", _duration()),
            max_surge=self.unit_key(doc, "max_surge", _int(1, MAX_WORKERS)),
            location=location,
        )

    def _unit_name(self, doc: Map, stem: str | None) -> tuple[str, Location]:
        entry = doc.entries.get("name")
        if entry is not None:
            try:
                name = _scalar_text(entry.value, "a unit name")
            except ValueError as exc:
                self.problem(entry.value.location, "name", str(exc))
                return "invalid", entry.value.location
            if not _UNIT_NAME.fullmatch(name):
                self.problem(
                    entry.value.location, "name", f"invalid unit name {name!r}: use 1-64 of A-Z a-z 0-9 _ . @ -"
                )
            return name, entry.value.location
        if stem is None:
            self.problem(doc.location, "name", "missing: a file with several units needs a name in each")
            return "unnamed", doc.location
        if not _UNIT_NAME.fullmatch(stem):
            self.problem(
                doc.location,
                "name",
                f"the file name gives the invalid unit name {stem!r}: add a name (1-64 of A-Z a-z 0-9 _ . @ -)",
            )
        return stem, doc.location

    def _check_mode_keys(self, doc: Map, mode: Mode) -> None:
        for owner, keys in _MODE_ONLY_KEYS.items():
            if owner is mode:
                continue
            for key in keys:
                entry = doc.entries.get(key)
                if entry is not None:
                    self.problem(
                        entry.key_location,
                        key,
                        f"only applies to mode: {owner.value} (this unit is mode: {mode.value})",
                    )

    def _check_pass(self, doc: Map, mode: Mode, pass_: Pass, listeners: int) -> None:
        entry = doc.entries.get("pass")
        if entry is None or pass_ is not Pass.STDIO:
            return
        if mode is Mode.POOL:
            self.problem(
                entry.value.location, "pass", "must be fds in mode: pool (each worker gets every listening fd)"
            )
        elif mode is Mode.SERVICE and listeners != 1:
            self.problem(
                entry.value.location,
                "pass",
                f"stdio needs exactly one listen entry in mode: service (this unit has {listeners})",
            )

    def _start_limit(self, doc: Map) -> StartLimit | None:
        value = doc.get("start_limit")
        if value is None or (mapping := self.mapping(value, "start_limit", "a mapping {burst, interval}")) is None:
            return None
        self.check_keys(mapping, "start_limit", ("burst", "interval"))
        ok = self._require(mapping, "start_limit", ("burst", "interval"))
        burst = self.get(mapping, "burst", "start_limit", _int(1, INT_MAX), 0)
        interval = self.get(mapping, "interval", "start_limit", _duration(positive=True), 0.0)
        return StartLimit(burst, interval) if ok and burst and interval else None

    def _rate(self, doc: Map) -> Rate | None:
        value = doc.get("rate")
        if value is None or (mapping := self.mapping(value, "rate", "a mapping {per_second, burst}")) is None:
            return None
        self.check_keys(mapping, "rate", ("per_second", "burst"))
        if not self._require(mapping, "rate", ("per_second",)):
            return None
        per_second = self.get(mapping, "per_second", "rate", _plain(_positive_number), 0.0)
        # Without a burst, allow one second's worth of connections at once.
        burst = self.get(mapping, "burst", "rate", _int(1, INT_MAX), max(1, int(per_second + 0.999999)))
        return Rate(per_second, burst) if per_second else None

    def _require(self, mapping: Map, path: str, keys: tuple[str, ...]) -> bool:
        missing = [key for key in keys if key not in mapping.entries]
        for key in missing:
            self.problem(mapping.location, child_path(path, key), "missing")
        return not missing

    # -- listen ---------------------------------------------------------------

    def _listens(self, doc: Map, unit_name: str, mode: Mode | None) -> tuple[Listen, ...]:
        entry = doc.entries.get("listen")
        if entry is None:
            self.problem(doc.location, "listen", "missing: a unit needs at least one listen entry")
            return ()
        seq = self.sequence(doc, "listen", "", "listen entries")
        if seq is None:
            return ()
        if not seq.items:
            self.problem(seq.location, "listen", "must hold at least one listen entry")
        result = []
        for index, item in enumerate(seq.items):
            listen = self._listen(item, child_path("listen", index), unit_name, mode)
            if listen is not None:
                result.append(listen)
        return tuple(result)

    def _listen(self, value: Value, path: str, unit_name: str, mode: Mode | None) -> Listen | None:
        entry = self.mapping(value, path, "a mapping like {tcp: 127.0.0.1:8080}")
        if entry is None:
            return None
        unit_keys = {key: "is a unit key, not a listen option" for key in _UNIT_KEYS if key not in _LISTEN_OPTIONS}
        self.check_keys(entry, path, (*_KIND_KEYS, *_LISTEN_OPTIONS), unit_keys)
        kinds = [key for key in entry.entries if key in _KIND_KEYS]
        if not kinds:
            self.problem(entry.location, path, "needs one of " + ", ".join(_KIND_KEYS))
            return None
        for extra in kinds[1:]:
            self.problem(
                entry.entries[extra].key_location,
                child_path(path, extra),
                f"one kind per listen entry; this one already has {kinds[0]!r}",
            )
        kind = ListenKind(kinds[0])
        kind_entry = entry.entries[kinds[0]]
        kind_path = child_path(path, kinds[0])
        address: InetAddress | str
        try:
            address = _listen_address(kind, kind_entry.value)
        except ValueError as exc:
            self.problem(kind_entry.value.location, kind_path, str(exc))
            address = ""
        if mode is Mode.ACCEPT and kind.is_datagram:
            self.problem(
                kind_entry.value.location,
                kind_path,
                f"a {kind.value} listener has no connections to accept; use mode: service",
            )

        options: dict[str, Any] = {"name": unit_name}
        for key, option_entry in entry.entries.items():
            if key not in _LISTEN_OPTIONS:
                continue
            key_path = child_path(path, key)
            kinds_allowed = _LISTEN_OPTIONS[key]
            if kind not in kinds_allowed:
                self.problem(
                    option_entry.key_location,
                    key_path,
                    f"only applies to {_KIND_GROUP_NAMES[kinds_allowed]} listeners, not {kind.value}",
                )
                continue
            if key in _FILESYSTEM_OPTIONS and isinstance(address, str) and address.startswith("@"):
                self.problem(option_entry.key_location, key_path, "has no effect on an abstract socket (@name)")
                continue
            if key == "ipv6_only" and isinstance(address, InetAddress) and address.family == socket.AF_INET:
                self.problem(option_entry.key_location, key_path, "only applies to IPv6 addresses")
                continue
            if key == "symlinks":
                seq = self.sequence(entry, key, path, "absolute paths")
                options[key] = self.each(seq, key_path, _absolute_path)
                continue
            option = _LISTEN_PARSERS[key]
            try:
                options[option.field] = option.convert(option_entry.value)
            except ValueError as exc:
                self.problem(option_entry.value.location, key_path, str(exc))
        return Listen(kind=kind, address=address, location=entry.location, **options)

    # -- process --------------------------------------------------------------

    def _process(self, doc: Map, mode: Mode | None) -> Process:
        command = self._exec(doc)
        stderr = self.get(doc, "stderr", "", _enum(Stderr), Stderr.INHERIT)
        if stderr is Stderr.CONNECTION and mode is not None and mode is not Mode.ACCEPT:
            self.problem(
                doc.entries["stderr"].value.location,
                "stderr",
                f"connection only applies to mode: accept (this unit is mode: {mode.value})",
            )
        return Process(
            exec=command,
            user=self.get(doc, "user", "", _principal, None),
            group=self.get(doc, "group", "", _principal, None),
            supplementary_groups=self.each(
                self.sequence(doc, "supplementary_groups", "", "groups"), "supplementary_groups", _principal
            ),
            working_directory=self.get(doc, "working_directory", "", _absolute_path, None),
            environment=self._environment(doc),
            pass_environment=self.each(
                self.sequence(doc, "pass_environment", "", "variable names"), "pass_environment", _env_name
            ),
            umask=self.get(doc, "umask", "", _mode("umask", 0o777), None),
            nice=self.get(doc, "nice", "", _int(-20, 19), None),
            limits=self._limits(doc),
            stderr=stderr,
            stop_signal=self.get(doc, "stop_signal", "", _plain(values.parse_signal), int(signal.SIGTERM)),
            stop_timeout=self.get(doc, "stop_timeout", "", _duration(), 10.0),
        )

    def _exec(self, doc: Map) -> tuple[str, ...]:
        entry = doc.entries.get("exec")
        if entry is None:
            self.problem(doc.location, "exec", "missing: a unit needs a command to run")
            return ()
        value = entry.value
        if isinstance(value, Scalar) and isinstance(value.value, str):
            try:
                argv = tuple(shlex.split(_clean(value.value)))
            except ValueError as exc:
                self.problem(value.location, "exec", f"cannot split the command: {exc}")
                return ()
        elif isinstance(value, Seq):
            argv = self.each(value, "exec", lambda item: _scalar_text(item, "a string"))
            if len(argv) != len(value.items):
                return ()
        else:
            self.problem(
                value.location, "exec", f"expected a list of strings or a command line, got {kind_of(value)}"
            )
            return ()
        if not argv or not argv[0]:
            self.problem(value.location, "exec", "must not be empty")
        return argv

    def _environment(self, doc: Map) -> tuple[tuple[str, str], ...]:
        value = doc.get("environment")
        if value is None or (mapping := self.mapping(value, "environment", "a mapping of NAME: value")) is None:
            return ()
        result = []
        for key, entry in mapping.entries.items():
            path = child_path("environment", key)
            if not _ENV_NAME.fullmatch(key):
                self.problem(
                    entry.key_location, path, "invalid variable name: use A-Z a-z 0-9 _ , not starting with a digit"
                )
                continue
            if key in RESERVED_ENVIRONMENT:
                self.problem(entry.key_location, path, "is set by sockvisor and cannot be overridden")
                continue
            item = entry.value
            if isinstance(item, Scalar) and isinstance(item.value, bool):
                self.problem(item.location, path, f'a boolean is ambiguous here; quote it: {key}: "{item.text}"')
                continue
            try:
                result.append((key, _scalar_text(item, "a string or a number")))
            except ValueError as exc:
                self.problem(item.location, path, str(exc))
        return tuple(result)

    def _limits(self, doc: Map) -> tuple[tuple[str, int, int], ...]:
        value = doc.get("limits")
        if value is None or (mapping := self.mapping(value, "limits", "a mapping of rlimit names")) is None:
            return ()
        self.check_keys(mapping, "limits", _LIMIT_NAMES)
        result = []
        for key, entry in mapping.entries.items():
            if key not in _LIMIT_NAMES:
                continue
            path = child_path("limits", key)
            if isinstance(entry.value, Map):
                pair = entry.value
                self.check_keys(pair, path, ("soft", "hard"))
                if not self._require(pair, path, ("soft", "hard")):
                    continue
                soft = self.get(pair, "soft", path, _plain(values.parse_rlimit_value), None)
                hard = self.get(pair, "hard", path, _plain(values.parse_rlimit_value), None)
                if soft is None or hard is None:
                    continue
                try:
                    values.check_rlimit_order(soft, hard)
                except ValueError as exc:
                    self.problem(pair.location, path, str(exc))
                    continue
                result.append((key, soft, hard))
                continue
            single = self.get(mapping, key, "limits", _plain(values.parse_rlimit_value), None)
            if single is not None:
                result.append((key, single, single))
        return tuple(result)

    # -- across units ---------------------------------------------------------

    def check_across_units(self, units: list[Unit]) -> None:
        """Unit names are unique; no two enabled listeners share an address."""
        names: dict[str, Unit] = {}
        for unit in units:
            first = names.get(unit.name)
            if first is None:
                names[unit.name] = unit
                continue
            self.problem(unit.location, "name", f"duplicate unit name {unit.name!r}; first defined at {first.location}")
        bound: dict[tuple[object, ...], tuple[Unit, Listen]] = {}
        for unit in units:
            if not unit.enabled:
                continue
            for index, listen in enumerate(unit.listen):
                key = _bind_key(listen)
                if key is None:
                    continue
                other = bound.get(key)
                if other is None:
                    bound[key] = (unit, listen)
                    continue
                if other[1].reuse_port and listen.reuse_port:
                    continue
                self.problem(
                    listen.location,
                    child_path(child_path("listen", index), listen.kind.value),
                    f"{listen.address} is already used by unit {other[0].name!r} at {other[1].location}",
                )


def _bind_key(listen: Listen) -> tuple[object, ...] | None:
    """What two listeners must not share: (kind, host, port) or the path of a node."""
    if isinstance(listen.address, InetAddress):
        return (listen.kind, listen.address.host, listen.address.port)
    if not listen.address:
        return None
    return ("path", listen.address)


def _reading_order(problem: Problem) -> tuple[int, int]:
    location = problem.location
    return (0, 0) if location is None else (location.line, location.column)


def _positive_number(value: object) -> float:
    return values.parse_number(value, positive=True, maximum=MAX_RATE)


def _log_level(value: Value) -> str:
    plain = value.value if isinstance(value, Scalar) else None
    if isinstance(plain, str) and plain in _LOG_LEVELS:
        return plain
    hint = _did_you_mean(plain, _LOG_LEVELS)
    raise ValueError(f"expected debug, info, warning or error, got {kind_of(value)}" + hint)


def _env_name(value: Value) -> str:
    name = _string(value)
    if not _ENV_NAME.fullmatch(name):
        raise ValueError(f"invalid variable name {name!r}")
    return name
