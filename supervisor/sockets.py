"""Binding listen entries: every kind, every option, as systemd does for ``.socket`` units.

Theory of operation
-------------------
A ``Listen`` (frozen config) becomes a ``Bound``: an open, CLOEXEC, non-blocking fd
plus the ``socket.socket`` that owns it (``None`` for a fifo). ``bind`` does it from
scratch; ``adopt`` wraps an fd inherited from systemd (``LISTEN_FDS``) after
``matches`` has checked that the fd is what the entry would have bound.

Binding follows systemd's ``socket_address_listen()`` and ``socket_apply_socket_options()``
in order: create the socket, set the options the kernel only honours before
``bind()`` (``IPV6_V6ONLY``, ``sockopts.SO_BINDTODEVICE``, ``SO_REUSEPORT``, freebind,
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
import fcntl
import grp
import os
import pwd
import socket
import stat
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from supervisor import addresses, fsnodes, sockopts, specials
from supervisor.addresses import format_sockaddr
from supervisor.errors import BindError
from supervisor.model import BIND_TIME_OPTIONS, LISTEN_OPTIONS, InetAddress, Listen, ListenKind

_UCRED = struct.Struct("iII")  # struct ucred: pid_t, uid_t, gid_t

__all__ = [
    "Bound",
    "adopt",
    "bind",
    "bind_all",
    "format_sockaddr",
    "peer_credentials",
    "retune",
    "set_blocking",
]


_UNIX_PATH_MAX = addresses.SUN_PATH_MAX


# Options whose default is "unset" (None, False, ()): setting one on a kind it
# does not apply to is refused. (name, backlog, mode, directory_mode and
# remove_on_stop always carry a default, so only the config can tell.)
_APPLIES_TO = {name: o.kinds for name, o in LISTEN_OPTIONS.items() if o.on_socket}




@contextlib.contextmanager
def _path_step() -> Iterator[None]:
    """Turn a refused or failed path operation (``fsnodes.PathError``) into ``sockopts.Failed``."""
    try:
        yield
    except fsnodes.PathError as exc:
        raise sockopts.Failed(exc.reason) from exc


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

    @property
    def node(self) -> tuple[int, int] | None:
        """(st_dev, st_ino) of the file-system node this process made for it (removed at close), if any."""
        return self._node

    def own_node(self, node: tuple[int, int] | None) -> None:
        """Take over removing the node at ``close`` (a previous image of the daemon made it: re-exec)."""
        self.adopted = False
        self._node = node

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
            if self.listen.kind is ListenKind.MQUEUE and isinstance(self.listen.address, str):
                specials.mq_unlink(self.listen.address)

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
        if listen.kind in specials.KINDS:
            fd, sock = specials.bind(listen)
            return Bound(listen, fd, sock)
        if listen.kind.is_inet:
            return _bind_inet(listen)
        return _bind_unix(listen)
    except sockopts.Failed as exc:
        raise BindError(unit, listen.display, exc.reason, listen.location) from exc.__cause__
    except OSError as exc:  # a step not wrapped in sockopts.step(): still a BindError, never a traceback
        raise BindError(unit, listen.display, sockopts.strerror(exc), listen.location) from exc


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
        if listen.kind in (ListenKind.SPECIAL, ListenKind.MQUEUE):
            with sockopts.step("cannot configure the inherited fd"):
                os.set_inheritable(fd, False)
                os.set_blocking(fd, False)
            return Bound(listen, fd, None, adopted=True)
        sock = socket.socket(fileno=fd)
        try:
            sock.set_inheritable(False)
            sock.setblocking(False)
            sockopts.set_options(sock, listen)
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
    except sockopts.Failed as exc:
        raise BindError(unit, listen.display, exc.reason, listen.location) from exc.__cause__
    except OSError as exc:
        raise BindError(unit, listen.display, sockopts.strerror(exc), listen.location) from exc


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
            raise sockopts.Failed(f"cannot retune {old.display} into {listen.display}: the address differs")
        fixed = [name for name in BIND_TIME_OPTIONS if getattr(old, name) != getattr(listen, name)]
        if fixed:
            raise sockopts.Failed(f"{', '.join(fixed)} can only change with a new socket")
        _check_applicable(listen)
        if bound.sock is not None:
            sockopts.reset_options(bound.sock, old, listen)
            sockopts.set_options(bound.sock, listen)
            if listen.backlog != old.backlog:
                sockopts.listen(bound.sock, listen)
        if bound.sock is None and listen.pipe_size != old.pipe_size:
            _pipe_size(bound.fd, listen)
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
    except sockopts.Failed as exc:
        raise BindError(unit, listen.display, exc.reason, listen.location) from exc.__cause__
    except OSError as exc:
        raise BindError(unit, listen.display, sockopts.strerror(exc), listen.location) from exc
    bound.listen = listen


def set_blocking(fd: int, blocking: bool) -> None:
    """Set or clear ``O_NONBLOCK`` on ``fd`` (the daemon makes ``pass: stdio`` fds blocking)."""
    os.set_blocking(fd, blocking)


# --- checks --------------------------------------------------------------------------------


def _check_applicable(listen: Listen) -> None:
    wrong = [name for name, kinds in _APPLIES_TO.items()
             if listen.kind not in kinds and sockopts.is_set(getattr(listen, name))]
    if _is_abstract(listen):
        wrong += [name for name in ("user", "group", "symlinks") if sockopts.is_set(getattr(listen, name))]
    if wrong:
        what = "abstract unix sockets" if _is_abstract(listen) else f"{listen.kind.value} listeners"
        raise sockopts.Failed(f"{', '.join(wrong)} does not apply to {what}")


def _is_abstract(listen: Listen) -> bool:
    return listen.kind.is_unix and isinstance(listen.address, str) and listen.address.startswith("@")


def _node_path(listen: Listen) -> str | None:
    """The file-system path of the entry's node, or None (inet, abstract)."""
    if not (listen.kind.is_unix or listen.kind is ListenKind.FIFO) or _is_abstract(listen):
        return None  # inet, abstract, and kinds whose path is not ours (special files, queues, netlink)
    return listen.address if isinstance(listen.address, str) else None


def _inet_address(listen: Listen) -> InetAddress:
    if not isinstance(listen.address, InetAddress):
        raise sockopts.Failed(f"{listen.kind.value} needs an IP address, not {listen.address!r}")
    return listen.address


def _path_address(listen: Listen) -> str:
    if not isinstance(listen.address, str):
        raise sockopts.Failed(f"{listen.kind.value} needs a path, not {listen.address}")
    return listen.address


# --- inet ----------------------------------------------------------------------------------


def _new_socket(family: int, type_: int, proto: int = 0) -> socket.socket:
    """A new socket, CLOEXEC (Python's default, PEP 446) and non-blocking (as systemd passes them)."""
    sock = socket.socket(family, type_, proto)
    sock.setblocking(False)
    return sock


def _open_inet(listen: Listen, addr: InetAddress) -> tuple[socket.socket, tuple[str, int] | tuple[str, int, int, int]]:
    """The socket for an inet entry and the address to bind it to."""
    type_ = sockopts.SOCK_TYPE[listen.kind]
    proto = sockopts.PROTOCOLS[listen.protocol] if listen.protocol is not None else 0
    no_proto = {errno.EPROTONOSUPPORT: f"the kernel has no {listen.protocol} (module not loaded?)"}
    if addr.any_dual_stack:
        try:
            return _new_socket(socket.AF_INET6, type_, proto), ("::", addr.port, 0, 0)
        except OSError as exc:
            # A kernel without IPv6 serves a bare port on IPv4 alone, as systemd
            # does -- unless the entry asked for IPv6 explicitly.
            if exc.errno != errno.EAFNOSUPPORT or listen.ipv6_only:
                hint = no_proto.get(exc.errno or 0)
                raise sockopts.Failed(f"cannot create an IPv6 socket: {hint or sockopts.strerror(exc)}") from exc
        with sockopts.step("cannot create an IPv4 socket", no_proto):
            return _new_socket(socket.AF_INET, type_, proto), ("0.0.0.0", addr.port)
    with sockopts.step("cannot create socket", {errno.EAFNOSUPPORT: "the kernel has no support for it", **no_proto}):
        sock = _new_socket(addr.family, type_, proto)
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
                sockopts.setopt(sock, socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only), "IPV6_V6ONLY")
        if listen.bind_to_device is not None:
            sockopts.setopt(
                sock,
                socket.SOL_SOCKET,
                sockopts.SO_BINDTODEVICE,
                listen.bind_to_device.encode(),
                "sockopts.SO_BINDTODEVICE",
                {errno.ENODEV: "no such network interface", **sockopts.NEEDS_NET_ADMIN},
            )
        if listen.reuse_port:
            sockopts.setopt(sock, socket.SOL_SOCKET, socket.SO_REUSEPORT, 1, "SO_REUSEPORT")
        if listen.freebind:
            sockopts.set_ip_option(sock, sockopts.IP_FREEBIND, sockopts.IPV6_FREEBIND, 1, "sockopts.IP_FREEBIND")
        if listen.kind is ListenKind.TCP:
            # TIME_WAIT connections of a previous run must not block the port (as systemd).
            # Not for UDP: there SO_REUSEADDR lets a second socket share the port silently.
            sockopts.setopt(sock, socket.SOL_SOCKET, socket.SO_REUSEADDR, 1, "SO_REUSEADDR")
        sockopts.set_options(sock, listen)
        port_hint = (
            "ports below 1024 need root or CAP_NET_BIND_SERVICE"
            if addr.port < 1024
            else "permission denied by the kernel or a security module"
        )
        with sockopts.step(
            "",
            {
                errno.EADDRINUSE: "another socket is bound to it; `ss -lnp` shows which process",
                errno.EADDRNOTAVAIL: "no local interface has this address; freebind: true binds it anyway",
                errno.EACCES: port_hint,
            },
        ):
            sock.bind(sockaddr)
        sockopts.listen(sock, listen)
    except BaseException:
        sock.close()
        raise
    return Bound(listen, sock.fileno(), sock)


# --- unix sockets --------------------------------------------------------------------------


def _bind_unix(listen: Listen) -> Bound:
    address = _path_address(listen)
    type_ = sockopts.SOCK_TYPE[listen.kind]
    abstract = address.startswith("@")
    sockaddr = "\0" + address[1:] if abstract else address
    size = len(os.fsencode(sockaddr))
    # A path needs room for its terminating NUL; an abstract name does not.
    if size > _UNIX_PATH_MAX - (0 if abstract else 1):
        raise sockopts.Failed(f"the name is {size} bytes long; AF_UNIX allows {_UNIX_PATH_MAX - 1}")
    uid, gid = _resolve_owner(listen)  # before anything is created: an unknown user leaves no trace
    with sockopts.step("cannot create socket"):
        sock = _new_socket(socket.AF_UNIX, type_)
    bound = Bound(listen, sock.fileno(), sock)
    try:
        sockopts.set_options(sock, listen)
        if abstract:
            with sockopts.step("", {errno.EADDRINUSE: "another socket has this abstract name"}):
                sock.bind(sockaddr)
        else:
            # Parents walked and made without following planted links, a stale
            # node of ours replaced, mode and owner set on the very node bound
            # (see fsnodes).
            with _path_step():
                bound._node = fsnodes.bind_socket(sock, address, mode=listen.mode, uid=uid, gid=gid,
                                                  directory_mode=listen.directory_mode)
            _make_symlinks(address, listen)
        sockopts.listen(sock, listen)
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
                raise sockopts.Failed(f"unknown user {listen.user!r}") from None
            uid, gid = entry.pw_uid, entry.pw_gid
    if listen.group is not None:
        if listen.group.isdigit():
            gid = int(listen.group)
        else:
            try:
                gid = grp.getgrnam(listen.group).gr_gid
            except KeyError:
                raise sockopts.Failed(f"unknown group {listen.group!r}") from None
    return uid, gid


def _own_socket_node(bound: Bound, path: str, listen: Listen, uid: int, gid: int) -> None:
    """Mode and owner for the node of a bound unix socket, if the path still holds it."""
    with _path_step():
        fsnodes.set_node_mode(path, bound._node, mode=listen.mode, uid=uid, gid=gid)


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
            raise sockopts.Failed(f"{path} exists and is not a fifo; refusing to replace it")
        bound._node = (st.st_dev, st.st_ino)
        _own_fifo(fd, path, listen, uid, gid)
        _make_symlinks(path, listen)
        _pipe_size(fd, listen)
    except BaseException:
        if created:
            bound._discard()
        else:
            bound.close(remove=False)  # the earlier run's fifo stays, as found
        raise
    return bound


def _pipe_size(fd: int, listen: Listen) -> None:
    if listen.pipe_size is not None:
        with sockopts.step("cannot set the pipe size (F_SETPIPE_SZ)",
                           {errno.EPERM: "above /proc/sys/fs/pipe-max-size needs CAP_SYS_RESOURCE"}):
            fcntl.fcntl(fd, sockopts.F_SETPIPE_SZ, listen.pipe_size)


def _own_fifo(fd: int, path: str, listen: Listen, uid: int, gid: int) -> None:
    # Through the fd, so the inode changed is the one opened, whatever the path is now.
    with sockopts.step(f"cannot set the mode of {path}"):
        os.fchmod(fd, listen.mode & 0o7777)
    if (uid, gid) != (-1, -1):
        with sockopts.step(f"cannot change the owner of {path}"):
            os.fchown(fd, uid, gid)


def _adopt_fifo(fd: int, listen: Listen) -> Bound:
    path = _path_address(listen)
    with sockopts.step("cannot inspect the inherited fd"):
        st = os.fstat(fd)
    if not stat.S_ISFIFO(st.st_mode):
        raise sockopts.Failed(f"the inherited fd {fd} is not a fifo")
    uid, gid = _resolve_owner(listen)
    with sockopts.step("cannot configure the inherited fd"):
        os.set_inheritable(fd, False)
        os.set_blocking(fd, False)
    _own_fifo(fd, path, listen, uid, gid)
    _make_symlinks(path, listen)
    _pipe_size(fd, listen)
    bound = Bound(listen, fd, None, adopted=True)
    bound._node = (st.st_dev, st.st_ino)
    return bound


def peer_credentials(fd: int) -> tuple[int, int, int]:
    """``SO_PEERCRED`` of a connected unix socket: (pid, uid, gid). The one parser (accept mode, control socket)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)
    try:
        raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    finally:
        s.detach()
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid
