"""The configuration schema: what each key is, where it applies and how its value is parsed.

Converters turn a located YAML value into a typed one, raising ``ValueError``
with what is wrong (``Reader`` adds where). The key tables (``UNIT_KEYS``,
``LISTEN_PARSERS``, ...) are the one source that unknown-key errors, "did you
mean" hints and "only applies to ..." messages are derived from; the listen
options' kinds come from ``model.LISTEN_OPTIONS``, and defaults from the model
itself, never restated here.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

from supervisor import addresses, values
from supervisor.model import (
    FDNAME_MAX,
    LISTEN_OPTION_KINDS,
    InetAddress,
    ListenKind,
    Mode,
    Unit,
    valid_fdname,
)
from supervisor.yamlload import (
    Scalar,
    Value,
    kind_of,
    to_plain,
)

DEFAULT_INCLUDE = ("sockets.d/*.yaml",)

UNIT_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
LOG_LEVELS = ("debug", "info", "warning", "error")
LIMIT_NAMES = ("nofile", "nproc", "as", "cpu", "core", "fsize", "memlock", "stack")
# Set by sockvisor for every child; a unit may not override them.
# Ranges the daemon can apply (checked at parse time: what check accepts, run applies).
INT_MAX = 2**31 - 1  # setsockopt() takes a C int; so do counts handed to the kernel
MAX_ID = 2**32 - 2  # uid_t/gid_t; (uid_t)-1 means "unchanged"
MAX_KEEPALIVE = 32767.0  # seconds: the kernel's MAX_TCP_KEEPIDLE and MAX_TCP_KEEPINTVL
MAX_WORKERS = 4096
MAX_RATE = 1e9  # connections per second

T = TypeVar("T")
E = TypeVar("E", bound=Enum)

K = ListenKind
ALL_KINDS = frozenset(ListenKind)
TCP = frozenset({K.TCP})
UDP = frozenset({K.UDP})
INET = frozenset({K.TCP, K.UDP})
STREAM = frozenset({K.TCP, K.UNIX, K.UNIX_SEQPACKET})  # the kinds that listen()
SOCKETS = ALL_KINDS - {K.FIFO}
UNIX = frozenset({K.UNIX, K.UNIX_DGRAM, K.UNIX_SEQPACKET})
LOCAL = UNIX | {K.FIFO}

def kind_group_name(kinds: frozenset[ListenKind]) -> str:
    """How an error names a set of listen kinds: "tcp, unix and vsock" (enum order), or "any"."""
    if kinds == ALL_KINDS:
        return "any"
    names = [kind.value for kind in ListenKind if kind in kinds]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]

# Per-listen options: the kinds each applies to. Their value parsers are in
# _Reader._listen_option; a test checks both tables name the same keys.
# Defaults come from the model, never restated here (tests/unit pins a minimal unit to them).
UNIT_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(Unit) if f.default is not dataclasses.MISSING
}
LISTEN_OPTIONS = LISTEN_OPTION_KINDS
# Options about a node in the file system: meaningless for "@abstract" names.
FILESYSTEM_OPTIONS = ("mode", "user", "group", "directory_mode", "symlinks")
KIND_KEYS = tuple(kind.value for kind in ListenKind)

PROCESS_KEYS = (
    "exec", "user", "group", "supplementary_groups", "working_directory", "environment",
    "pass_environment", "environment_files", "umask", "nice", "limits", "stderr", "stop_signal", "stop_timeout",
)  # fmt: skip
ACCEPT_KEYS = (
    "max_connections", "max_connections_per_source", "rate", "allow", "deny", "log_connections",
    "banner", "banner_success", "banner_fail", "access_times",
)  # fmt: skip
POOL_KEYS = ("workers", "settle", "max_surge")
PROXY_KEYS = ("backend", "idle_stop", "proxy_protocol", "udp_idle")
UNIT_KEYS = (
    "name", "description", "enabled", "listen", "mode", "pass", "start", "restart", "restart_delay",
    "restart_delay_max", "restart_reset", "start_limit", "ready", "start_timeout", "watchdog",
    "fd_store_max", "builtin", *PROCESS_KEYS, *ACCEPT_KEYS, *POOL_KEYS, *PROXY_KEYS,
)  # fmt: skip
# Keys that mean something in some modes only (elsewhere they are refused, never ignored).
PER_CONNECTION = frozenset({Mode.ACCEPT, Mode.PROXY})
KEY_MODES: dict[str, frozenset[Mode]] = {
    **{key: PER_CONNECTION for key in ACCEPT_KEYS},
    **{key: frozenset({Mode.POOL}) for key in POOL_KEYS},
    **{key: frozenset({Mode.PROXY}) for key in PROXY_KEYS},
    "pass": frozenset({Mode.SERVICE, Mode.ACCEPT, Mode.POOL}),  # a proxy's backend gets no fds
    "builtin": frozenset({Mode.ACCEPT, Mode.SERVICE}),  # streams per connection, datagrams per datagram
}


# ----------------------------------------------------------------------------
# Converters: Value -> typed value, raising ValueError. Numbers keep their
# source text where a string is wanted ("PORT: 8080" is "8080").


def clean(text: str) -> str:
    """Refuse what no file name, argument or variable can hold: NUL, and unencodable (surrogate) characters."""
    if "\x00" in text:
        raise ValueError("must not contain a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"holds a character that cannot be encoded (U+{ord(text[exc.start]):04X})") from None
    return text


def scalar_text(value: Value, what: str) -> str:
    if isinstance(value, Scalar):
        if isinstance(value.value, str):
            return clean(value.value)
        if isinstance(value.value, int | float) and not isinstance(value.value, bool):
            return value.text
    raise ValueError(f"expected {what}, got {kind_of(value)}")


def string_value(value: Value) -> str:
    if isinstance(value, Scalar) and isinstance(value.value, str):
        return clean(value.value)
    raise ValueError(f"expected a string, got {kind_of(value)}")


def nonempty_string(value: Value) -> str:
    text = string_value(value)
    if not text:
        raise ValueError("must not be empty")
    return text


def principal(value: Value) -> str:
    """A user or group: a name, or a numeric id."""
    text = scalar_text(value, "a user or group name or id")
    if not text or len(text) > 256 or any(c.isspace() or c == ":" or not c.isprintable() for c in text):
        raise ValueError(f"invalid user or group name {values.show(text)}")
    if text.lstrip("-").isdigit() and (len(text) > 12 or not 0 <= int(text) <= MAX_ID):
        raise ValueError(f"invalid id {values.show(text)} (0-{MAX_ID})")
    return text


def absolute_path(value: Value) -> str:
    text = string_value(value)
    if not text.startswith("/"):
        raise ValueError(f"expected an absolute path, got {text!r}")
    return text


def plain_value(parse: Callable[[object], T]) -> Callable[[Value], T]:
    return lambda value: parse(to_plain(value))


def mode_value(key: str, maximum: int = 0o7777) -> Callable[[Value], int]:
    def convert(value: Value) -> int:
        text = value.text if isinstance(value, Scalar) else None
        return values.parse_mode(to_plain(value), key=key, text=text, maximum=maximum)

    return convert


def int_value(minimum: int | None = None, maximum: int | None = None) -> Callable[[Value], int]:
    return plain_value(lambda v: values.parse_int(v, minimum=minimum, maximum=maximum))


def duration(positive: bool = False, maximum: float | None = None) -> Callable[[Value], float]:
    def convert(plain: object) -> float:
        seconds = values.parse_duration(plain, positive=positive)
        if maximum is not None and seconds > maximum:
            raise ValueError(f"duration {values.show(plain)} is too long: the maximum is {maximum:g}s")
        return seconds

    return plain_value(convert)


bool_value = plain_value(values.parse_bool)


def enum_value(kind: type[E]) -> Callable[[Value], E]:
    choices = [member.value for member in kind]

    def convert(value: Value) -> E:
        plain = value.value if isinstance(value, Scalar) else None
        if isinstance(plain, str) and plain in choices:
            return kind(plain)
        listed = ", ".join(choices[:-1]) + f" or {choices[-1]}"
        message = f"expected {listed}, got {kind_of(value)}"
        raise ValueError(message + did_you_mean(plain, choices))

    return convert


def did_you_mean(word: object, choices: Collection[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def fd_name(value: Value) -> str:
    """A name for LISTEN_FDNAMES, by systemd's rules: printable ASCII, no ':', at most 255."""
    text = scalar_text(value, "a name")
    if valid_fdname(text):
        return text
    if not text:
        raise ValueError("must not be empty")
    if len(text) > FDNAME_MAX:
        raise ValueError(f"is {len(text)} characters long; the limit is {FDNAME_MAX}")
    raise ValueError(f"invalid fd name {text!r}: printable ASCII without ':'")


def interface(value: Value) -> str:
    text = string_value(value)
    if not 1 <= len(text) <= 15 or "/" in text or any(c.isspace() for c in text):
        raise ValueError(f"invalid network interface name {text!r}")
    return text


def listen_address(kind: ListenKind, value: Value) -> InetAddress | str:
    if kind.is_inet:
        if isinstance(value, Scalar) and isinstance(value.value, int) and not isinstance(value.value, bool):
            # YAML 1.1 reads "1:30" as sexagesimal 90: use what was written.
            return addresses.parse_inet(value.text)
        return addresses.parse_inet(to_plain(value))
    if kind is ListenKind.FIFO:
        return addresses.parse_fifo_path(to_plain(value))
    if kind is ListenKind.NETLINK:
        return addresses.parse_netlink(scalar_text(value, 'a netlink family and group, like "kobject-uevent 1"'))
    if kind is ListenKind.SPECIAL:
        return absolute_path(value)
    if kind is ListenKind.MQUEUE:
        return addresses.parse_mqueue(string_value(value))
    if kind is ListenKind.VSOCK:
        return addresses.parse_vsock(scalar_text(value, "CID:PORT"))
    return addresses.parse_unix_path(to_plain(value))


def access_window(value: Value) -> tuple[int, int]:
    """``"HH:MM-HH:MM"`` (xinetd's access_times entry) as minutes of the day; the end may be past midnight."""
    text = string_value(value).strip()
    match = re.fullmatch(r"(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})", text)
    if match is None:
        raise ValueError(f"expected a window like \"08:00-12:30\", got {values.show(text)}")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
        raise ValueError(f"{text!r}: hours are 0-23 and minutes 0-59")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end:
        raise ValueError(f"{text!r}: an empty window (start equals end)")
    return start, end


def backend_address(value: Value) -> InetAddress | str:
    """A proxy backend: ``host:port``, ``[v6]:port``, an absolute unix path or ``@abstract``."""
    text = scalar_text(value, "an address like 127.0.0.1:8080 or a unix path")
    if text.startswith(("/", "@")):
        return addresses.parse_unix_path(text)
    address = addresses.parse_inet(text)
    if address.any_dual_stack:
        port = address.port
        raise ValueError(f"a backend needs a host to connect to: write 127.0.0.1:{port} or [::1]:{port}")
    return address


@dataclass(frozen=True, slots=True)
class Option:
    """How one per-listen option is parsed and which model field it fills."""

    convert: Callable[[Value], Any]
    field: str


LISTEN_PARSERS: dict[str, Option] = {
    "name": Option(fd_name, "name"),
    "backlog": Option(int_value(1, 2**31 - 1), "backlog"),
    "ipv6_only": Option(bool_value, "ipv6_only"),
    "freebind": Option(bool_value, "freebind"),
    "transparent": Option(bool_value, "transparent"),
    "reuse_port": Option(bool_value, "reuse_port"),
    "bind_to_device": Option(interface, "bind_to_device"),
    # SO_RCVBUF/SO_SNDBUF take a C int (the kernel then doubles and caps it).
    "receive_buffer": Option(plain_value(lambda v: values.parse_size(v, maximum=INT_MAX)), "receive_buffer"),
    "send_buffer": Option(plain_value(lambda v: values.parse_size(v, maximum=INT_MAX)), "send_buffer"),
    "nodelay": Option(bool_value, "nodelay"),
    "keepalive": Option(bool_value, "keepalive"),
    "keepalive_time": Option(duration(positive=True, maximum=MAX_KEEPALIVE), "keepalive_time"),
    "keepalive_interval": Option(duration(positive=True, maximum=MAX_KEEPALIVE), "keepalive_interval"),
    "keepalive_probes": Option(int_value(1, 127), "keepalive_probes"),
    "defer_accept": Option(duration(), "defer_accept"),
    # SO_MARK takes a C int, as systemd's Mark= does: 2^31 and above cannot be passed.
    "mark": Option(int_value(0, INT_MAX), "mark"),
    "ip_tos": Option(int_value(0, 255), "ip_tos"),
    "ip_ttl": Option(int_value(1, 255), "ip_ttl"),
    "priority": Option(int_value(0, 2**31 - 1), "priority"),
    "broadcast": Option(bool_value, "broadcast"),
    "pass_credentials": Option(bool_value, "pass_credentials"),
    "mode": Option(mode_value("mode"), "mode"),
    "user": Option(principal, "user"),
    "group": Option(principal, "group"),
    "directory_mode": Option(mode_value("directory_mode"), "directory_mode"),
    "remove_on_stop": Option(bool_value, "remove_on_stop"),
    "symlinks": Option(lambda v: v, "symlinks"),  # a list: parsed by _Reader._symlinks
    "backend": Option(backend_address, "backend"),
    "protocol": Option(lambda v: choice(v, ("sctp", "mptcp", "udplite")), "protocol"),
    "pass_security": Option(bool_value, "pass_security"),
    "pass_packet_info": Option(bool_value, "pass_packet_info"),
    "timestamping": Option(lambda v: None if choice(v, ("off", "us", "ns")) == "off" else choice(v, ("us", "ns")),
                           "timestamping"),
    "tcp_congestion": Option(lambda v: congestion(v), "tcp_congestion"),
    "pipe_size": Option(plain_value(lambda v: values.parse_size(v, maximum=INT_MAX)), "pipe_size"),
    "writable": Option(bool_value, "writable"),
    "mqueue_max_messages": Option(int_value(1, 65536), "mqueue_max_messages"),
    "mqueue_message_size": Option(int_value(1, 16 << 20), "mqueue_message_size"),
}


def choice(value: Value, choices: tuple[str, ...]) -> str:
    plain = value.value if isinstance(value, Scalar) else None
    if isinstance(plain, str) and plain in choices:
        return plain
    listed = ", ".join(choices[:-1]) + f" or {choices[-1]}"
    raise ValueError(f"expected {listed}, got {kind_of(value)}" + did_you_mean(plain, choices))


def congestion(value: Value) -> str:
    text = string_value(value)
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,15}", text):  # TCP_CA_NAME_MAX is 16 with the NUL
        raise ValueError(f"invalid congestion control name {text!r}")
    return text


def positive_number(value: object) -> float:
    return values.parse_number(value, positive=True, maximum=MAX_RATE)


def log_level(value: Value) -> str:
    plain = value.value if isinstance(value, Scalar) else None
    if isinstance(plain, str) and plain in LOG_LEVELS:
        return plain
    hint = did_you_mean(plain, LOG_LEVELS)
    raise ValueError(f"expected debug, info, warning or error, got {kind_of(value)}" + hint)


def env_name(value: Value) -> str:
    name = string_value(value)
    if not ENV_NAME.fullmatch(name):
        raise ValueError(f"invalid variable name {name!r}")
    return name
