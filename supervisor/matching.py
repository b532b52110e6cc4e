"""Matching an inherited fd against a listen entry (the daemon's own ``LISTEN_FDS``).

A service manager that started the daemon with sockets (systemd, or a
previous daemon) hands them over as fds; ``matches`` says whether one is what
``sockets.bind(listen)`` would have made, so it is adopted instead of bound.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat

from supervisor import sockopts, specials
from supervisor.model import InetAddress, Listen, ListenKind


def matches(fd: int, listen: Listen) -> bool:
    """Whether an inherited fd is what ``bind(listen)`` would have made.

    Compares what systemd compares when it re-matches sockets after a
    re-exec: family, type and protocol, the bound address (host, port, IPv6
    scope; unix path or abstract name) and, for stream and seqpacket, that the
    socket is listening. For IPv6 wildcard sockets the ``IPV6_V6ONLY`` setting
    must be the one the entry asks for, as it decides whether IPv4 is served.
    A fifo matches when the fd is a fifo and the entry's path is that very inode.
    Never raises for an fd that is closed or of another kind: that is False.
    """
    if listen.kind in specials.KINDS:
        return specials.matches(fd, listen)
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    if listen.kind is ListenKind.FIFO:
        if not stat.S_ISFIFO(st.st_mode) or not isinstance(listen.address, str):
            return False
        try:
            node = os.stat(listen.address)
        except OSError:
            return False
        return (node.st_dev, node.st_ino) == (st.st_dev, st.st_ino)
    if not stat.S_ISSOCK(st.st_mode):
        return False
    try:
        # A duplicate, so that nothing done here can close or alter the caller's fd.
        dup = os.dup(fd)
    except OSError:
        return False
    try:
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return False
    with sock:
        try:
            return _socket_matches(sock, listen)
        except OSError:
            return False


def _socket_matches(sock: socket.socket, listen: Listen) -> bool:
    sol = socket.SOL_SOCKET
    domain = sock.getsockopt(sol, sockopts.SO_DOMAIN)
    type_ = sock.getsockopt(sol, socket.SO_TYPE)
    if type_ != sockopts.SOCK_TYPE[listen.kind]:
        return False
    if type_ in sockopts.LISTENING_TYPES and not sock.getsockopt(sol, socket.SO_ACCEPTCONN):
        return False
    name = sock.getsockname()
    if listen.kind.is_unix:
        if domain != socket.AF_UNIX or not isinstance(listen.address, str):
            return False
        want = "\0" + listen.address[1:] if listen.address.startswith("@") else listen.address
        have = os.fsencode(name) if isinstance(name, str) else name
        return bool(have == os.fsencode(want))
    if domain not in (socket.AF_INET, socket.AF_INET6) or not isinstance(listen.address, InetAddress):
        return False
    want_proto = socket.IPPROTO_TCP if listen.kind is ListenKind.TCP else socket.IPPROTO_UDP
    if listen.protocol is not None:
        want_proto = sockopts.PROTOCOLS[listen.protocol]
    if sock.getsockopt(sol, sockopts.SO_PROTOCOL) != want_proto:
        return False
    addr = listen.address
    host, port = str(name[0]).split("%")[0], int(name[1])
    if port != addr.port:
        return False
    have_ip = ipaddress.ip_address(host)
    if addr.any_dual_stack:
        if domain == socket.AF_INET:
            # The fallback of a kernel without IPv6.
            return have_ip == ipaddress.IPv4Address("0.0.0.0") and not listen.ipv6_only
        want_v6only: bool | None = bool(listen.ipv6_only)
        if have_ip != ipaddress.IPv6Address("::"):
            return False
    else:
        if domain != addr.family or have_ip != ipaddress.ip_address(addr.host.split("%")[0]):
            return False
        if domain == socket.AF_INET6 and addr.scope_id and name[3] != addr.scope_id:
            return False
        want_v6only = listen.ipv6_only if domain == socket.AF_INET6 else None
    if want_v6only is not None:
        return bool(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)) == want_v6only
    return True
