"""Binding listen entries: every kind, every option, as systemd does for ``.socket`` units.

Theory of operation
-------------------
A ``Listen`` (frozen config) becomes a ``Bound``: an open, CLOEXEC, non-blocking fd
plus the ``socket.socket`` that owns it (``None`` for a fifo). ``bind`` does it from
scratch; ``adopt`` wraps an fd inherited from systemd (``LISTEN_FDS``) after
``matches`` has checked that the fd is what the entry would have bound.

Binding follows systemd's ``socket_address_listen()`` and ``socket_apply_socket_options()``
in order: create the socket, set the options the kernel only honours before
``bind()`` (``IPV6_V6ONLY``, ``SO_BINDTODEVICE``, ``SO_REUSEPORT``, freebind,
``SO_REUSEADDR``), then every other option (still before ``bind()``, so that
``SO_RCVBUF`` is in place when the kernel picks the TCP window scale of the
first connection), then ``bind()`` and ``listen()``. File-system nodes (unix
sockets, fifos) are then given their mode, owner and symlinks.

``retune`` applies a changed entry to a bound fd in place (reload keeps the fd).

Where this differs from systemd, it is on the side of never harming another
process and never failing silently:

* systemd unlinks whatever sits at a unix socket path before binding; here a
  socket node is probed first and only a *stale* one (nobody answers) is
  replaced. A live one, or anything that is not a socket, is a ``BindError``.
* A node is removed on close only if it is still the very inode this process
  created (dev and inode recorded at bind time), so a node that someone else
  has bound at the same path since is never unlinked; and never for an
  adopted fd, whose node belongs to whoever bound it (see ``Bound.close``).
* ``SO_REUSEADDR`` is set for TCP only; on UDP it would let a second socket
  share the port without anyone noticing.
* An option the kernel refuses is a ``BindError``, not a logged warning.

Every failure is a ``BindError(unit, listen.display, reason)`` whose reason is
the kernel's message plus a hint; nothing half-made survives it (the fd is
closed, a node created by the failed call is removed). Options that do not
apply to a kind (``nodelay`` on a unix socket) are refused rather than ignored,
so a typo in a unit never silently does nothing.

Linux only: the option numbers below are Linux's.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import ipaddress
import math
import os
import pwd
import socket
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from supervisor import addresses, fsnodes
from supervisor.addresses import format_sockaddr
from supervisor.errors import BindError
from supervisor.model import BIND_TIME_OPTIONS, LISTEN_OPTIONS, InetAddress, Listen, ListenKind

__all__ = [
    "Bound",
    "adopt",
    "bind",
    "bind_all",
    "format_sockaddr",
    "matches",
    "retune",
    "set_blocking",
]

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
SO_DOMAIN: int = getattr(socket, "SO_DOMAIN", 39)
SO_PROTOCOL: int = getattr(socket, "SO_PROTOCOL", 38)
TCP_DEFER_ACCEPT: int = getattr(socket, "TCP_DEFER_ACCEPT", 9)  # <linux/tcp.h>

_UNIX_PATH_MAX = addresses.SUN_PATH_MAX

_SOCK_TYPE: dict[ListenKind, int] = {
    ListenKind.TCP: socket.SOCK_STREAM,
    ListenKind.UDP: socket.SOCK_DGRAM,
    ListenKind.UNIX: socket.SOCK_STREAM,
    ListenKind.UNIX_DGRAM: socket.SOCK_DGRAM,
    ListenKind.UNIX_SEQPACKET: socket.SOCK_SEQPACKET,
}
# Types that listen() and accept(); the others are read directly.
_LISTENING_TYPES = frozenset({socket.SOCK_STREAM, socket.SOCK_SEQPACKET})

# Options whose default is "unset" (None, False, ()): setting one on a kind it
# does not apply to is refused. (name, backlog, mode, directory_mode and
# remove_on_stop always carry a default, so only the config can tell.)
_APPLIES_TO = {name: o.kinds for name, o in LISTEN_OPTIONS.items() if o.on_socket}


class _Failed(Exception):
    """One step of binding failed; ``reason`` is the text the user reads."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _strerror(exc: OSError) -> str:
    # Some OSErrors from the socket module carry no errno ("AF_UNIX path too long").
    return exc.strerror or str(exc)


@contextlib.contextmanager
def _step(what: str, hints: dict[int, str] | None = None) -> Iterator[None]:
    """Turn an ``OSError`` raised inside into ``_Failed("what: strerror (hint)")``."""
    try:
        yield
    except OSError as exc:
        hint = (hints or {}).get(exc.errno or 0)
        reason = f"{what}: {_strerror(exc)}" if what else _strerror(exc)
        raise _Failed(f"{reason} ({hint})" if hint else reason) from exc


_NEEDS_NET_ADMIN = {errno.EPERM: "needs CAP_NET_ADMIN"}


@contextlib.contextmanager
def _path_step() -> Iterator[None]:
    """Turn a refused or failed path operation (``fsnodes.PathError``) into ``_Failed``."""
    try:
        yield
    except fsnodes.PathError as exc:
        raise _Failed(exc.reason) from exc


# --- the bound object ----------------------------------------------------------------------


@dataclass(eq=False)
class Bound:
    """A listening fd made from one ``Listen`` entry (bound here, or adopted).

    ``fd`` is owned by this object: only ``close`` closes it. For sockets ``sock``
    owns the same fd (``sock.fileno() == fd``); for a fifo ``sock`` is None and
    ``fd`` is the fifo opened ``O_RDWR | O_NONBLOCK`` (read-write, so it never
    sees EOF when the last writer goes away).
    """

    listen: Listen
    fd: int
    sock: socket.socket | None
    adopted: bool = False
    # (st_dev, st_ino) of the unix socket node or fifo this process created or
    # reused; close() unlinks the path only while it is still this inode.
    _node: tuple[int, int] | None = field(default=None, init=False, repr=False)
    _closed: bool = field(default=False, init=False, repr=False)

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, *, remove: bool = True) -> None:
        """Close the fd; with ``remove`` and ``listen.remove_on_stop``, unlink the node and symlinks.

        Idempotent. Removal is best effort: close runs on the way out, where a
        node that has vanished or become unremovable must not stop the
        remaining fds from being closed.

        Adopted fds never remove anything (a deliberate difference from
        systemd, which removes its own nodes on stop): an inherited socket was
        bound by someone else, usually systemd's ``.socket`` unit, which keeps
        the fd across our restarts and passes it to the next start; unlinking
        its node here would leave that fd unreachable. Its owner removes the
        node by its own ``RemoveOnStop=``.
        """
        if self._closed:
            return
        self._closed = True
        if self.sock is not None:
            self.sock.close()
        else:
            os.close(self.fd)
        if remove and self.listen.remove_on_stop and not self.adopted:
            self._remove_nodes()

    def _discard(self) -> None:
        """Undo a half-made bind: close and remove what this process created, whatever the config."""
        if not self._closed:
            self._closed = True
            if self.sock is not None:
                self.sock.close()
            else:
                os.close(self.fd)
        self._remove_nodes()

    def _remove_nodes(self) -> None:
        path = _node_path(self.listen)
        if path is None or self._node is None:
            return
        for link in self.listen.symlinks:
            # Only our symlink that still points at our node is ours to remove.
            fsnodes.remove_symlink(link, path)
        # Reached without following planted links, and only while it is still our inode.
        fsnodes.remove_node(path, self._node)

    def local_address(self) -> str:
        """The bound address, human-readable: ``127.0.0.1:8080``, ``[::]:8080``, ``/run/x.sock``, ``@name``."""
        if self.sock is None or self._closed:
            return str(self.listen.address)
        try:
            name = self.sock.getsockname()
        except OSError:
            return str(self.listen.address)
        return format_sockaddr(self.sock.family, name)


# --- public API ----------------------------------------------------------------------------


def bind(listen: Listen, *, unit: str) -> Bound:
    """Create, configure and bind one listen entry.

    Args:
        listen: the entry.
        unit: the unit's name, for the error message.

    Returns:
        A ``Bound`` owning a CLOEXEC, non-blocking fd: listening for stream and
        seqpacket kinds, bound for datagram kinds, an open fifo for ``fifo``.

    Raises:
        BindError: naming ``unit`` and ``listen.display``; nothing is left open
            and no node created by this call is left behind.
    """
    try:
        _check_applicable(listen)
        if listen.kind is ListenKind.FIFO:
            return _bind_fifo(listen)
        if listen.kind.is_inet:
            return _bind_inet(listen)
        return _bind_unix(listen)
    except _Failed as exc:
        raise BindError(unit, listen.display, exc.reason, listen.location) from exc.__cause__
    except OSError as exc:  # a step not wrapped in _step(): still a BindError, never a traceback
        raise BindError(unit, listen.display, _strerror(exc), listen.location) from exc


def bind_all(listens: Sequence[Listen], *, unit: str) -> list[Bound]:
    """Bind every entry, in order, or none: on a failure the ones already bound are undone.

    Raises:
        BindError: from the first entry that failed.
    """
    bound: list[Bound] = []
    try:
        for listen in listens:
            bound.append(bind(listen, unit=unit))
    except BaseException:
        for item in reversed(bound):
            # This call created these nodes, so it removes them whatever
            # remove_on_stop says: all or nothing.
            item._discard()
        raise
    return bound


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


def adopt(fd: int, listen: Listen, *, unit: str = "?") -> Bound:
    """Wrap an inherited fd for ``listen`` (call ``matches`` first).

    Makes the fd CLOEXEC and non-blocking and applies the options that still
    mean something after ``bind()``: buffers, mark, priority, TOS/TTL,
    transparent, the TCP knobs, broadcast, passcred; for nodes the mode, owner
    and symlinks. Options that only act at ``bind()`` (``ipv6_only``,
    ``freebind``, ``reuse_port``, ``bind_to_device``) and ``backlog`` stay as
    the fd's creator set them.

    Args:
        fd: the inherited fd. On success the returned ``Bound`` owns it; on
            failure the caller still does (it is not closed).
        listen: the entry it matched.
        unit: the unit's name, for the error message (an addition to the
            contract, keyword-only and optional).

    Raises:
        BindError: an option could not be applied.
    """
    try:
        _check_applicable(listen)
        if listen.kind is ListenKind.FIFO:
            return _adopt_fifo(fd, listen)
        sock = socket.socket(fileno=fd)
        try:
            sock.set_inheritable(False)
            sock.setblocking(False)
            _set_options(sock, listen)
            bound = Bound(listen, fd, sock, adopted=True)
            path = _node_path(listen)
            if path is not None:
                uid, gid = _resolve_owner(listen)
                with _path_step():
                    # Touch the node only if it is a socket: the path may have
                    # been replaced since the fd was bound.
                    bound._node = fsnodes.set_node_mode(path, None, mode=listen.mode, uid=uid, gid=gid,
                                                        missing_ok=True)
                _make_symlinks(path, listen)
        except BaseException:
            sock.detach()  # the fd stays the caller's
            raise
        return bound
    except _Failed as exc:
        raise BindError(unit, listen.display, exc.reason, listen.location) from exc.__cause__
    except OSError as exc:
        raise BindError(unit, listen.display, _strerror(exc), listen.location) from exc


def retune(bound: Bound, listen: Listen, *, unit: str = "?") -> None:
    """Give a bound (or adopted) fd the options of a changed entry in place, without re-binding (reload).

    ``listen`` must have the same kind and address as ``bound.listen``; the
    options ``adopt`` applies change, and so do ``backlog`` (``listen()`` again),
    the node's mode and owner, and ``symlinks``. An option the old entry set and
    the new one leaves unset goes back to the kernel's default (for buffers and
    the keepalive knobs, the system-wide sysctl value: a socket cannot forget
    a value once set). ``ipv6_only``, ``freebind``, ``reuse_port`` and
    ``bind_to_device`` act at ``bind()`` only: changing them needs a new socket.
    On success ``bound.listen`` is ``listen``.

    Raises:
        BindError: a bind-time option or the address differs, or an option
            could not be applied (``bound.listen`` is then unchanged).
    """
    old = bound.listen
    try:
        if old.kind is not listen.kind or old.address != listen.address:
            raise _Failed(f"cannot retune {old.display} into {listen.display}: the address differs")
        fixed = [name for name in _BIND_TIME_OPTIONS if getattr(old, name) != getattr(listen, name)]
        if fixed:
            raise _Failed(f"{', '.join(fixed)} can only change with a new socket")
        _check_applicable(listen)
        if bound.sock is not None:
            _reset_options(bound.sock, old, listen)
            _set_options(bound.sock, listen)
            if listen.backlog != old.backlog:
                _listen(bound.sock, listen)
        path = _node_path(listen)
        if path is not None:
            if (listen.mode, listen.user, listen.group) != (old.mode, old.user, old.group):
                uid, gid = _resolve_owner(listen)
                # Back to the daemon's own ids where the owner is no longer configured, as a fresh bind.
                uid = os.geteuid() if uid == -1 and old.user is not None else uid
                gid = os.getegid() if gid == -1 and (old.user, old.group) != (None, None) else gid
                if bound.sock is None:
                    _own_fifo(bound.fd, path, listen, uid, gid)
                else:
                    _own_socket_node(bound, path, listen, uid, gid)
            for link in set(old.symlinks) - set(listen.symlinks):
                fsnodes.remove_symlink(link, path)
            _make_symlinks(path, listen)
    except _Failed as exc:
        raise BindError(unit, listen.display, exc.reason, listen.location) from exc.__cause__
    except OSError as exc:
        raise BindError(unit, listen.display, _strerror(exc), listen.location) from exc
    bound.listen = listen


def set_blocking(fd: int, blocking: bool) -> None:
    """Set or clear ``O_NONBLOCK`` on ``fd`` (the daemon makes ``pass: stdio`` fds blocking)."""
    os.set_blocking(fd, blocking)


# --- checks --------------------------------------------------------------------------------


def _is_set(value: object) -> bool:
    return value is not None and value is not False and value != ()


def _check_applicable(listen: Listen) -> None:
    wrong = [name for name, kinds in _APPLIES_TO.items() if listen.kind not in kinds and _is_set(getattr(listen, name))]
    if _is_abstract(listen):
        wrong += [name for name in ("user", "group", "symlinks") if _is_set(getattr(listen, name))]
    if wrong:
        what = "abstract unix sockets" if _is_abstract(listen) else f"{listen.kind.value} listeners"
        raise _Failed(f"{', '.join(wrong)} does not apply to {what}")


def _is_abstract(listen: Listen) -> bool:
    return listen.kind.is_unix and isinstance(listen.address, str) and listen.address.startswith("@")


def _node_path(listen: Listen) -> str | None:
    """The file-system path of the entry's node, or None (inet, abstract)."""
    if listen.kind.is_inet or _is_abstract(listen) or not isinstance(listen.address, str):
        return None
    return listen.address


def _inet_address(listen: Listen) -> InetAddress:
    if not isinstance(listen.address, InetAddress):
        raise _Failed(f"{listen.kind.value} needs an IP address, not {listen.address!r}")
    return listen.address


def _path_address(listen: Listen) -> str:
    if not isinstance(listen.address, str):
        raise _Failed(f"{listen.kind.value} needs a path, not {listen.address}")
    return listen.address


# --- inet ----------------------------------------------------------------------------------


def _new_socket(family: int, type_: int) -> socket.socket:
    """A new socket, CLOEXEC (Python's default, PEP 446) and non-blocking (as systemd passes them)."""
    sock = socket.socket(family, type_)
    sock.setblocking(False)
    return sock


def _open_inet(listen: Listen, addr: InetAddress) -> tuple[socket.socket, tuple[str, int] | tuple[str, int, int, int]]:
    """The socket for an inet entry and the address to bind it to."""
    type_ = _SOCK_TYPE[listen.kind]
    if addr.any_dual_stack:
        try:
            return _new_socket(socket.AF_INET6, type_), ("::", addr.port, 0, 0)
        except OSError as exc:
            # A kernel without IPv6 serves a bare port on IPv4 alone, as systemd
            # does -- unless the entry asked for IPv6 explicitly.
            if exc.errno != errno.EAFNOSUPPORT or listen.ipv6_only:
                raise _Failed(f"cannot create an IPv6 socket: {_strerror(exc)}") from exc
        with _step("cannot create an IPv4 socket"):
            return _new_socket(socket.AF_INET, type_), ("0.0.0.0", addr.port)
    with _step("cannot create socket", {errno.EAFNOSUPPORT: "the kernel has no support for it"}):
        sock = _new_socket(addr.family, type_)
    if addr.family == socket.AF_INET6:
        return sock, (addr.host, addr.port, 0, addr.scope_id)
    return sock, (addr.host, addr.port)


def _bind_inet(listen: Listen) -> Bound:
    addr = _inet_address(listen)
    sock, sockaddr = _open_inet(listen, addr)
    try:
        family = sock.family
        # Options the kernel only honours before bind(), in systemd's order.
        if family == socket.AF_INET6:
            v6only = bool(listen.ipv6_only) if addr.any_dual_stack else listen.ipv6_only
            if v6only is not None:
                _setopt(sock, socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only), "IPV6_V6ONLY")
        if listen.bind_to_device is not None:
            _setopt(
                sock,
                socket.SOL_SOCKET,
                SO_BINDTODEVICE,
                listen.bind_to_device.encode(),
                "SO_BINDTODEVICE",
                {errno.ENODEV: "no such network interface", **_NEEDS_NET_ADMIN},
            )
        if listen.reuse_port:
            _setopt(sock, socket.SOL_SOCKET, socket.SO_REUSEPORT, 1, "SO_REUSEPORT")
        if listen.freebind:
            _set_ip_option(sock, IP_FREEBIND, IPV6_FREEBIND, 1, "IP_FREEBIND")
        if listen.kind is ListenKind.TCP:
            # TIME_WAIT connections of a previous run must not block the port (as systemd).
            # Not for UDP: there SO_REUSEADDR lets a second socket share the port silently.
            _setopt(sock, socket.SOL_SOCKET, socket.SO_REUSEADDR, 1, "SO_REUSEADDR")
        _set_options(sock, listen)
        port_hint = (
            "ports below 1024 need root or CAP_NET_BIND_SERVICE"
            if addr.port < 1024
            else "permission denied by the kernel or a security module"
        )
        with _step(
            "",
            {
                errno.EADDRINUSE: "another socket is bound to it; `ss -lnp` shows which process",
                errno.EADDRNOTAVAIL: "no local interface has this address; freebind: true binds it anyway",
                errno.EACCES: port_hint,
            },
        ):
            sock.bind(sockaddr)
        _listen(sock, listen)
    except BaseException:
        sock.close()
        raise
    return Bound(listen, sock.fileno(), sock)


def _listen(sock: socket.socket, listen: Listen) -> None:
    if sock.type in _LISTENING_TYPES:
        with _step("listen", {errno.EADDRINUSE: "another socket is listening on it"}):
            sock.listen(listen.backlog)


def _setopt(
    sock: socket.socket,
    level: int,
    option: int,
    value: int | bytes,
    name: str,
    hints: dict[int, str] | None = None,
) -> None:
    with _step(f"cannot set {name}", hints):
        sock.setsockopt(level, option, value)


def _set_ip_option(sock: socket.socket, v4: int, v6: int, value: int, name: str) -> None:
    """Set an option that IPv4 and IPv6 number differently (freebind, transparent)."""
    if sock.family == socket.AF_INET6:
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, v6, value)
            return
        except OSError as exc:
            # Kernels before the IPv6 spelling existed take the IPv4 one, which
            # sets the same flag and is honoured by IPv6 bind() too.
            if exc.errno != errno.ENOPROTOOPT:
                raise _Failed(f"cannot set {name}: {_strerror(exc)}{_hint_eperm(exc)}") from exc
    _setopt(sock, socket.IPPROTO_IP, v4, value, name, _NEEDS_NET_ADMIN)


def _hint_eperm(exc: OSError) -> str:
    return " (needs CAP_NET_ADMIN)" if exc.errno == errno.EPERM else ""


def _seconds(value: float) -> int:
    """Whole seconds for the kernel, rounded up so that 0.5s does not become "off"."""
    return math.ceil(value) if value > 0 else 0


def _set_buffer(sock: socket.socket, force: int, plain: int, size: int, name: str) -> None:
    # As root the FORCE variant lifts the net.core.[rw]mem_max cap; without
    # CAP_NET_ADMIN it fails with EPERM and the capped option is the best there is.
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except PermissionError:
        _setopt(sock, socket.SOL_SOCKET, plain, size, name)
    except OSError as exc:
        raise _Failed(f"cannot set {name}FORCE: {_strerror(exc)}") from exc


def _set_options(sock: socket.socket, listen: Listen) -> None:
    """The options that may be set at any time (before bind, or on an adopted socket)."""
    family = sock.family
    sol = socket.SOL_SOCKET
    if listen.receive_buffer is not None:
        _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, listen.receive_buffer, "SO_RCVBUF")
    if listen.send_buffer is not None:
        _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, listen.send_buffer, "SO_SNDBUF")
    if listen.mark is not None:
        _setopt(sock, sol, SO_MARK, listen.mark, "SO_MARK", _NEEDS_NET_ADMIN)
    if listen.transparent:
        # Before bind() it also allows binding a non-local address (TPROXY).
        _set_ip_option(sock, IP_TRANSPARENT, IPV6_TRANSPARENT, 1, "IP_TRANSPARENT")
    if listen.ip_tos is not None:
        if family == socket.AF_INET6:
            _setopt(sock, socket.IPPROTO_IPV6, socket.IPV6_TCLASS, listen.ip_tos, "IPV6_TCLASS")
        # On an AF_INET6 socket the IPv4 option still governs IPv4(-mapped)
        # peers of a dual-stack listener, so it is set for both families.
        _setopt(sock, socket.IPPROTO_IP, socket.IP_TOS, listen.ip_tos, "IP_TOS")
    if listen.ip_ttl is not None:
        if family == socket.AF_INET6:
            _setopt(sock, socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, listen.ip_ttl, "IPV6_UNICAST_HOPS")
        _setopt(sock, socket.IPPROTO_IP, socket.IP_TTL, listen.ip_ttl, "IP_TTL")
    if listen.priority is not None:
        # After IP_TOS, which overwrites sk_priority with a value derived from the TOS:
        # an explicit priority wins. 0-6 for anyone, higher needs CAP_NET_ADMIN.
        _setopt(sock, sol, socket.SO_PRIORITY, listen.priority, "SO_PRIORITY", _NEEDS_NET_ADMIN)
    # TCP: set on the listener, inherited by every accepted connection.
    tcp = socket.IPPROTO_TCP
    if listen.nodelay is not None:
        _setopt(sock, tcp, socket.TCP_NODELAY, int(listen.nodelay), "TCP_NODELAY")
    if listen.keepalive is not None:
        _setopt(sock, sol, socket.SO_KEEPALIVE, int(listen.keepalive), "SO_KEEPALIVE")
    if listen.keepalive_time is not None:
        _setopt(sock, tcp, socket.TCP_KEEPIDLE, _seconds(listen.keepalive_time), "TCP_KEEPIDLE")
    if listen.keepalive_interval is not None:
        _setopt(sock, tcp, socket.TCP_KEEPINTVL, _seconds(listen.keepalive_interval), "TCP_KEEPINTVL")
    if listen.keepalive_probes is not None:
        _setopt(sock, tcp, socket.TCP_KEEPCNT, listen.keepalive_probes, "TCP_KEEPCNT")
    if listen.defer_accept is not None:
        _setopt(sock, tcp, TCP_DEFER_ACCEPT, _seconds(listen.defer_accept), "TCP_DEFER_ACCEPT")
    if listen.broadcast:
        _setopt(sock, sol, socket.SO_BROADCAST, 1, "SO_BROADCAST")
    if listen.pass_credentials:
        _setopt(sock, sol, SO_PASSCRED, 1, "SO_PASSCRED")


_BIND_TIME_OPTIONS = BIND_TIME_OPTIONS


def _sysctl(name: str, index: int = 0) -> int:
    """One integer of ``/proc/sys/<name>`` (``index`` picks from a vector like tcp_rmem)."""
    with _step(f"cannot read the default from /proc/sys/{name}"), open(f"/proc/sys/{name}") as f:
        return int(f.read().split()[index])


def _reset_options(sock: socket.socket, old: Listen, new: Listen) -> None:
    """Give back to the kernel's defaults the options ``old`` set and ``new`` does not."""

    def dropped(name: str) -> bool:
        return _is_set(getattr(old, name)) and not _is_set(getattr(new, name))

    sol, tcp = socket.SOL_SOCKET, socket.IPPROTO_TCP
    six = sock.family == socket.AF_INET6
    stream = sock.type == socket.SOCK_STREAM and old.kind is ListenKind.TCP
    if dropped("receive_buffer"):
        size = _sysctl("net/ipv4/tcp_rmem", 1) if stream else _sysctl("net/core/rmem_default")
        _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, size // 2, "SO_RCVBUF")  # the kernel doubles it
    if dropped("send_buffer"):
        size = _sysctl("net/ipv4/tcp_wmem", 1) if stream else _sysctl("net/core/wmem_default")
        _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, size // 2, "SO_SNDBUF")
    if dropped("mark"):
        _setopt(sock, sol, SO_MARK, 0, "SO_MARK", _NEEDS_NET_ADMIN)
    if dropped("priority"):
        _setopt(sock, sol, socket.SO_PRIORITY, 0, "SO_PRIORITY")
    if old.ip_tos is not None:
        # Always back to 0 first: the kernel derives SO_PRIORITY from the TOS only
        # when the TOS changes, so re-applying an unchanged TOS would not redo it.
        if six:
            _setopt(sock, socket.IPPROTO_IPV6, socket.IPV6_TCLASS, 0, "IPV6_TCLASS")
        _setopt(sock, socket.IPPROTO_IP, socket.IP_TOS, 0, "IP_TOS")
    if dropped("ip_ttl"):
        if six:  # -1: the route's default
            _setopt(sock, socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, -1, "IPV6_UNICAST_HOPS")
        _setopt(sock, socket.IPPROTO_IP, socket.IP_TTL, -1, "IP_TTL")
    if dropped("transparent"):
        _set_ip_option(sock, IP_TRANSPARENT, IPV6_TRANSPARENT, 0, "IP_TRANSPARENT")
    if dropped("nodelay"):
        _setopt(sock, tcp, socket.TCP_NODELAY, 0, "TCP_NODELAY")
    if dropped("keepalive"):
        _setopt(sock, sol, socket.SO_KEEPALIVE, 0, "SO_KEEPALIVE")
    if dropped("keepalive_time"):
        _setopt(sock, tcp, socket.TCP_KEEPIDLE, _sysctl("net/ipv4/tcp_keepalive_time"), "TCP_KEEPIDLE")
    if dropped("keepalive_interval"):
        _setopt(sock, tcp, socket.TCP_KEEPINTVL, _sysctl("net/ipv4/tcp_keepalive_intvl"), "TCP_KEEPINTVL")
    if dropped("keepalive_probes"):
        _setopt(sock, tcp, socket.TCP_KEEPCNT, _sysctl("net/ipv4/tcp_keepalive_probes"), "TCP_KEEPCNT")
    if dropped("defer_accept"):
        _setopt(sock, tcp, TCP_DEFER_ACCEPT, 0, "TCP_DEFER_ACCEPT")
    if dropped("broadcast"):
        _setopt(sock, sol, socket.SO_BROADCAST, 0, "SO_BROADCAST")
    if dropped("pass_credentials"):
        _setopt(sock, sol, SO_PASSCRED, 0, "SO_PASSCRED")


# --- unix sockets --------------------------------------------------------------------------


def _bind_unix(listen: Listen) -> Bound:
    address = _path_address(listen)
    type_ = _SOCK_TYPE[listen.kind]
    abstract = address.startswith("@")
    sockaddr = "\0" + address[1:] if abstract else address
    size = len(os.fsencode(sockaddr))
    # A path needs room for its terminating NUL; an abstract name does not.
    if size > _UNIX_PATH_MAX - (0 if abstract else 1):
        raise _Failed(f"the name is {size} bytes long; AF_UNIX allows {_UNIX_PATH_MAX - 1}")
    uid, gid = _resolve_owner(listen)  # before anything is created: an unknown user leaves no trace
    with _step("cannot create socket"):
        sock = _new_socket(socket.AF_UNIX, type_)
    bound = Bound(listen, sock.fileno(), sock)
    try:
        _set_options(sock, listen)
        if abstract:
            with _step("", {errno.EADDRINUSE: "another socket has this abstract name"}):
                sock.bind(sockaddr)
        else:
            # Parents walked and made without following planted links, a stale
            # node of ours replaced, mode and owner set on the very node bound
            # (see fsnodes).
            with _path_step():
                bound._node = fsnodes.bind_socket(sock, address, mode=listen.mode, uid=uid, gid=gid,
                                                  directory_mode=listen.directory_mode)
            _make_symlinks(address, listen)
        _listen(sock, listen)
    except BaseException:
        bound._discard()
        raise
    return bound


def _make_symlinks(target: str, listen: Listen) -> None:
    """Point each of ``listen.symlinks`` at ``target``, replacing an existing symlink of ours atomically."""
    with _path_step():
        for link in listen.symlinks:
            fsnodes.make_symlink(link, target, directory_mode=listen.directory_mode)


def _resolve_owner(listen: Listen) -> tuple[int, int]:
    """(uid, gid) for the node, -1 for "leave as is".

    As systemd: a user alone also gives the node that user's primary group.
    Numeric ids need no passwd/group entry.
    """
    uid = gid = -1
    if listen.user is not None:
        if listen.user.isdigit():
            uid = int(listen.user)
            with contextlib.suppress(KeyError):
                gid = pwd.getpwuid(uid).pw_gid
        else:
            try:
                entry = pwd.getpwnam(listen.user)
            except KeyError:
                raise _Failed(f"unknown user {listen.user!r}") from None
            uid, gid = entry.pw_uid, entry.pw_gid
    if listen.group is not None:
        if listen.group.isdigit():
            gid = int(listen.group)
        else:
            try:
                gid = grp.getgrnam(listen.group).gr_gid
            except KeyError:
                raise _Failed(f"unknown group {listen.group!r}") from None
    return uid, gid


def _own_socket_node(bound: Bound, path: str, listen: Listen, uid: int, gid: int) -> None:
    """Mode and owner for the node of a bound unix socket, if the path still holds it."""
    with _path_step():
        fsnodes.set_node_mode(path, bound._node, mode=listen.mode, uid=uid, gid=gid)


# --- matching inherited fds ------------------------------------------------------------


def _socket_matches(sock: socket.socket, listen: Listen) -> bool:
    sol = socket.SOL_SOCKET
    domain = sock.getsockopt(sol, SO_DOMAIN)
    type_ = sock.getsockopt(sol, socket.SO_TYPE)
    if type_ != _SOCK_TYPE[listen.kind]:
        return False
    if type_ in _LISTENING_TYPES and not sock.getsockopt(sol, socket.SO_ACCEPTCONN):
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
    if sock.getsockopt(sol, SO_PROTOCOL) != want_proto:
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


# --- fifos ---------------------------------------------------------------------------------


def _bind_fifo(listen: Listen) -> Bound:
    path = _path_address(listen)
    uid, gid = _resolve_owner(listen)
    with _path_step():
        # mode minus the umask: never more open than asked; fchmod below makes it exact.
        fd, created = fsnodes.open_fifo(path, mode=listen.mode, directory_mode=listen.directory_mode)
    bound = Bound(listen, fd, None)
    try:
        st = os.fstat(fd)
        if not stat.S_ISFIFO(st.st_mode):
            raise _Failed(f"{path} exists and is not a fifo; refusing to replace it")
        bound._node = (st.st_dev, st.st_ino)
        _own_fifo(fd, path, listen, uid, gid)
        _make_symlinks(path, listen)
    except BaseException:
        if created:
            bound._discard()
        else:
            bound.close(remove=False)  # the earlier run's fifo stays, as found
        raise
    return bound


def _own_fifo(fd: int, path: str, listen: Listen, uid: int, gid: int) -> None:
    # Through the fd, so the inode changed is the one opened, whatever the path is now.
    with _step(f"cannot set the mode of {path}"):
        os.fchmod(fd, listen.mode & 0o7777)
    if (uid, gid) != (-1, -1):
        with _step(f"cannot change the owner of {path}"):
            os.fchown(fd, uid, gid)


def _adopt_fifo(fd: int, listen: Listen) -> Bound:
    path = _path_address(listen)
    with _step("cannot inspect the inherited fd"):
        st = os.fstat(fd)
    if not stat.S_ISFIFO(st.st_mode):
        raise _Failed(f"the inherited fd {fd} is not a fifo")
    uid, gid = _resolve_owner(listen)
    with _step("cannot configure the inherited fd"):
        os.set_inheritable(fd, False)
        os.set_blocking(fd, False)
    _own_fifo(fd, path, listen, uid, gid)
    _make_symlinks(path, listen)
    bound = Bound(listen, fd, None, adopted=True)
    bound._node = (st.st_dev, st.st_ino)
    return bound
