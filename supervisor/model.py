"""The configuration as data: frozen, typed, comparable.

Everything here is produced by ``supervisor.config`` (which parses YAML and
reports every problem with its location) and consumed by the sockets, spawn and
daemon layers. Nothing in this module binds, reads the environment or exits.

Equality matters: a reload diffs the old and new configuration by unit name
and by listen entry, and "unchanged" means ``==`` on these objects. Locations
are therefore excluded from comparison (``compare=False``): moving a unit down
a file must not re-bind its sockets.
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass, field

from supervisor.errors import Location

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Set by the daemon per spawn or per unit: the one list of names a unit's `environment` may not
# set (config refuses them, with their location) and `pass_environment` never hands on (spawn).
FDNAME_MAX = 255  # systemd's FDNAME_MAX


def valid_fdname(name: str) -> bool:
    """Whether ``name`` may name an fd in ``LISTEN_FDNAMES``: systemd's rule (printable ASCII, no ':', 1-255)."""
    return 0 < len(name) <= FDNAME_MAX and all(" " <= c <= "~" and c != ":" for c in name)


RESERVED_ENVIRONMENT: frozenset[str] = frozenset(
    {
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
        "REMOTE_ADDR",
        "REMOTE_PORT",
        "REMOTE_PID",
        "REMOTE_UID",
        "REMOTE_GID",
        "SOCKVISOR_UNIT",
        "SOCKVISOR_WORKER",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
    }
)

DEFAULT_CONFIG_DIR = "/etc/sockvisor"
DEFAULT_CONTROL_SOCKET = "/run/sockvisor/control.sock"


class ListenKind(enum.Enum):
    TCP = "tcp"
    UDP = "udp"
    UNIX = "unix"
    UNIX_DGRAM = "unix-dgram"
    UNIX_SEQPACKET = "unix-seqpacket"
    FIFO = "fifo"
    NETLINK = "netlink"  # ListenNetlink=: "FAMILY [GROUP]"
    SPECIAL = "special"  # ListenSpecial=: a character device or a /proc or /sys file, opened
    MQUEUE = "mqueue"  # ListenMessageQueue=: "/name"
    VSOCK = "vsock"  # ListenStream=vsock:CID:PORT

    @property
    def is_inet(self) -> bool:
        return self in (ListenKind.TCP, ListenKind.UDP)

    @property
    def is_unix(self) -> bool:
        return self in (ListenKind.UNIX, ListenKind.UNIX_DGRAM, ListenKind.UNIX_SEQPACKET)

    @property
    def is_datagram(self) -> bool:
        """True for kinds that cannot ``accept()`` (mode: accept refuses them)."""
        return self in (ListenKind.UDP, ListenKind.UNIX_DGRAM, ListenKind.FIFO, ListenKind.NETLINK,
                        ListenKind.SPECIAL, ListenKind.MQUEUE)


class Mode(enum.Enum):
    SERVICE = "service"
    ACCEPT = "accept"
    POOL = "pool"
    PROXY = "proxy"

    @property
    def hands_over_listeners(self) -> bool:
        """Whether the unit's processes get the listening sockets (and so hold copies of them)."""
        return self in (Mode.SERVICE, Mode.POOL)

    @property
    def per_connection(self) -> bool:
        """Whether the daemon itself accepts each connection and applies the per-connection policy."""
        return self in (Mode.ACCEPT, Mode.PROXY)


class Pass(enum.Enum):
    FDS = "fds"
    STDIO = "stdio"


class Start(enum.Enum):
    ON_DEMAND = "on-demand"
    EAGER = "eager"


class Restart(enum.Enum):
    ON_FAILURE = "on-failure"
    ALWAYS = "always"
    NEVER = "never"


class Ready(enum.Enum):
    EXEC = "exec"
    NOTIFY = "notify"


class ProxyProtocol(enum.Enum):
    """The PROXY protocol header sent to the backend first (HAProxy's proxy-protocol.txt)."""

    V1 = "v1"
    V2 = "v2"


class Stderr(enum.Enum):
    INHERIT = "inherit"
    CONNECTION = "connection"
    NULL = "null"


class LogFormat(enum.Enum):
    JSON = "json"
    CONSOLE = "console"


@dataclass(frozen=True, slots=True)
class InetAddress:
    """An IP listen address.

    ``host`` is an IP literal without brackets ("127.0.0.1", "::1"), or "" for
    a bare port: all addresses, dual stack on ``[::]`` (falling back to
    ``0.0.0.0`` where the kernel has no IPv6). ``family`` is ``socket.AF_INET``
    or ``socket.AF_INET6``; for a bare port it is AF_INET6.
    """

    host: str
    port: int
    family: int
    scope_id: int = 0

    @property
    def any_dual_stack(self) -> bool:
        return self.host == ""

    def __str__(self) -> str:
        if self.host == "":
            return str(self.port)
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Listen:
    """One listen entry of a unit; its position in ``Unit.listen`` is its fd order.

    ``address`` is an ``InetAddress`` for tcp/udp and a path for the others
    (unix paths starting with "@" are in the abstract namespace).
    Options left ``None`` are not set on the socket (the kernel default stays).
    """

    kind: ListenKind
    address: InetAddress | str
    name: str
    backlog: int = 4096
    ipv6_only: bool | None = None
    freebind: bool = False
    transparent: bool = False
    reuse_port: bool = False
    bind_to_device: str | None = None
    receive_buffer: int | None = None
    send_buffer: int | None = None
    nodelay: bool | None = None
    keepalive: bool | None = None
    keepalive_time: float | None = None
    keepalive_interval: float | None = None
    keepalive_probes: int | None = None
    defer_accept: float | None = None
    mark: int | None = None
    ip_tos: int | None = None
    ip_ttl: int | None = None
    priority: int | None = None
    broadcast: bool = False
    pass_credentials: bool = False
    protocol: str | None = None  # sctp, mptcp (tcp) or udplite (udp): SocketProtocol=
    pass_security: bool = False  # SO_PASSSEC (unix)
    pass_packet_info: bool = False  # IP_PKTINFO / IPV6_RECVPKTINFO
    timestamping: str | None = None  # us (SO_TIMESTAMP), ns (SO_TIMESTAMPNS); None: off
    tcp_congestion: str | None = None  # TCP_CONGESTION
    pipe_size: int | None = None  # fifo: F_SETPIPE_SZ
    writable: bool = False  # special: opened read-write
    mqueue_max_messages: int | None = None  # mqueue: mq_maxmsg
    mqueue_message_size: int | None = None  # mqueue: mq_msgsize
    # unix sockets and fifos
    mode: int = 0o666
    user: str | None = None
    group: str | None = None
    directory_mode: int = 0o755
    remove_on_stop: bool = True
    symlinks: tuple[str, ...] = ()
    # mode: proxy: where this entry's clients are forwarded (None: the unit's backend)
    backend: InetAddress | str | None = None
    location: Location | None = field(default=None, compare=False, repr=False)

    @property
    def display(self) -> str:
        """The address as a user writes it, prefixed by its kind: ``tcp:127.0.0.1:80``."""
        return f"{self.kind.value}:{self.address}"


_ALL_KINDS = frozenset(ListenKind)
_TCP = frozenset({ListenKind.TCP})
_UDP = frozenset({ListenKind.UDP})
_INET = frozenset({ListenKind.TCP, ListenKind.UDP})
_STREAM = frozenset({ListenKind.TCP, ListenKind.UNIX, ListenKind.UNIX_SEQPACKET, ListenKind.VSOCK})  # listen()
_UNIX = frozenset({ListenKind.UNIX, ListenKind.UNIX_DGRAM, ListenKind.UNIX_SEQPACKET})
_SOCKETS = _INET | _UNIX | {ListenKind.NETLINK, ListenKind.VSOCK}  # SOL_SOCKET options
_LOCAL = _UNIX | {ListenKind.FIFO}  # a node in the file system (abstract names excepted)

# Which listen kinds each per-listen option means something for (systemd's
# rules). The config refuses an option set on any other kind; the socket layer
# re-checks, since a ``Listen`` can also be built by code.
@dataclass(frozen=True, slots=True)
class ListenOption:
    """What sockets, config and reload need to know of one per-listen option.

    ``kinds``: the listen kinds it applies to (elsewhere it is refused, never ignored);
    ``bind_time``: it acts at ``bind()`` only, so a change needs a new socket;
    ``on_socket``: it is a property of the socket (checked for applicability when
    binding), not of the entry's name, backlog or file-system node.
    """

    kinds: frozenset[ListenKind]
    bind_time: bool = False
    on_socket: bool = True


# The one table of per-listen options. config parses exactly these keys, sockets
# refuses them on kinds they do not apply to, reload re-binds on a bind-time change
# and retunes the rest in place: all derived from here (tests/unit pins each).
LISTEN_OPTIONS: dict[str, ListenOption] = {
    "name": ListenOption(_ALL_KINDS, on_socket=False),
    "backlog": ListenOption(_STREAM, on_socket=False),
    "ipv6_only": ListenOption(_INET, bind_time=True),
    "freebind": ListenOption(_INET, bind_time=True),
    "transparent": ListenOption(_INET, bind_time=True),
    "reuse_port": ListenOption(_INET, bind_time=True),
    "bind_to_device": ListenOption(_INET, bind_time=True),
    "receive_buffer": ListenOption(_SOCKETS),
    "send_buffer": ListenOption(_SOCKETS),
    "nodelay": ListenOption(_TCP),
    "keepalive": ListenOption(_TCP),
    "keepalive_time": ListenOption(_TCP),
    "keepalive_interval": ListenOption(_TCP),
    "keepalive_probes": ListenOption(_TCP),
    "defer_accept": ListenOption(_TCP),
    "mark": ListenOption(_SOCKETS),
    "ip_tos": ListenOption(_INET),
    "ip_ttl": ListenOption(_INET),
    "priority": ListenOption(_SOCKETS),
    "broadcast": ListenOption(_UDP),
    "pass_credentials": ListenOption(_UNIX),
    "protocol": ListenOption(_INET, bind_time=True),
    "pass_security": ListenOption(_UNIX),
    "pass_packet_info": ListenOption(_INET),
    "timestamping": ListenOption(_SOCKETS),
    "tcp_congestion": ListenOption(_TCP),
    "pipe_size": ListenOption(frozenset({ListenKind.FIFO}), on_socket=False),
    "writable": ListenOption(frozenset({ListenKind.SPECIAL}), bind_time=True, on_socket=False),
    "mqueue_max_messages": ListenOption(frozenset({ListenKind.MQUEUE}), bind_time=True, on_socket=False),
    "mqueue_message_size": ListenOption(frozenset({ListenKind.MQUEUE}), bind_time=True, on_socket=False),
    "mode": ListenOption(_LOCAL | {ListenKind.MQUEUE}, on_socket=False),
    "user": ListenOption(_LOCAL),
    "group": ListenOption(_LOCAL),
    "directory_mode": ListenOption(_LOCAL, on_socket=False),
    "remove_on_stop": ListenOption(_LOCAL | {ListenKind.MQUEUE}, on_socket=False),
    "symlinks": ListenOption(_LOCAL),
    "backend": ListenOption(frozenset({ListenKind.TCP, ListenKind.UDP, ListenKind.UNIX}), on_socket=False),
}
LISTEN_OPTION_KINDS: dict[str, frozenset[ListenKind]] = {name: o.kinds for name, o in LISTEN_OPTIONS.items()}
BIND_TIME_OPTIONS: tuple[str, ...] = tuple(name for name, o in LISTEN_OPTIONS.items() if o.bind_time)
RETUNABLE_OPTIONS: frozenset[str] = frozenset(name for name, o in LISTEN_OPTIONS.items() if not o.bind_time)


@dataclass(frozen=True, slots=True)
class StartLimit:
    """At most ``burst`` starts within ``interval`` seconds, else the unit fails for good."""

    burst: int
    interval: float


@dataclass(frozen=True, slots=True)
class Rate:
    """Token bucket for accept mode: ``per_second`` refill, ``burst`` capacity."""

    per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class Network:
    """An allow/deny entry: an IP network, or a unix peer uid (``uid:N``)."""

    text: str
    network: str | None = None  # ipaddress.ip_network(...).compressed form, or None for uid
    uid: int | None = None


class Builtin(enum.Enum):
    """Services the daemon answers itself, as xinetd's INTERNAL ones (RFC 862, 863, 867, 864, 868)."""

    ECHO = "echo"
    DISCARD = "discard"
    DAYTIME = "daytime"
    CHARGEN = "chargen"
    TIME = "time"


@dataclass(frozen=True, slots=True)
class FileRef:
    """A file the configuration names (``environment_files``, banners), read when it is loaded.

    ``content`` is what was read, so a reload sees a changed file as a changed unit.
    ``optional``: systemd's ``-PATH``: a missing file is no error.
    """

    path: str
    optional: bool = False
    content: bytes = b""
    location: Location | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Process:
    """How a unit's children are executed (all modes)."""

    exec: tuple[str, ...]
    user: str | None = None
    group: str | None = None
    supplementary_groups: tuple[str, ...] = ()
    working_directory: str | None = None
    environment: tuple[tuple[str, str], ...] = ()
    pass_environment: tuple[str, ...] = ()
    # KEY=VALUE files, applied after pass_environment and before environment
    environment_files: tuple[FileRef, ...] = ()
    umask: int | None = None
    nice: int | None = None
    # rlimit name ("nofile", ...) -> (soft, hard); -1 means RLIM_INFINITY
    limits: tuple[tuple[str, int, int], ...] = ()
    stderr: Stderr = Stderr.INHERIT
    stop_signal: int = int(signal.SIGTERM)
    stop_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class Unit:
    name: str
    listen: tuple[Listen, ...]
    process: Process
    mode: Mode = Mode.SERVICE
    description: str = ""
    enabled: bool = True
    pass_: Pass = Pass.FDS  # YAML key "pass"; accept mode defaults to STDIO
    start: Start = Start.ON_DEMAND
    restart: Restart = Restart.ON_FAILURE
    restart_delay: float = 0.1
    restart_delay_max: float = 30.0
    restart_reset: float = 60.0
    start_limit: StartLimit | None = None
    ready: Ready = Ready.EXEC
    start_timeout: float = 90.0
    watchdog: float | None = None
    fd_store_max: int = 64
    # mode: accept
    max_connections: int = 256
    max_connections_per_source: int | None = None
    rate: Rate | None = None
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    log_connections: bool = True
    banner: FileRef | None = None  # sent to every accepted connection first
    banner_success: FileRef | None = None  # after admission, before the child runs
    banner_fail: FileRef | None = None  # to a refused connection, before it is closed
    # local-time windows (minutes of the day, start inclusive, end exclusive; start > end wraps midnight)
    access_times: tuple[tuple[int, int], ...] = ()
    builtin: Builtin | None = None  # served by the daemon instead of exec
    # mode: proxy
    backend: InetAddress | str | None = None  # host:port or a unix path ("@name": abstract)
    idle_stop: float | None = None  # stop the backend after this long without a client
    proxy_protocol: ProxyProtocol | None = None
    udp_idle: float = 60.0  # a udp client's flow ends after this long without a datagram
    # mode: pool
    workers: int = 1
    settle: float = 1.0
    max_surge: int = 1
    location: Location | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class MainConfig:
    include: tuple[str, ...] = ("sockets.d/*.yaml",)
    control_socket: str = DEFAULT_CONTROL_SOCKET
    control_mode: int = 0o600
    log_format: LogFormat | None = None  # None: json unless stderr is a terminal
    log_level: str = "info"
    # metrics.listen: host:port (InetAddress) or a unix path; None: no metrics endpoint
    metrics_listen: InetAddress | str | None = None
    # Become a child subreaper (always as PID 1): orphans of the units' processes are reaped here.
    subreaper: bool = False
    # Give each service, pool worker and proxy backend its own cgroup v2 where one is writable.
    cgroups: bool = True


@dataclass(frozen=True, slots=True)
class Config:
    main: MainConfig
    units: tuple[Unit, ...]
    # the file or directory it was read from, for messages
    source: str = ""

    def unit(self, name: str) -> Unit | None:
        for unit in self.units:
            if unit.name == name:
                return unit
        return None
