"""Socket options: applying a listen entry's options to a socket, and retuning them in place.

Each option of ``model.LISTEN_OPTIONS`` is set here with the kernel's own
number (Linux's; the constants the socket module lacks are defined below), and
every refusal becomes ``Failed`` with the kernel's message and a hint;
``sockets`` turns that into the unit's located ``BindError``.
"""

from __future__ import annotations

import contextlib
import errno
import math
import socket
from collections.abc import Iterator

from supervisor.model import Listen, ListenKind

# --- Linux constants Python's socket module does not export (on every build) -------------
# Values from the kernel uapi headers; the socket module's own value wins where it has one.
IP_FREEBIND: int = getattr(socket, "IP_FREEBIND", 15)  # <linux/in.h>
IP_TRANSPARENT: int = getattr(socket, "IP_TRANSPARENT", 19)  # <linux/in.h>
IPV6_TRANSPARENT: int = getattr(socket, "IPV6_TRANSPARENT", 75)  # <linux/in6.h>
IPV6_FREEBIND: int = getattr(socket, "IPV6_FREEBIND", 78)  # <linux/in6.h>, Linux >= 4.15
# <asm-generic/socket.h>; alpha, mips, parisc and sparc number these differently.
SO_SNDBUFFORCE: int = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE: int = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_PASSCRED: int = getattr(socket, "SO_PASSCRED", 16)
SO_BINDTODEVICE: int = getattr(socket, "SO_BINDTODEVICE", 25)
SO_MARK: int = getattr(socket, "SO_MARK", 36)
SO_PASSSEC: int = getattr(socket, "SO_PASSSEC", 34)
SO_TIMESTAMP: int = getattr(socket, "SO_TIMESTAMP", 29)
SO_TIMESTAMPNS: int = getattr(socket, "SO_TIMESTAMPNS", 35)
IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO: int = getattr(socket, "IPV6_RECVPKTINFO", 49)
TCP_CONGESTION: int = getattr(socket, "TCP_CONGESTION", 13)
F_SETPIPE_SZ = 1031
# SocketProtocol=: the protocol a tcp or udp entry's socket is created with instead.
PROTOCOLS: dict[str, int] = {"sctp": 132, "mptcp": 262, "udplite": 136}
SO_DOMAIN: int = getattr(socket, "SO_DOMAIN", 39)
SO_PROTOCOL: int = getattr(socket, "SO_PROTOCOL", 38)
TCP_DEFER_ACCEPT: int = getattr(socket, "TCP_DEFER_ACCEPT", 9)  # <linux/tcp.h>

# The socket type of each kind.
SOCK_TYPE: dict[ListenKind, int] = {
    ListenKind.TCP: socket.SOCK_STREAM,
    ListenKind.UDP: socket.SOCK_DGRAM,
    ListenKind.UNIX: socket.SOCK_STREAM,
    ListenKind.UNIX_DGRAM: socket.SOCK_DGRAM,
    ListenKind.UNIX_SEQPACKET: socket.SOCK_SEQPACKET,
}
# Types that listen() and accept(); the others are read directly.
LISTENING_TYPES = frozenset({socket.SOCK_STREAM, socket.SOCK_SEQPACKET})


def is_set(value: object) -> bool:
    """Whether an option holds a value rather than its "unset" default (None, False, ())."""
    return value is not None and value is not False and value != ()


class Failed(Exception):
    """One step of binding failed; ``reason`` is the text the user reads."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def strerror(exc: OSError) -> str:
    # Some OSErrors from the socket module carry no errno ("AF_UNIX path too long").
    return exc.strerror or str(exc)


@contextlib.contextmanager
def step(what: str, hints: dict[int, str] | None = None) -> Iterator[None]:
    """Turn an ``OSError`` raised inside into ``Failed("what: strerror (hint)")``."""
    try:
        yield
    except OSError as exc:
        hint = (hints or {}).get(exc.errno or 0)
        reason = f"{what}: {strerror(exc)}" if what else strerror(exc)
        raise Failed(f"{reason} ({hint})" if hint else reason) from exc


NEEDS_NET_ADMIN = {errno.EPERM: "needs CAP_NET_ADMIN"}


def listen(sock: socket.socket, listen: Listen) -> None:
    if sock.type in LISTENING_TYPES:
        with step("listen", {errno.EADDRINUSE: "another socket is listening on it"}):
            sock.listen(listen.backlog)


def setopt(
    sock: socket.socket,
    level: int,
    option: int,
    value: int | bytes,
    name: str,
    hints: dict[int, str] | None = None,
) -> None:
    with step(f"cannot set {name}", hints):
        sock.setsockopt(level, option, value)


def set_ip_option(sock: socket.socket, v4: int, v6: int, value: int, name: str) -> None:
    """Set an option that IPv4 and IPv6 number differently (freebind, transparent)."""
    if sock.family == socket.AF_INET6:
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, v6, value)
            return
        except OSError as exc:
            # Kernels before the IPv6 spelling existed take the IPv4 one, which
            # sets the same flag and is honoured by IPv6 bind() too.
            if exc.errno != errno.ENOPROTOOPT:
                raise Failed(f"cannot set {name}: {strerror(exc)}{hint_eperm(exc)}") from exc
    setopt(sock, socket.IPPROTO_IP, v4, value, name, NEEDS_NET_ADMIN)


def hint_eperm(exc: OSError) -> str:
    return " (needs CAP_NET_ADMIN)" if exc.errno == errno.EPERM else ""


def seconds(value: float) -> int:
    """Whole seconds for the kernel, rounded up so that 0.5s does not become "off"."""
    return math.ceil(value) if value > 0 else 0


def set_buffer(sock: socket.socket, force: int, plain: int, size: int, name: str) -> None:
    # As root the FORCE variant lifts the net.core.[rw]mem_max cap; without
    # CAP_NET_ADMIN it fails with EPERM and the capped option is the best there is.
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except PermissionError:
        setopt(sock, socket.SOL_SOCKET, plain, size, name)
    except OSError as exc:
        raise Failed(f"cannot set {name}FORCE: {strerror(exc)}") from exc


def set_options(sock: socket.socket, listen: Listen) -> None:
    """The options that may be set at any time (before bind, or on an adopted socket)."""
    family = sock.family
    sol = socket.SOL_SOCKET
    if listen.receive_buffer is not None:
        set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, listen.receive_buffer, "SO_RCVBUF")
    if listen.send_buffer is not None:
        set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, listen.send_buffer, "SO_SNDBUF")
    if listen.mark is not None:
        setopt(sock, sol, SO_MARK, listen.mark, "SO_MARK", NEEDS_NET_ADMIN)
    if listen.transparent:
        # Before bind() it also allows binding a non-local address (TPROXY).
        set_ip_option(sock, IP_TRANSPARENT, IPV6_TRANSPARENT, 1, "IP_TRANSPARENT")
    if listen.ip_tos is not None:
        if family == socket.AF_INET6:
            setopt(sock, socket.IPPROTO_IPV6, socket.IPV6_TCLASS, listen.ip_tos, "IPV6_TCLASS")
        # On an AF_INET6 socket the IPv4 option still governs IPv4(-mapped)
        # peers of a dual-stack listener, so it is set for both families.
        setopt(sock, socket.IPPROTO_IP, socket.IP_TOS, listen.ip_tos, "IP_TOS")
    if listen.ip_ttl is not None:
        if family == socket.AF_INET6:
            setopt(sock, socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, listen.ip_ttl, "IPV6_UNICAST_HOPS")
        setopt(sock, socket.IPPROTO_IP, socket.IP_TTL, listen.ip_ttl, "IP_TTL")
    if listen.priority is not None:
        # After IP_TOS, which overwrites sk_priority with a value derived from the TOS:
        # an explicit priority wins. 0-6 for anyone, higher needs CAP_NET_ADMIN.
        setopt(sock, sol, socket.SO_PRIORITY, listen.priority, "SO_PRIORITY", NEEDS_NET_ADMIN)
    # TCP: set on the listener, inherited by every accepted connection.
    tcp = socket.IPPROTO_TCP
    if listen.nodelay is not None:
        setopt(sock, tcp, socket.TCP_NODELAY, int(listen.nodelay), "TCP_NODELAY")
    if listen.keepalive is not None:
        setopt(sock, sol, socket.SO_KEEPALIVE, int(listen.keepalive), "SO_KEEPALIVE")
    if listen.keepalive_time is not None:
        setopt(sock, tcp, socket.TCP_KEEPIDLE, seconds(listen.keepalive_time), "TCP_KEEPIDLE")
    if listen.keepalive_interval is not None:
        setopt(sock, tcp, socket.TCP_KEEPINTVL, seconds(listen.keepalive_interval), "TCP_KEEPINTVL")
    if listen.keepalive_probes is not None:
        setopt(sock, tcp, socket.TCP_KEEPCNT, listen.keepalive_probes, "TCP_KEEPCNT")
    if listen.defer_accept is not None:
        setopt(sock, tcp, TCP_DEFER_ACCEPT, seconds(listen.defer_accept), "TCP_DEFER_ACCEPT")
    if listen.broadcast:
        setopt(sock, sol, socket.SO_BROADCAST, 1, "SO_BROADCAST")
    if listen.pass_credentials:
        setopt(sock, sol, SO_PASSCRED, 1, "SO_PASSCRED")
    if listen.pass_security:
        setopt(sock, sol, SO_PASSSEC, 1, "SO_PASSSEC")
    if listen.pass_packet_info:
        if family == socket.AF_INET6:
            setopt(sock, socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1, "IPV6_RECVPKTINFO")
        setopt(sock, socket.IPPROTO_IP, IP_PKTINFO, 1, "IP_PKTINFO")
    if listen.timestamping is not None:
        option, name = (SO_TIMESTAMPNS, "SO_TIMESTAMPNS") if listen.timestamping == "ns" else (SO_TIMESTAMP,
                                                                                           "SO_TIMESTAMP")
        setopt(sock, sol, option, 1, name)
    if listen.tcp_congestion is not None:
        setopt(sock, tcp, TCP_CONGESTION, listen.tcp_congestion.encode(), "TCP_CONGESTION",
               {errno.ENOENT: "the kernel has no such congestion control (see "
                              "/proc/sys/net/ipv4/tcp_available_congestion_control)"})




def sysctl(name: str, index: int = 0) -> int:
    """One integer of ``/proc/sys/<name>`` (``index`` picks from a vector like tcp_rmem)."""
    with step(f"cannot read the default from /proc/sys/{name}"), open(f"/proc/sys/{name}") as f:
        return int(f.read().split()[index])


def reset_options(sock: socket.socket, old: Listen, new: Listen) -> None:
    """Give back to the kernel's defaults the options ``old`` set and ``new`` does not."""

    def dropped(name: str) -> bool:
        return is_set(getattr(old, name)) and not is_set(getattr(new, name))

    sol, tcp = socket.SOL_SOCKET, socket.IPPROTO_TCP
    six = sock.family == socket.AF_INET6
    stream = sock.type == socket.SOCK_STREAM and old.kind is ListenKind.TCP
    if dropped("receive_buffer"):
        size = sysctl("net/ipv4/tcp_rmem", 1) if stream else sysctl("net/core/rmem_default")
        set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, size // 2, "SO_RCVBUF")  # the kernel doubles it
    if dropped("send_buffer"):
        size = sysctl("net/ipv4/tcp_wmem", 1) if stream else sysctl("net/core/wmem_default")
        set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, size // 2, "SO_SNDBUF")
    if dropped("mark"):
        setopt(sock, sol, SO_MARK, 0, "SO_MARK", NEEDS_NET_ADMIN)
    if dropped("priority"):
        setopt(sock, sol, socket.SO_PRIORITY, 0, "SO_PRIORITY")
    if old.ip_tos is not None:
        # Always back to 0 first: the kernel derives SO_PRIORITY from the TOS only
        # when the TOS changes, so re-applying an unchanged TOS would not redo it.
        if six:
            setopt(sock, socket.IPPROTO_IPV6, socket.IPV6_TCLASS, 0, "IPV6_TCLASS")
        setopt(sock, socket.IPPROTO_IP, socket.IP_TOS, 0, "IP_TOS")
    if dropped("ip_ttl"):
        if six:  # -1: the route's default
            setopt(sock, socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, -1, "IPV6_UNICAST_HOPS")
        setopt(sock, socket.IPPROTO_IP, socket.IP_TTL, -1, "IP_TTL")
    if dropped("transparent"):
        set_ip_option(sock, IP_TRANSPARENT, IPV6_TRANSPARENT, 0, "IP_TRANSPARENT")
    if dropped("nodelay"):
        setopt(sock, tcp, socket.TCP_NODELAY, 0, "TCP_NODELAY")
    if dropped("keepalive"):
        setopt(sock, sol, socket.SO_KEEPALIVE, 0, "SO_KEEPALIVE")
    if dropped("keepalive_time"):
        setopt(sock, tcp, socket.TCP_KEEPIDLE, sysctl("net/ipv4/tcp_keepalive_time"), "TCP_KEEPIDLE")
    if dropped("keepalive_interval"):
        setopt(sock, tcp, socket.TCP_KEEPINTVL, sysctl("net/ipv4/tcp_keepalive_intvl"), "TCP_KEEPINTVL")
    if dropped("keepalive_probes"):
        setopt(sock, tcp, socket.TCP_KEEPCNT, sysctl("net/ipv4/tcp_keepalive_probes"), "TCP_KEEPCNT")
    if dropped("defer_accept"):
        setopt(sock, tcp, TCP_DEFER_ACCEPT, 0, "TCP_DEFER_ACCEPT")
    if dropped("broadcast"):
        setopt(sock, sol, socket.SO_BROADCAST, 0, "SO_BROADCAST")
    if dropped("pass_credentials"):
        setopt(sock, sol, SO_PASSCRED, 0, "SO_PASSCRED")
    if dropped("pass_security"):
        setopt(sock, sol, SO_PASSSEC, 0, "SO_PASSSEC")
    if dropped("pass_packet_info"):
        if six:
            setopt(sock, socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 0, "IPV6_RECVPKTINFO")
        setopt(sock, socket.IPPROTO_IP, IP_PKTINFO, 0, "IP_PKTINFO")
    if old.timestamping is not None and old.timestamping != new.timestamping:
        setopt(sock, sol, SO_TIMESTAMPNS if old.timestamping == "ns" else SO_TIMESTAMP, 0, "SO_TIMESTAMP")
    if dropped("tcp_congestion"):
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
            default = f.read().strip()
        setopt(sock, tcp, TCP_CONGESTION, default.encode(), "TCP_CONGESTION")
