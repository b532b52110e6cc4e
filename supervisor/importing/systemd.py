"""Translate systemd ``.socket`` units (and the services they activate) into sockvisor units.

Theory of operation, in three steps:

1. *Parse* (``parse_unit_text``) with systemd.syntax(7): ``[Section]``
   headers, ``Key=Value`` assignments, ``#`` and ``;`` comment lines, a
   trailing backslash joining a line to the next (comment lines inside such a
   continuation are skipped, as systemd does). The result is the list of
   assignments in order, each with its file and line. A line that is none of
   these is an ``ImportSyntaxError``: systemd only warns, but an import that
   silently skips a line would carry over less than it says.

2. *Load* (``_load``): the unit file, then its drop-ins ``NAME.d/*.conf``
   (and ``TEMPLATE@.TYPE.d`` for an instance) from the unit's own directory and
   ``unit_dirs``. A drop-in name found in several directories is taken from the
   first (``/etc`` masks ``/usr/lib``); all are applied in file-name order.
   Specifiers (``%n``, ``%i``, ``%t``, ...) are expanded per unit, with the
   values the system manager uses.

3. *Translate*: settings are folded in order (``_Settings``): list settings
   append and an empty assignment resets them; other settings take the last
   value. The socket's directives build the listen entries and the per-listen
   options (each option goes to the entries of the kinds it applies to); the
   service's build the process. Each directive is in exactly one table; one
   that is in none, or whose value cannot be carried over, is a ``Dropped``
   warning and a comment, one per directive (sandboxing and resource control
   included: sockvisor does neither).
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from supervisor.importing import (
    Collector,
    Dropped,
    ImportedUnit,
    ImportReadError,
    ImportResult,
    ImportSyntaxError,
    decimal,
    order_unit,
)
from supervisor.model import LISTEN_OPTION_KINDS

DEFAULT_UNIT_DIRS = ["/etc/systemd/system", "/run/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system"]
_SECTION = re.compile(r"\[([^\[\]]+)\]")
_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_INPUT = 4 << 20  # bytes of one unit file; systemd's own limit is far lower


# ----------------------------------------------------------------------------
# Step 1: parsing


@dataclass(frozen=True, slots=True)
class Assignment:
    """One ``Key=Value`` line of a unit file (or drop-in), after continuations are joined."""

    section: str
    key: str
    value: str
    file: str
    line: int


def _read(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_MAX_INPUT + 1)
    except OSError as exc:
        raise ImportReadError(path, exc.strerror or str(exc)) from None
    if len(raw) > _MAX_INPUT:
        raise ImportSyntaxError(path, 1, f"larger than {_MAX_INPUT} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ImportSyntaxError(path, raw[: exc.start].count(b"\n") + 1, "not valid UTF-8 text") from None
    if "\x00" in text:
        raise ImportSyntaxError(path, text[: text.index("\x00")].count("\n") + 1, "a NUL character")
    return text


def parse_unit_text(text: str, file: str) -> list[Assignment]:
    """The assignments of one unit file, in order, by systemd.syntax(7).

    Raises:
        ImportSyntaxError: a line that is not a section header, an assignment or a comment.
    """
    out: list[Assignment] = []
    section = ""
    lines = text.split("\n")
    index = 0
    while index < len(lines):
        number = index + 1
        line = lines[index].strip()
        index += 1
        if not line or line[0] in "#;":
            continue
        # A trailing backslash continues the line; comment lines in between are skipped.
        while line.endswith("\\") and index < len(lines):
            following = lines[index].strip()
            index += 1
            if following[:1] in ("#", ";"):
                continue
            line = line[:-1] + " " + following
        if line.endswith("\\"):
            line = line[:-1]
        if line.startswith("["):
            match = _SECTION.fullmatch(line)
            if match is None:
                raise ImportSyntaxError(file, number, f"invalid section header {line!r}")
            section = match.group(1)
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep:
            raise ImportSyntaxError(file, number, f"expected Key=Value, got {line!r}")
        if not _KEY.fullmatch(key):
            raise ImportSyntaxError(file, number, f"invalid key {key!r}")
        if not section:
            raise ImportSyntaxError(file, number, f"{key}= is outside of any [Section]")
        out.append(Assignment(section, key, value.strip(), file, number))
    return out


# ----------------------------------------------------------------------------
# Step 2: loading a unit with its drop-ins, and specifiers


@dataclass(frozen=True, slots=True)
class UnitName:
    """A unit's name split the way specifiers need it: ``prefix@instance.suffix``."""

    full: str

    @property
    def stem(self) -> str:  # %N
        return self.full.rpartition(".")[0] if "." in self.full else self.full

    @property
    def suffix(self) -> str:
        return self.full.rpartition(".")[2] if "." in self.full else ""

    @property
    def prefix(self) -> str:  # %p
        return self.stem.partition("@")[0]

    @property
    def instance(self) -> str:  # %i
        return self.stem.partition("@")[2]

    @property
    def template(self) -> str | None:
        """``prefix@.suffix`` for an instance, else None."""
        return f"{self.prefix}@.{self.suffix}" if "@" in self.stem and self.instance else None


def unescape(text: str) -> str:
    """systemd-escape's inverse: ``-`` is ``/`` and ``\\xNN`` a byte (as %I, %J, %f do)."""
    out = bytearray()
    i = 0
    while i < len(text):
        if text.startswith("\\x", i) and re.fullmatch(r"[0-9a-fA-F]{2}", text[i + 2 : i + 4]):
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
            continue
        out.extend(b"/" if text[i] == "-" else text[i].encode("utf-8"))
        i += 1
    return out.decode("utf-8", errors="replace")


# What the system manager expands these to (systemd.unit(5), "Specifiers").
_FIXED_SPECIFIERS = {
    "t": "/run", "T": "/tmp", "V": "/var/tmp", "S": "/var/lib", "C": "/var/cache", "L": "/var/log",
    "E": "/etc", "h": "/root", "u": "root", "U": "0", "g": "root", "G": "0", "s": "/bin/sh", "%": "%",
}  # fmt: skip


_SPECIFIER = re.compile(r"%(.)", re.DOTALL)


def expand_specifiers(text: str, name: UnitName) -> tuple[str, list[str]]:
    """``text`` with ``%n %N %p %P %i %I %j %J %f %t %T %V %h %u %%`` ... expanded for unit ``name``.

    Returns:
        The expanded text, and the specifiers that could not be expanded at import time
        (host-specific ones such as ``%H`` or ``%m``); those are left as written.
    """
    if "%" not in text:
        return text, []
    prefix_last = name.prefix.rpartition("-")[2]
    values = {
        **_FIXED_SPECIFIERS,
        "n": name.full, "N": name.stem, "p": name.prefix, "P": unescape(name.prefix), "i": name.instance,
        "I": unescape(name.instance), "j": prefix_last, "J": unescape(prefix_last),
        "f": "/" + unescape(name.instance or name.prefix).lstrip("/"),
    }  # fmt: skip
    unknown: list[str] = []

    def expand(match: re.Match[str]) -> str:
        letter = match.group(1)
        if letter in values:
            return values[letter]
        unknown.append(match.group(0))
        return match.group(0)

    # Left to right, two characters at a time: "%%i" is "%" then "i"; a "%" at the end stays.
    return _SPECIFIER.sub(expand, text), unknown


@dataclass(slots=True)
class _Loaded:
    """A unit file and its drop-ins, parsed, with specifiers expanded."""

    name: UnitName
    path: str
    assignments: list[Assignment]
    unexpanded: list[tuple[Assignment, str]] = field(default_factory=list)
    instance_specifiers: list[Assignment] = field(default_factory=list)  # used %i %I %n %N %f


def _dropin_files(name: UnitName, dirs: list[str]) -> list[str]:
    """The drop-in ``*.conf`` files of ``name``: one per file name (first directory wins), in name order."""
    chosen: dict[str, str] = {}
    dropin_dirs = [name.template, name.full] if name.template else [name.full]
    for unit in dropin_dirs:
        assert unit is not None
        for directory in dirs:
            path = os.path.join(directory, unit + ".d")
            try:
                entries = os.listdir(path)
            except OSError:
                continue
            for entry in entries:
                full = os.path.join(path, entry)
                if entry.endswith(".conf") and entry not in chosen and os.path.isfile(full):
                    chosen[entry] = full
    return [chosen[key] for key in sorted(chosen)]


def _load(path: str, name: UnitName, dirs: list[str]) -> _Loaded:
    loaded = _Loaded(name, path, [])
    for file in [path, *_dropin_files(name, dirs)]:
        for a in parse_unit_text(_read(file), file):
            value, unknown = expand_specifiers(a.value, name)
            expanded = Assignment(a.section, a.key, value, a.file, a.line)
            loaded.assignments.append(expanded)
            loaded.unexpanded.extend((expanded, spec) for spec in unknown)
            if re.search(r"%[iInNf]", a.value.replace("%%", "")):
                loaded.instance_specifiers.append(expanded)
    return loaded


def _find_unit(unit: str, dirs: list[str]) -> str | None:
    """The first ``DIR/unit`` that exists (a link to /dev/null, a masked unit, included)."""
    for directory in dirs:
        path = os.path.join(directory, unit)
        if os.path.isfile(path) or _masked(path):
            return path
    return None


def _masked(path: str) -> bool:
    return os.path.islink(path) and os.path.realpath(path) == os.devnull


def _find_alias(unit: str, dirs: list[str]) -> str | None:
    """The unit file that names ``unit`` in its ``[Install] Alias=``: what ``systemctl enable`` links it to.

    syslog.socket activates syslog.service, which exists only as that link
    (rsyslog.service has ``Alias=syslog.service``). Files that cannot be read or
    parsed are not candidates: they are not the input, and the search goes on.
    """
    suffix = "." + UnitName(unit).suffix
    for directory in dirs:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            path = os.path.join(directory, name)
            if not name.endswith(suffix) or name == unit or not os.path.isfile(path):
                continue
            try:
                text = _read(path)
                if unit not in text:
                    continue
                assignments = parse_unit_text(text, path)
            except (ImportReadError, ImportSyntaxError):
                continue
            aliases = [w for a in assignments if a.section == "Install" and a.key == "Alias" for w in a.value.split()]
            if unit in aliases:
                return path
    return None


def _service_file(ctx: _Context, socket_path: str, service: str, dirs: list[str]) -> tuple[str, str]:
    """The file of the service a socket activates, and the name it is loaded under.

    Raises:
        ImportReadError: the service is not in ``dirs`` (by name or ``Alias=``), or it is masked.
    """
    path = _find_unit(service, dirs)
    if path is None:
        path = _find_alias(service, dirs)
        if path is None:
            raise ImportReadError(socket_path, f"its service {service} is not in {', '.join(dirs)}")
        ctx.note(f"{service} is {path}, which names it in Alias= (the link systemctl enable makes)")
        return path, os.path.basename(path)
    if _masked(path):
        raise ImportReadError(socket_path, f"its service {service} is masked ({path} is a link to /dev/null)")
    target = os.path.basename(os.path.realpath(path))
    if os.path.islink(path) and target.endswith("." + UnitName(service).suffix) and "@" not in target:
        # An alias link (/etc/systemd/system/syslog.service -> rsyslog.service): systemd
        # loads the unit under the name of the file the link points to.
        return path, target
    return path, service


# ----------------------------------------------------------------------------
# Step 3: values and settings


@dataclass(slots=True)
class _Setting:
    """A directive's folded value: the last one, or for a list setting every one since the last reset."""

    values: list[str] = field(default_factory=list)
    origins: list[Assignment] = field(default_factory=list)  # one per value
    reset: Assignment | None = None  # the empty assignment that last cleared the list
    every: list[Assignment] = field(default_factory=list)  # each line that wrote it, resets and all

    @property
    def last(self) -> Assignment:
        """Where the setting was last written (the reset, for a list that was emptied)."""
        if self.origins:
            return self.origins[-1]
        assert self.reset is not None
        return self.reset

    @property
    def value(self) -> str:
        return self.values[-1] if self.values else ""


def _fold(assignments: list[Assignment], section: str, lists: frozenset[str]) -> dict[str, _Setting]:
    """Fold one section's assignments: lists append (empty resets), the rest keep the last value."""
    out: dict[str, _Setting] = {}
    for a in assignments:
        if a.section != section:
            continue
        key = _LISTEN_RESET_GROUP if a.key in _LISTEN_KEYS else a.key
        if key in lists or key == _LISTEN_RESET_GROUP:
            current = out.setdefault(key, _Setting())
            current.every.append(a)
            if a.value == "":
                current.values.clear()
                current.origins.clear()
                current.reset = a
                continue
            current.values.append(a.value)
            current.origins.append(a)
        else:
            every = out[key].every if key in out else []
            out[key] = _Setting([a.value], [a], every=[*every, a])
    return out


_LISTEN_RESET_GROUP = "Listen*"  # every Listen*= is one list: an empty one resets them all
_LISTEN_KEYS = frozenset({
    "ListenStream", "ListenDatagram", "ListenSequentialPacket", "ListenFIFO", "ListenSpecial", "ListenNetlink",
    "ListenMessageQueue", "ListenUSBFunction",
})  # fmt: skip
_TRUE = ("1", "yes", "y", "true", "t", "on")
_FALSE = ("0", "no", "n", "false", "f", "off")
_TIME_UNITS = {
    "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0, "h": 3600.0, "hr": 3600.0, "hour": 3600.0,
    "hours": 3600.0, "d": 86400.0, "day": 86400.0, "days": 86400.0, "w": 604800.0, "week": 604800.0,
    "weeks": 604800.0, "M": 2629800.0, "month": 2629800.0, "months": 2629800.0, "y": 31557600.0,
    "year": 31557600.0, "years": 31557600.0,
}  # fmt: skip
_TIME_PART = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([A-Za-z]*)", re.ASCII)
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGTPE]?)(?:i?B)?", re.ASCII)
_SIZE_FACTOR = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}


class BadValue(ValueError):
    """A directive's value cannot be carried over; the message says why."""


def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise BadValue("expected a boolean (yes or no)")


def parse_timespan(text: str, default_unit: str = "s") -> float:
    """A systemd time span (``5min 20s``, ``250ms``, ``2``) in seconds; ``infinity`` is refused."""
    stripped = text.strip()
    if stripped.lower() == "infinity":
        raise BadValue("infinity has no sockvisor equivalent")
    total = 0.0
    position = 0
    while position < len(stripped):
        match = _TIME_PART.match(stripped, position)
        if match is None or match.end() == position:
            raise BadValue(f"invalid time span {stripped!r}")
        unit = match.group(2) or default_unit
        if unit not in _TIME_UNITS:
            raise BadValue(f"invalid time unit {unit!r}")
        total += float(match.group(1)) * _TIME_UNITS[unit]
        position = match.end()
        while position < len(stripped) and stripped[position].isspace():
            position += 1
    if not stripped:
        raise BadValue("empty time span")
    if total > 365 * 86400:
        raise BadValue("longer than sockvisor's maximum of 365 days")
    return total


def format_duration(seconds: float) -> str:
    """Seconds as a sockvisor duration string: ``10s``, ``250ms``, ``1500us``."""
    micro = round(seconds * 1e6)
    if micro % 1_000_000 == 0:
        return f"{micro // 1_000_000}s"
    if micro % 1000 == 0:
        return f"{micro // 1000}ms"
    return f"{micro}us"


def parse_size(text: str) -> int:
    """A systemd size (``64K``, ``4M``; base 1024) in bytes."""
    match = _SIZE.fullmatch(text.strip())
    if match is None or len(match.group(1)) > 30:
        raise BadValue(f"invalid size {text.strip()!r}")
    size = int(float(match.group(1)) * _SIZE_FACTOR[match.group(2)])
    if size > 2**63 - 1:
        raise BadValue("too large")
    return size


_HEX = re.compile(r"-?0[xX][0-9a-fA-F]{1,16}")
_OCTAL = re.compile(r"-?0[0-7]{1,22}")
_DECIMAL = re.compile(r"-?(?:0|[1-9][0-9]{0,18})")


def parse_int(text: str, low: int, high: int) -> int:
    """A number as systemd's strtol(base 0) reads it: ``0x1f`` hex, ``017`` octal, else decimal."""
    stripped = text.strip()
    number: int | None = None
    if _HEX.fullmatch(stripped):
        number = int(stripped, 16)
    elif _OCTAL.fullmatch(stripped):
        number = int(stripped, 8)
    elif _DECIMAL.fullmatch(stripped):
        number = int(stripped, 10)
    if number is None or not low <= number <= high:
        raise BadValue(f"expected a number {low}-{high}")
    return number


def parse_mode(text: str, high: int = 0o7777) -> str:
    stripped = text.strip()
    if not re.fullmatch(r"[0-7]{1,4}", stripped) or int(stripped, 8) > high:
        raise BadValue("expected an octal mode such as 0660")
    return f"{int(stripped, 8):04o}"


# -- command lines --------------------------------------------------------------

_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\",
            '"': '"', "'": "'", "s": " ", " ": " "}  # fmt: skip


def split_quoted(text: str, *, relaxed: bool = False) -> list[str]:
    """Words by systemd's rules: blanks separate, "double" and 'single' quotes group, C escapes apply.

    ``relaxed``: as systemd splits a variable's value for a lone ``$NAME`` (EXTRACT_RELAX |
    EXTRACT_UNQUOTE): a backslash takes the next character as it is (no C escapes), and an
    unterminated quote or a trailing backslash is kept instead of refused.

    Raises:
        BadValue: (not relaxed) an unterminated quote, a trailing backslash, a bad escape.
    """
    words: list[str] = []
    i = 0
    n = len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            return words
        word: list[str] = []
        quote = ""
        while i < n:
            c = text[i]
            if quote and c == quote:
                quote = ""
                i += 1
            elif not quote and c in "\"'":
                quote = c
                i += 1
            elif not quote and c.isspace():
                break
            elif c == "\\" and relaxed:
                word.append(text[i + 1] if i + 1 < n else c)
                i += 2
            elif c == "\\":
                if i + 1 >= n:
                    raise BadValue("a trailing backslash")
                i, decoded = _escape(text, i + 1)
                word.append(decoded)
            else:
                word.append(c)
                i += 1
        if quote and not relaxed:
            raise BadValue("an unterminated quote")
        words.append("".join(word))


def _escape(text: str, i: int) -> tuple[int, str]:
    """The escape starting at ``text[i]`` (just after the backslash): (next index, its character)."""
    c = text[i]
    if c in _ESCAPES:
        return i + 1, _ESCAPES[c]
    for letter, width in (("x", 2), ("u", 4), ("U", 8)):
        digits = text[i + 1 : i + 1 + width]
        if c == letter and len(digits) == width and re.fullmatch(r"[0-9a-fA-F]+", digits):
            code = int(digits, 16)
            if code == 0 or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                raise BadValue("an escape for NUL or an invalid character")
            return i + 1 + width, chr(code)
    if re.fullmatch(r"[0-7]{3}", text[i : i + 3]):
        code = int(text[i : i + 3], 8)
        if code == 0:
            raise BadValue("an escape for NUL")
        return i + 3, chr(code)
    raise BadValue(f"invalid escape \\{c}")


@dataclass(slots=True)
class Command:
    """An ``ExecStart=`` line: its prefixes and its argv."""

    prefixes: str
    path: str
    argv: list[str]


def parse_command(text: str) -> Command:
    """An ``ExecStart=`` value: prefixes ``@ - : + ! !!`` then a quoted command line."""
    prefixes = ""
    stripped = text.lstrip()
    while stripped[:1] in ("@", "-", ":", "+", "!", "|"):
        prefixes += stripped[0]
        stripped = stripped[1:]
    words = split_quoted(stripped)
    if not words:
        raise BadValue("an empty command")
    if "@" in prefixes:
        if len(words) < 2:
            raise BadValue("the @ prefix needs a path and an argv[0]")
        return Command(prefixes, words[0], words[1:])
    return Command(prefixes, words[0], words)


# ----------------------------------------------------------------------------
# Tables: every [Socket] and [Service] directive sockvisor knows of, and why the rest are dropped.

_TCP = frozenset({"tcp"})
_UDP = frozenset({"udp"})
_INET = frozenset({"tcp", "udp"})
_UNIX = frozenset({"unix", "unix-dgram", "unix-seqpacket"})
_STREAM = frozenset({"tcp", "unix", "unix-seqpacket", "vsock"})
_SOCKETS = frozenset({"tcp", "udp", "unix", "unix-dgram", "unix-seqpacket", "vsock", "netlink"})
_NODES = frozenset({"unix", "unix-dgram", "unix-seqpacket", "fifo", "special", "mqueue"})  # a path on disk
_ALL = _SOCKETS | _NODES

Parse = Callable[[str], Any]


def _choice(table: dict[str, Any]) -> Parse:
    def parse(text: str) -> Any:
        word = text.strip()
        if word not in table:
            raise BadValue("expected " + ", ".join(table))
        return table[word]

    return parse


def _bind_ipv6_only(text: str) -> bool | None:
    # systemd takes a boolean too: yes is ipv6-only, no is both (gpsd.socket says "yes").
    word = text.strip()
    if word.lower() in _TRUE + _FALSE:
        return parse_bool(word)
    table: dict[str, bool | None] = {"ipv6-only": True, "both": False, "default": None}
    if word not in table:
        raise BadValue("expected ipv6-only, both, default or a boolean")
    return table[word]


def _ip_tos(text: str) -> int:
    names = {"low-delay": 0x10, "throughput": 0x08, "reliability": 0x04, "low-cost": 0x02}
    return names[text.strip()] if text.strip() in names else parse_int(text, 0, 255)


def _interface(text: str) -> str:
    word = text.strip()
    if not 1 <= len(word) <= 15 or "/" in word or any(c.isspace() for c in word):
        raise BadValue("invalid network interface name")
    return word


def _principal(text: str) -> str:
    word = text.strip()
    if not word or len(word) > 256 or any(c.isspace() or c == ":" or not c.isprintable() for c in word):
        raise BadValue("invalid user or group name")
    return word


def _fd_name(text: str) -> str | None:
    word = text.strip()
    if not word:
        return None  # an empty assignment resets to the default (the socket unit's name)
    if not 1 <= len(word) <= 255 or ":" in word or not all(32 < ord(c) < 127 for c in word):
        raise BadValue("invalid fd name: printable ASCII without ':', at most 255")
    return word


def _duration(maximum: float | None = None, positive: bool = False) -> Parse:
    def parse(text: str) -> str:
        seconds = parse_timespan(text)
        if maximum is not None and seconds > maximum:
            raise BadValue(f"longer than the maximum of {maximum:g}s")
        if positive and seconds < 1e-6:
            raise BadValue("must be greater than 0")
        return format_duration(seconds)

    return parse


def _int(low: int, high: int) -> Parse:
    return lambda text: parse_int(text, low, high)


def _size(maximum: int) -> Parse:
    def parse(text: str) -> int:
        size = parse_size(text)
        if size > maximum:
            raise BadValue(f"larger than {maximum}")
        return size

    return parse


def _word(text: str) -> str:
    word = text.strip()
    if not word or any(c.isspace() for c in word):
        raise BadValue("expected one word")
    return word


_INT_MAX = 2**31 - 1
_TIMESTAMPING = {"off": "off", "us": "us", "usec": "us", "µs": "us", "ns": "ns", "nsec": "ns"}
# [Socket] directive -> (listen key, value parser, the listen kinds it applies to)
_SOCKET_OPTIONS: dict[str, tuple[str, Parse, frozenset[str]]] = {
    "Backlog": ("backlog", _int(1, _INT_MAX), _STREAM),
    "BindIPv6Only": ("ipv6_only", _bind_ipv6_only, _INET),
    "BindToDevice": ("bind_to_device", _interface, _INET),
    "SocketUser": ("user", _principal, _NODES),
    "SocketGroup": ("group", _principal, _NODES),
    "SocketMode": ("mode", parse_mode, _NODES),
    "DirectoryMode": ("directory_mode", parse_mode, _NODES),
    "KeepAlive": ("keepalive", parse_bool, _TCP),
    "KeepAliveTimeSec": ("keepalive_time", _duration(32767.0, positive=True), _TCP),
    "KeepAliveIntervalSec": ("keepalive_interval", _duration(32767.0, positive=True), _TCP),
    "KeepAliveProbes": ("keepalive_probes", _int(1, 127), _TCP),
    "NoDelay": ("nodelay", parse_bool, _TCP),
    "Priority": ("priority", _int(0, _INT_MAX), _SOCKETS),
    "DeferAcceptSec": ("defer_accept", _duration(), _TCP),
    "ReceiveBuffer": ("receive_buffer", _size(_INT_MAX), _SOCKETS),
    "SendBuffer": ("send_buffer", _size(_INT_MAX), _SOCKETS),
    "IPTOS": ("ip_tos", _ip_tos, _INET),
    "IPTTL": ("ip_ttl", _int(1, 255), _INET),
    "Mark": ("mark", _int(0, _INT_MAX), _SOCKETS),
    "ReusePort": ("reuse_port", parse_bool, _INET),
    "FreeBind": ("freebind", parse_bool, _INET),
    "Transparent": ("transparent", parse_bool, _INET),
    "Broadcast": ("broadcast", parse_bool, _UDP),
    "PassCredentials": ("pass_credentials", parse_bool, _UNIX),
    "PassSecurity": ("pass_security", parse_bool, _UNIX),
    "PassPacketInfo": ("pass_packet_info", parse_bool, _INET | _UNIX),
    "Timestamping": ("timestamping", _choice(_TIMESTAMPING), _SOCKETS),
    "TCPCongestion": ("tcp_congestion", _word, _TCP),
    "PipeSize": ("pipe_size", _size(_INT_MAX), frozenset({"fifo"})),
    "MessageQueueMaxMessages": ("mqueue_max_messages", _int(1, _INT_MAX), frozenset({"mqueue"})),
    "MessageQueueMessageSize": ("mqueue_message_size", _size(_INT_MAX), frozenset({"mqueue"})),
    "SocketProtocol": ("protocol", _choice({"sctp": "sctp", "udplite": "udplite", "mptcp": "mptcp"}), _INET),
    "FileDescriptorName": ("name", _fd_name, _ALL),
    "RemoveOnStop": ("remove_on_stop", parse_bool, _NODES),
    "Writable": ("writable", parse_bool, frozenset({"special", "fifo"})),
}
# The kinds each option applies to are the model's, so the importer never writes an
# option where `sockvisor check` would refuse it.
_SOCKET_OPTIONS = {
    directive: (key, parse, frozenset(kind.value for kind in LISTEN_OPTION_KINDS.get(key, ())) or kinds)
    for directive, (key, parse, kinds) in _SOCKET_OPTIONS.items()
}
_SOCKET_STRUCTURAL = frozenset({
    _LISTEN_RESET_GROUP, "Accept", "Service", "Symlinks", "MaxConnections", "MaxConnectionsPerSource",
    "TriggerLimitIntervalSec", "TriggerLimitBurst", "PollLimitIntervalSec", "PollLimitBurst",
})  # fmt: skip
_SOCKET_WHY = {
    "ExecStartPre": "sockvisor runs no commands around binding",
    "ExecStartPost": "sockvisor runs no commands around binding",
    "ExecStopPre": "sockvisor runs no commands around binding",
    "ExecStopPost": "sockvisor runs no commands around binding",
    "SmackLabel": "sockvisor sets no SMACK labels",
    "SmackLabelIPIn": "sockvisor sets no SMACK labels",
    "SmackLabelIPOut": "sockvisor sets no SMACK labels",
    "SELinuxContextFromNet": "sockvisor sets no SELinux context",
    "FlushPending": "sockvisor keeps queued data when the service exits",
    "DeferTrigger": "sockvisor starts on the first readiness",
}
_SOCKET_LISTS = frozenset({"Symlinks"})

_LIMITS = {
    "LimitNOFILE": "nofile", "LimitNPROC": "nproc", "LimitAS": "as", "LimitCPU": "cpu", "LimitCORE": "core",
    "LimitFSIZE": "fsize", "LimitMEMLOCK": "memlock", "LimitSTACK": "stack",
}  # fmt: skip
_SERVICE_LISTS = frozenset({"ExecStart", "Environment", "EnvironmentFile", "PassEnvironment", "SupplementaryGroups"})
_SANDBOXING = re.compile(
    r"(Protect\w+|Private\w+|NoNewPrivileges|Capability\w*|AmbientCapabilities|(ReadOnly|ReadWrite|Inaccessible|Exec"
    r"|NoExec)Paths|(Read|Write|Inaccessible)(Only|Write)?Directories|TemporaryFileSystem|Bind(ReadOnly)?Paths"
    r"|SystemCall\w+|Restrict\w+|LockPersonality|MemoryDenyWriteExecute|DynamicUser|Root\w+|MountFlags"
    r"|IPAddress(Allow|Deny)|Device(Policy|Allow)|KeyringMode|SecureBits|SELinuxContext|AppArmorProfile"
    r"|SmackProcessLabel|MountAPIVFS|RemoveIPC|PrivateTmp|UMaskSandbox|IPIngressFilterPath|IPEgressFilterPath"
    r"|NetworkNamespacePath|IPCNamespacePath|ProcSubset|SocketBind(Allow|Deny)|RestrictFileSystems)"
)
_RESOURCE = re.compile(r"(CPU\w*|StartupCPU\w*|AllowedCPUs|AllowedMemoryNodes|Memory\w*|IO\w*|StartupIO\w*"
                       r"|BlockIO\w*|Tasks\w*|Delegate\w*|Slice|ManagedOOM\w*|OOMPolicy|OOMScoreAdjust"
                       r"|CPUAccounting|IPAccounting|DisableControllers)")
_SANDBOX_WHY = "sandboxing is not carried over: sockvisor does not sandbox its children"
_RESOURCE_WHY = ("resource control is not carried over: sockvisor sets no resource limits "
                 "(its cgroups have no controllers)")


@dataclass(slots=True)
class _Context:
    """One unit being built: where warnings go and what is known so far."""

    unit: ImportedUnit
    collector: Collector
    accept: bool = False
    listen: list[dict[str, Any]] = field(default_factory=list)

    def drop(self, a: Assignment, why: str, value: str | None = None, key: str | None = None) -> None:
        text = a.value if value is None else value
        self.collector.drop(self.unit, Dropped(a.file, a.line, key or a.key, text, why))

    def note(self, text: str) -> None:
        if text not in self.unit.comments:
            self.unit.comments.append(text)


# -- listen entries -------------------------------------------------------------


def _listen_entry(directive: str, value: str) -> dict[str, Any]:
    """One ``Listen*=`` value as a listen entry; raises BadValue when it has no sockvisor kind."""
    text = value.strip()
    if directive == "ListenFIFO":
        return {"fifo": _absolute(text)}
    if directive == "ListenSpecial":
        return {"special": _absolute(text)}
    if directive == "ListenMessageQueue":
        if not re.fullmatch(r"/[^/\s]+", text):
            raise BadValue("expected /NAME")
        return {"mqueue": text}
    if directive == "ListenNetlink":
        words = text.split()
        if not 1 <= len(words) <= 2 or (len(words) == 2 and decimal(words[1], 0, 2**32 - 1) is None):
            raise BadValue("expected 'FAMILY [GROUP]'")
        return {"netlink": " ".join(words)}
    if directive == "ListenUSBFunction":
        raise BadValue("sockvisor has no USB FunctionFS listeners")
    unix, inet = {
        "ListenStream": ("unix", "tcp"),
        "ListenDatagram": ("unix-dgram", "udp"),
        "ListenSequentialPacket": ("unix-seqpacket", None),
    }[directive]
    if text.startswith(("/", "@")):
        if len(text) < 2 or len(text.encode()) > 107:
            raise BadValue("invalid unix socket path")
        return {unix: text}
    if text.startswith("vsock:"):
        if directive != "ListenStream":
            raise BadValue("sockvisor has vsock stream listeners only")
        cid, sep, port = text[6:].rpartition(":")
        if not sep or decimal(port, 0, 2**32 - 1) is None:
            raise BadValue("expected vsock:CID:PORT")
        return {"vsock": f"{cid}:{port}"}
    if inet is None:
        raise BadValue("sequential-packet listeners must be unix sockets")
    return {inet: _inet(text)}


def _absolute(text: str) -> str:
    if not text.startswith("/"):
        raise BadValue("expected an absolute path")
    return text


def _inet(text: str) -> str:
    """``PORT``, ``ADDR:PORT`` or ``[ADDR]:PORT`` in the form sockvisor writes."""
    if text.isascii() and text.isdigit():
        if decimal(text, 1, 65535) is None:
            raise BadValue("port out of range (1-65535)")
        return text
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise BadValue("expected [ADDRESS]:PORT")
        address, _, scope = host.partition("%")
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise BadValue(f"{host!r} is not an IPv6 address") from None
        shown = f"[{ipaddress.IPv6Address(address).compressed}{'%' + scope if scope else ''}]"
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise BadValue("expected PORT, ADDRESS:PORT or a path")
        try:
            shown = str(ipaddress.IPv4Address(host))
        except ValueError:
            raise BadValue(f"{host!r} is not an IPv4 address (systemd does not resolve names)") from None
    number = decimal(port, 1, 65535)
    if number is None:
        raise BadValue("port out of range (1-65535)")
    return f"{shown}:{number}"


def _kind(entry: dict[str, Any]) -> str:
    return next(iter(entry))


def _is_file_node(entry: dict[str, Any]) -> bool:
    kind = _kind(entry)
    return kind in _NODES and not str(entry[kind]).startswith("@")


def _applies(option: str, kinds: frozenset[str], entry: dict[str, Any]) -> bool:
    kind = _kind(entry)
    if kind not in kinds:
        return False
    if option in ("user", "group", "mode", "directory_mode", "remove_on_stop", "symlinks"):
        return _is_file_node(entry)
    if option == "ipv6_only":
        address = str(entry[kind])
        return address.isdigit() or address.startswith("[")
    return True


def _socket(ctx: _Context, settings: dict[str, _Setting]) -> str | None:
    """Translate [Socket]; returns the Service= name when one is given."""
    listens = settings.get(_LISTEN_RESET_GROUP)
    if listens is not None:
        for value, origin in zip(listens.values, listens.origins, strict=True):
            try:
                entry = _listen_entry(origin.key, value)
            except BadValue as exc:
                ctx.drop(origin, str(exc))
                continue
            if ctx.accept and _kind(entry) not in ("tcp", "unix", "unix-seqpacket", "vsock"):
                ctx.drop(origin, "Accept=yes takes stream and sequential-packet listeners only")
                continue
            ctx.listen.append(entry)
    for key, setting in settings.items():
        if key in _SOCKET_STRUCTURAL:
            continue
        option = _SOCKET_OPTIONS.get(key)
        a = setting.last
        if option is None:
            # A directive with no equivalent is warned about on every line that sets it.
            for each in setting.every:
                ctx.drop(each, _SOCKET_WHY.get(key, "no sockvisor equivalent"))
            continue
        listen_key, parse, kinds = option
        try:
            value = parse(setting.value)
        except BadValue as exc:
            ctx.drop(a, str(exc))
            continue
        targets = [e for e in ctx.listen if _applies(listen_key, kinds, e)]
        if not targets:
            ctx.drop(a, f"applies to no listener here ({', '.join(sorted(kinds))})")
            continue
        if value is None:
            continue
        for entry in targets:
            entry[listen_key] = value
    if "Symlinks" in settings and settings["Symlinks"].values:
        links = [w for v in settings["Symlinks"].values for w in v.split()]
        targets = [e for e in ctx.listen if _applies("symlinks", _NODES, e)]
        if len(targets) == 1 and links:
            targets[0]["symlinks"] = links
        else:
            ctx.drop(settings["Symlinks"].last, "needs exactly one unix socket or fifo listener",
                     " ".join(links))  # fmt: skip
    _connection_limits(ctx, settings)
    service = settings.get("Service")
    return service.value if service is not None and service.value else None


def _connection_limits(ctx: _Context, settings: dict[str, _Setting]) -> None:
    for key, target in (("MaxConnections", "max_connections"),
                        ("MaxConnectionsPerSource", "max_connections_per_source")):  # fmt: skip
        if key not in settings:
            continue
        a = settings[key].last
        if not ctx.accept:
            ctx.drop(a, "only applies with Accept=yes")
            continue
        try:
            ctx.unit.data[target] = parse_int(a.value, 1, _INT_MAX)
        except BadValue as exc:
            ctx.drop(a, str(exc))
    # TriggerLimit*/PollLimit*: over the limit systemd fails the socket (trigger) or stops
    # polling for a while (poll); sockvisor pauses accepting. The stricter one is carried over.
    rates: list[tuple[float, int, str, Assignment]] = []
    for name, default_interval, default_burst in (("TriggerLimit", 2.0, 20), ("PollLimit", 2.0, 0)):
        interval_setting = settings.get(name + "IntervalSec")
        burst_setting = settings.get(name + "Burst")
        if interval_setting is None and burst_setting is None:
            continue
        given = burst_setting if burst_setting is not None else interval_setting
        assert given is not None
        origin = given.last
        if not ctx.accept:
            ctx.drop(origin, "only applies with Accept=yes (sockvisor limits the rate of accepted connections)")
            continue
        try:
            interval = parse_timespan(interval_setting.value) if interval_setting else default_interval
            burst = parse_int(burst_setting.value, 1, 10**9) if burst_setting else default_burst
        except BadValue as exc:
            ctx.drop(origin, str(exc))
            continue
        if burst < 1 or interval <= 0:
            ctx.drop(origin, "a limit of zero turns the limit off")
            continue
        rates.append((burst / interval, burst, name, origin))
    if rates:
        rates.sort(key=lambda r: r[0])
        per_second, burst, name, _ = rates[0]
        ctx.unit.data["rate"] = {"per_second": round(per_second, 6), "burst": burst}
        ctx.note(f"{name}*: over the rate sockvisor pauses accepting"
                 + (", where systemd puts the socket into a failed state" if name == "TriggerLimit" else ""))
        for _, _, other, origin in rates[1:]:
            ctx.drop(origin, f"the stricter {name}* is carried over as rate", key=other + "*")


# -- the service ------------------------------------------------------------------


def _service(ctx: _Context, settings: dict[str, _Setting]) -> None:
    data = ctx.unit.data
    if "ExecStart" in settings and settings["ExecStart"].values:
        env = None if "EnvironmentFile" in settings and settings["EnvironmentFile"].values else (
            _environment(settings["Environment"])[0] if "Environment" in settings else {})
        _exec_start(ctx, settings["ExecStart"], env)
    stdin = settings["StandardInput"].value if "StandardInput" in settings else "null"
    stdio = stdin == "socket"
    for key, setting in settings.items():
        a = setting.last
        handler = _SERVICE_HANDLERS.get(key)
        try:
            if handler is not None:
                handler(ctx, setting)
            elif key in ("ExecStart", "StandardInput", "StandardOutput", "StandardError"):
                continue
            else:
                # Not carried over at all: every line that sets it gets its warning.
                why = (_SANDBOX_WHY if _SANDBOXING.fullmatch(key) else _RESOURCE_WHY if _RESOURCE.fullmatch(key)
                       else _SERVICE_WHY.get(key, "no sockvisor equivalent"))  # fmt: skip
                for each in setting.every:
                    ctx.drop(each, why)
        except BadValue as exc:
            ctx.drop(a, str(exc))
    if stdio:
        data["pass"] = "stdio"
        if not ctx.accept and len(ctx.listen) != 1:
            ctx.note("StandardInput=socket: pass: stdio takes exactly one listen entry")
    elif ctx.accept:
        data["pass"] = "fds"
    if stdin not in ("socket", "null") and "StandardInput" in settings:
        ctx.drop(settings["StandardInput"].last, "sockvisor's stdin is the connection (pass: stdio) or nothing")
    _std_streams(ctx, settings, stdio)
    if "exec" not in data:
        ctx.note("the service has no ExecStart=: add exec")


def _std_streams(ctx: _Context, settings: dict[str, _Setting], stdio: bool) -> None:
    # systemd: StandardOutput defaults to inherit (the socket) when StandardInput=socket,
    # else to journal; StandardError defaults to inherit, i.e. whatever stdout is.
    out_setting = settings.get("StandardOutput")
    stdout = out_setting.value if out_setting is not None else ("inherit" if stdio else "journal")
    if stdout == "inherit":
        stdout = "socket" if stdio else "journal"
    if out_setting is not None and stdout not in ("journal", "syslog", "kmsg", "journal+console", "socket"):
        ctx.drop(out_setting.last, "stdout is the connection (pass: stdio) or the daemon's stderr")
    elif out_setting is not None and stdout == "socket" and not stdio:
        ctx.drop(out_setting.last, "only the connection of pass: stdio can be a child's stdout")
    err_setting = settings.get("StandardError")
    stderr = err_setting.value if err_setting is not None else "inherit"
    if stderr == "inherit":
        stderr = stdout
    if stderr == "null":
        ctx.unit.data["stderr"] = "null"
    elif stderr == "socket":
        if ctx.accept:
            ctx.unit.data["stderr"] = "connection"
        elif err_setting is not None:
            ctx.drop(err_setting.last, "stderr: connection needs Accept=yes")
    elif stderr not in ("journal", "syslog", "kmsg", "journal+console", "kmsg+console") and err_setting is not None:
        ctx.drop(err_setting.last, "stderr is the daemon's stderr, the connection or null")


def _exec_start(ctx: _Context, setting: _Setting, env: dict[str, str] | None) -> None:
    """``env``: the unit's Environment= variables, or None when an EnvironmentFile= may change them."""
    origins = setting.origins
    for a in origins[:-1]:
        ctx.drop(a, "sockvisor runs one command: the last ExecStart= is carried over")
    a = origins[-1]
    try:
        command = parse_command(a.value)
    except BadValue as exc:
        ctx.drop(a, str(exc))
        return
    argv = [command.path, *command.argv[1:]]
    if "@" in command.prefixes:
        ctx.note(f"ExecStart=@: argv[0] was {command.argv[0]!r}; sockvisor passes the program path")
    if "-" in command.prefixes:
        ctx.drop(a, "sockvisor does not ignore a failing exit status", value="-", key="ExecStart prefix")
    if "+" in command.prefixes or "!" in command.prefixes:
        ctx.drop(a, "privilege prefixes ('+', '!', '!!') are not carried over: the command runs as user/group",
                 value=command.prefixes, key="ExecStart prefix")  # fmt: skip
    if "|" in command.prefixes:
        ctx.drop(a, "the '|' prefix (run through a shell) is not carried over", value="|", key="ExecStart prefix")
    if ":" not in command.prefixes:
        known = env if env is not None else {}
        argv, unknown, expanded = expand_variables(argv, known)
        for name in unknown:
            why = ("EnvironmentFile= may set it when the service starts" if env is None and _ENV_NAME.fullmatch(name)
                   else "not set by Environment= here" if _ENV_NAME.fullmatch(name) else "not a variable name")
            ctx.drop(a, f"sockvisor does not expand $VARIABLES when it starts the program ({why}): "
                        "passed as written", value=f"${name}", key="ExecStart")  # fmt: skip
        if expanded:
            ctx.note("ExecStart=: " + ", ".join(f"${n}" for n in expanded)
                     + " expanded at import time from Environment=, as systemd would when it starts the service")
    ctx.unit.data["exec"] = argv


def expand_variables(argv: list[str], env: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """``argv`` with systemd's variable substitution done for the variables in ``env``.

    As systemd.service(5), "Command lines": a word that is exactly ``$NAME`` becomes the value
    split into words (zero or more); ``${NAME}`` inside a word is replaced as is; ``$$`` is a
    ``$``; anything else (``$NAME`` inside a word, ``${NAME:-x}``, an unclosed ``${``) stays as it is.

    Returns:
        The new argv, the names that could not be expanded here (not in ``env``, or no valid
        name; they are left as written), and the names that were.
    """
    out: list[str] = []
    unknown: list[str] = []
    expanded: list[str] = []

    def known(name: str) -> bool:
        if _ENV_NAME.fullmatch(name) and name in env:
            if name not in expanded:
                expanded.append(name)
            return True
        if name not in unknown:
            unknown.append(name)
        return False

    for word in argv:
        if word.startswith("$") and word[1:2] not in ("{", "$"):
            if known(word[1:]):
                out.extend(split_quoted(env[word[1:]], relaxed=True))
            else:
                out.append(word)
            continue
        text: list[str] = []
        i = 0
        close = -1  # the next '}' at or after where it was last looked for: found once, not per ${
        while i < len(word):
            if word.startswith("$$", i):
                text.append("$")
                i += 2
            elif word.startswith("${", i):
                if close < i + 2:
                    close = word.find("}", i + 2)
                end = close
                if end == -1:  # unterminated: the rest is left as written (and the scan is linear)
                    text.append(word[i:])
                    break
                colon = word.find(":", i + 2, end)
                name = word[i + 2:end] if colon == -1 else ""
                if colon != -1:  # ${NAME:-x}, ${NAME:+x}: not expanded; scanning goes on after the ':'
                    text.append(word[i:colon + 1])
                    i = colon + 1
                elif known(name):
                    text.append(env[name])
                    i = end + 1
                else:
                    text.append(word[i:end + 1])
                    i = end + 1
            else:
                text.append(word[i])
                i += 1
        out.append("".join(text))
    return out, unknown, expanded


def _handle_user(ctx: _Context, setting: _Setting) -> None:
    ctx.unit.data["user"] = _principal(setting.value)


def _handle_group(ctx: _Context, setting: _Setting) -> None:
    ctx.unit.data["group"] = _principal(setting.value)


def _handle_groups(ctx: _Context, setting: _Setting) -> None:
    groups = [_principal(g) for v in setting.values for g in v.split()]
    if groups:
        ctx.unit.data["supplementary_groups"] = groups


def _handle_workdir(ctx: _Context, setting: _Setting) -> None:
    path = setting.value
    if path.startswith("-"):
        path = path[1:]
        ctx.note("WorkingDirectory=-: sockvisor requires the directory to exist")
    if path == "~":
        path = "/root"
    if not path.startswith("/"):
        raise BadValue("expected an absolute path")
    ctx.unit.data["working_directory"] = path


def _environment(setting: _Setting) -> tuple[dict[str, str], list[tuple[Assignment, str, str | None]]]:
    """Environment= as the variables it sets, and what was wrong (assignment, why, the word)."""
    environment: dict[str, str] = {}
    bad: list[tuple[Assignment, str, str | None]] = []
    for value, a in zip(setting.values, setting.origins, strict=True):
        try:
            words = split_quoted(value)
        except BadValue as exc:
            bad.append((a, str(exc), None))
            continue
        for word in words:
            name, sep, val = word.partition("=")
            if not sep or not _ENV_NAME.fullmatch(name):
                bad.append((a, "expected NAME=VALUE", word))
                continue
            environment[name] = val
    return environment, bad


def _handle_environment(ctx: _Context, setting: _Setting) -> None:
    environment, bad = _environment(setting)
    for a, why, word in bad:
        ctx.drop(a, why, value=word)
    if environment:
        ctx.unit.data["environment"] = environment


def _handle_environment_file(ctx: _Context, setting: _Setting) -> None:
    files = []
    for value, a in zip(setting.values, setting.origins, strict=True):
        path = value.strip()
        if not path.lstrip("-").startswith("/"):
            ctx.drop(a, "expected an absolute path (with an optional '-')")
            continue
        files.append(path)
    if files:
        ctx.unit.data["environment_files"] = files


def _handle_pass_environment(ctx: _Context, setting: _Setting) -> None:
    names = [w for v in setting.values for w in v.split()]
    for bad in [n for n in names if not _ENV_NAME.fullmatch(n)]:
        ctx.drop(setting.last, "not a variable name", value=bad)
    good = [n for n in names if _ENV_NAME.fullmatch(n)]
    if good:
        ctx.unit.data["pass_environment"] = good


def _handle_umask(ctx: _Context, setting: _Setting) -> None:
    ctx.unit.data["umask"] = parse_mode(setting.value, 0o777)


def _handle_nice(ctx: _Context, setting: _Setting) -> None:
    ctx.unit.data["nice"] = parse_int(setting.value, -20, 19)


def _handle_type(ctx: _Context, setting: _Setting) -> None:
    kind = setting.value
    if kind in ("simple", "exec", "idle"):
        return
    if kind in ("notify", "notify-reload"):
        if ctx.accept:
            raise BadValue("readiness only applies with Accept=no")
        ctx.unit.data["ready"] = "notify"
        return
    raise BadValue(f"Type={kind}: sockvisor runs simple and notify services only")


_RESTART = {"no": "never", "on-failure": "on-failure", "always": "always", "on-abnormal": "on-failure",
            "on-abort": "on-failure", "on-watchdog": "on-failure"}  # fmt: skip


def _handle_restart(ctx: _Context, setting: _Setting) -> None:
    if ctx.accept:
        raise BadValue("per-connection children are not restarted")
    mode = _RESTART.get(setting.value)
    if mode is None:
        raise BadValue(f"Restart={setting.value} has no sockvisor equivalent")
    if mode == "on-failure" and setting.value != "on-failure":
        ctx.note(f"Restart={setting.value}: carried over as restart: on-failure (any failure)")
    ctx.unit.data["restart"] = mode


# A zero means something else in each directive: RestartSec=0 restarts at once,
# where sockvisor's restart_delay must be greater than 0; for the timeouts and
# the watchdog, 0 turns them off, which sockvisor has no value for.
_ZERO_WHY = {
    "restart_delay": "0 (restart at once): sockvisor's restart_delay must be greater than 0, its default is kept",
    "watchdog": "0 turns the watchdog off, as leaving watchdog out does",
}
_TIMEOUT_ZERO_WHY = "0 turns systemd's timeout off: sockvisor has no unlimited {key}, its default is kept"


def _nonzero_duration(text: str, key: str) -> str:
    """``text`` as a sockvisor duration for ``key``; raises BadValue for 0, which sockvisor cannot say."""
    seconds = parse_timespan(text)
    if round(seconds * 1e6) == 0:
        raise BadValue(_ZERO_WHY.get(key, _TIMEOUT_ZERO_WHY.format(key=key)))
    return format_duration(seconds)


def _duration_key(key: str, service_only: bool = False) -> Callable[[_Context, _Setting], None]:
    def handle(ctx: _Context, setting: _Setting) -> None:
        if service_only and ctx.accept:
            raise BadValue("only applies with Accept=no")
        ctx.unit.data[key] = _nonzero_duration(setting.value, key)

    return handle


def _handle_timeout(ctx: _Context, setting: _Setting) -> None:
    value = _nonzero_duration(setting.value, "start_timeout and stop_timeout")
    ctx.unit.data.setdefault("stop_timeout", value)
    if not ctx.accept:
        ctx.unit.data.setdefault("start_timeout", value)


def _handle_kill_signal(ctx: _Context, setting: _Setting) -> None:
    name = setting.value.strip().upper()
    if name.isdigit():
        number = decimal(name, 1, int(signal.SIGRTMAX))
        if number is None:
            raise BadValue("signal out of range")
        ctx.unit.data["stop_signal"] = number
        return
    if not name.startswith("SIG"):
        name = "SIG" + name
    if name not in signal.Signals.__members__:
        raise BadValue("unknown signal")
    ctx.unit.data["stop_signal"] = name


def _handle_fd_store(ctx: _Context, setting: _Setting) -> None:
    count = parse_int(setting.value, 0, 65536)
    if ctx.accept:
        raise BadValue("the fd store only applies with Accept=no")
    if count:
        ctx.unit.data["fd_store_max"] = count
        ctx.note("FileDescriptorStoreMax: stored fds are kept across restarts of the service, "
                 "not across restarts of sockvisor")  # fmt: skip


def _handle_limit(key: str) -> Callable[[_Context, _Setting], None]:
    limit = _LIMITS[key]

    def handle(ctx: _Context, setting: _Setting) -> None:
        soft_text, sep, hard_text = setting.value.partition(":")
        soft = _limit_value(soft_text, limit)
        hard = _limit_value(hard_text, limit) if sep else soft
        if hard != "infinity" and (soft == "infinity" or int(soft) > int(hard)):
            raise BadValue("soft limit is above the hard limit")
        limits: dict[str, Any] = dict(ctx.unit.data.get("limits", {}))
        limits[limit] = soft if soft == hard else {"soft": soft, "hard": hard}
        ctx.unit.data["limits"] = limits

    return handle


def _limit_value(text: str, limit: str) -> int | str:
    word = text.strip()
    if word.lower() == "infinity":
        return "infinity"
    if limit == "cpu" and not word.isdigit():
        return int(parse_timespan(word))
    return parse_size(word)


_SERVICE_HANDLERS: dict[str, Callable[[_Context, _Setting], None]] = {
    "User": _handle_user,
    "Group": _handle_group,
    "SupplementaryGroups": _handle_groups,
    "WorkingDirectory": _handle_workdir,
    "Environment": _handle_environment,
    "EnvironmentFile": _handle_environment_file,
    "PassEnvironment": _handle_pass_environment,
    "UMask": _handle_umask,
    "Nice": _handle_nice,
    "Type": _handle_type,
    "Restart": _handle_restart,
    "RestartSec": _duration_key("restart_delay", service_only=True),
    "WatchdogSec": _duration_key("watchdog", service_only=True),
    "TimeoutStartSec": _duration_key("start_timeout", service_only=True),
    "TimeoutStopSec": _duration_key("stop_timeout"),
    "TimeoutSec": _handle_timeout,
    "KillSignal": _handle_kill_signal,
    "FileDescriptorStoreMax": _handle_fd_store,
    **{key: _handle_limit(key) for key in _LIMITS},
}
_SERVICE_WHY = {
    "NonBlocking": "sockvisor passes the fds as they are: the program sets O_NONBLOCK itself",
    "ExecStartPre": "sockvisor runs one command per start",
    "ExecStartPost": "sockvisor runs one command per start",
    "ExecReload": "sockvisor reloads its own configuration only",
    "ExecStop": "sockvisor stops a child with stop_signal",
    "ExecStopPost": "sockvisor runs one command per start",
    "ExecCondition": "sockvisor runs one command per start",
    "RemainAfterExit": "sockvisor tracks the process only",
    "PIDFile": "sockvisor tracks the process it started (no forking services)",
    "NotifyAccess": "sockvisor accepts notifications from the child it started",
    "UnsetEnvironment": "sockvisor builds each child's environment from its unit only",
    "Sockets": "the sockets come from this unit's listen entries",
    "SyslogIdentifier": "sockvisor logs a child's stderr under the unit's name",
    "SyslogFacility": "sockvisor logs a child's stderr under the unit's name",
    "LogLevelMax": "sockvisor logs a child's stderr as it is",
    "LimitDATA": "sockvisor's limits have no data-segment limit",
    "LimitRSS": "Linux ignores RLIMIT_RSS",
}
_INSTALL_WHY = "sockvisor starts every enabled unit: the [Install] section has no equivalent"
_UNIT_WHY = "sockvisor has no unit dependencies or conditions"


# ----------------------------------------------------------------------------
# The entry point


def _socket_files(paths: list[str]) -> list[str]:
    out: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            try:
                names = sorted(os.listdir(path))
            except OSError as exc:
                raise ImportReadError(path, exc.strerror or str(exc)) from None
            out.extend(os.path.join(path, n) for n in names if n.endswith(".socket")
                       and os.path.isfile(os.path.join(path, n)))  # fmt: skip
        else:
            out.append(path)
    return out


def _unit_name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]", "-", stem)[:64] or "socket"


def import_systemd(paths: list[str], unit_dirs: list[str] | None = None) -> ImportResult:
    """Translate ``.socket`` units, with their drop-ins and the services they activate, into units.

    Args:
        paths: ``.socket`` files, or directories meaning every ``*.socket`` in them.
        unit_dirs: where services and drop-ins are looked for after the socket's own directory;
            default ``DEFAULT_UNIT_DIRS`` (the system manager's search path).
    Returns:
        One unit per socket, in the order given, and every directive that was not carried over.
    Raises:
        ImportSyntaxError: a unit file is not valid unit-file syntax (with file and line).
        ImportReadError: a file cannot be read, or the socket's service cannot be found.
    """
    dirs_after = list(DEFAULT_UNIT_DIRS if unit_dirs is None else unit_dirs)
    collector = Collector()
    names: set[str] = set()
    for path in _socket_files(paths):
        base = os.path.basename(path)
        if not base.endswith(".socket"):
            raise ImportReadError(path, "not a .socket unit")
        dirs = [os.path.dirname(path) or ".", *dirs_after]
        socket_name = UnitName(base)
        socket_unit = _load(path, socket_name, dirs)
        for a in socket_unit.assignments:
            collector.read(a.file, a.line)
        name = _unit_name(socket_name.stem)
        while name in names:
            name = _unit_name(name + "-2")
        names.add(name)
        first = next((a.line for a in socket_unit.assignments if a.file == path and a.section == "Socket"), 1)
        unit = ImportedUnit(name, path, first, {"name": name})
        ctx = _Context(unit, collector)
        if "@" in socket_name.stem and not socket_name.instance:
            ctx.note(f"{base} is a template: imported with an empty instance name (%i and %I are empty)")
        for a, spec in socket_unit.unexpanded:
            ctx.drop(a, f"specifier {spec} is not known at import time: left as written")
        socket_settings = _fold(socket_unit.assignments, "Socket", _SOCKET_LISTS)
        accept_setting = socket_settings.get("Accept")
        if accept_setting is not None:
            try:
                ctx.accept = parse_bool(accept_setting.value)
            except BadValue as exc:
                ctx.drop(accept_setting.last, str(exc))
        service_name = _socket(ctx, socket_settings)
        if not ctx.accept:
            # systemd names an Accept=no unit's fds after the socket unit unless FileDescriptorName= says.
            for entry in ctx.listen:
                entry.setdefault("name", base)
        unit.data["listen"] = ctx.listen
        unit.data["mode"] = "accept" if ctx.accept else "service"
        if not ctx.listen:
            ctx.note("no listener could be carried over: add listen entries")
        _sections(ctx, socket_unit, "Socket")

        if service_name is None:
            service_name = f"{socket_name.prefix}@.service" if ctx.accept else f"{socket_name.stem}.service"
        elif ctx.accept:
            ctx.drop(socket_settings["Service"].last, "systemd refuses Service= with Accept=yes", key="Service")
            service_name = f"{socket_name.prefix}@.service"
        service_path, loaded_as = _service_file(ctx, path, service_name, dirs)
        service_unit = _load(service_path, UnitName(loaded_as), dirs)
        for a in service_unit.assignments:
            collector.read(a.file, a.line)
        for a, spec in service_unit.unexpanded:
            ctx.drop(a, f"specifier {spec} is not known at import time: left as written")
        if ctx.accept:
            for a in service_unit.instance_specifiers:
                ctx.note(f"{a.key}= at {a.file}:{a.line}: the per-connection instance name is empty here")
        service_settings = _fold(service_unit.assignments, "Service", _SERVICE_LISTS)
        _service(ctx, service_settings)
        _sections(ctx, service_unit, "Service")
        _description(unit, socket_unit, service_unit)
        unit.data = order_unit(unit.data)
        collector.result.units.append(unit)
    return collector.finish()


def _description(unit: ImportedUnit, *loaded: _Loaded) -> None:
    for source in loaded:
        settings = _fold(source.assignments, "Unit", frozenset())
        if "Description" in settings and settings["Description"].value:
            unit.data["description"] = settings["Description"].value
            return


def _sections(ctx: _Context, loaded: _Loaded, main: str) -> None:
    """Warn about the [Unit] and [Install] settings of ``loaded`` and any section that is not ``main``."""
    for section in dict.fromkeys(a.section for a in loaded.assignments):
        if section == main:
            continue
        settings = _fold(loaded.assignments, section, frozenset())
        for key, setting in settings.items():
            if section == "Unit" and key == "Description":
                continue
            if section == "Unit":
                why = _UNIT_WHY
            elif section == "Install":
                why = _INSTALL_WHY
            else:
                why = f"a [{section}] section does not belong in a .{loaded.name.suffix} unit"
            for each in setting.every:
                ctx.drop(each, why)
