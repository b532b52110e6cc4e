"""The socket-activation protocol, from the daemon's side (a pure-Python libsystemd ``sd-daemon``).

Theory of operation
-------------------
A supervisor (systemd, ``sockvisor``, ``systemd-socket-activate``) binds the listening sockets
itself and starts the daemon with them already open as fds 3, 4, ... (``SD_LISTEN_FDS_START``).
Three environment variables describe them:

``LISTEN_PID``
    The pid the fds are meant for. A daemon that forks, or a shell wrapper that starts a child,
    must not claim them in the wrong process, so a mismatch means "not for you" (0 fds).
``LISTEN_FDS``
    How many fds, counting from 3.
``LISTEN_FDNAMES``
    Optional ``:``-separated names, one per fd (systemd's ``FileDescriptorName=``).

The other direction is ``NOTIFY_SOCKET``: an ``AF_UNIX`` datagram socket (a path, or ``@name``
for the abstract namespace) to which the daemon sends newline-separated ``KEY=VALUE``
assignments (``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``FDSTORE=1`` with fds attached via
``SCM_RIGHTS``, ...), one datagram per call.

Everything here mirrors libsystemd (checked against systemd 252's ``libsystemd.so`` with a C
probe) so that a daemon written against this module behaves identically under systemd and under
sockvisor: the same numbers parse (``strtol`` with base 0: leading blanks, ``+``, ``0x`` hex and
``0`` octal are accepted, trailing garbage is not), the same conditions are errors, and the same
variables are unset afterwards. Where libsystemd returns ``-errno`` we raise: ``ValueError`` for
malformed variables (its ``-EINVAL``/``-ERANGE``) and ``OSError`` for system-call failures.

This module is imported by daemons, so it imports only light parts of the standard library;
``asyncio`` is imported inside :func:`start_servers` only.

Mutating ``os.environ`` is the contract of the ``unset_environment=True`` flags (exactly as
``sd_listen_fds(1)``): the variables must not leak into children the daemon starts later.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import re
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:  # pragma: no cover - typing only; asyncio is imported lazily at run time
    import asyncio

__all__ = [
    "SD_LISTEN_FDS_START",
    "InheritedSocket",
    "is_fifo",
    "is_socket",
    "is_socket_inet",
    "is_socket_unix",
    "listen_fds",
    "listen_fds_with_names",
    "listen_sockets",
    "notify",
    "notify_ready",
    "notify_reloading",
    "notify_status",
    "notify_stopping",
    "notify_watchdog",
    "remove_stored_fds",
    "socket_by_name",
    "sockets_by_name",
    "start_servers",
    "store_fds",
    "watchdog_enabled",
]

SD_LISTEN_FDS_START: Final = 3
"""The first passed fd; fds ``3 .. 3 + n - 1`` are the passed ones."""

# sd_listen_fds() rejects counts that would overflow an int when added to the start fd.
_INT_MAX: Final = 2**31 - 1
_UINT64_MAX: Final = 2**64 - 1
# The kernel refuses more than SCM_MAX_FD fds in one message; libsystemd checks first (-E2BIG).
_SCM_MAX_FD: Final = 253
# libsystemd enlarges the send buffer so a big STATUS= or many fds never fail with EAGAIN/ENOBUFS.
_NOTIFY_SNDBUF: Final = 8 * 1024 * 1024
# pid_t is a signed 32-bit int on Linux; parse_pid() refuses values that do not fit.
_PID_MAX: Final = 2**31 - 1

_LISTEN_VARS: Final = ("LISTEN_PID", "LISTEN_PIDFDID", "LISTEN_FDS", "LISTEN_FDNAMES")

# strtol()/strtoull() with base 0 after libsystemd's own whitespace skip: an optional sign, then
# hex (0x...), octal (0...) or decimal. fullmatch() enforces libsystemd's "no trailing garbage".
_C_INTEGER = re.compile(r"([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_C_SPACE = " \t\n\r\v\f"

SocketAddress = str | tuple[Any, ...]
"""What :meth:`socket.socket.getsockname` returns, with unix names turned into ``str``."""

Kind = Literal["socket", "fifo", "other"]


# --------------------------------------------------------------------------------------------
# Parsing numbers exactly as libsystemd does


def _parse_c_integer(text: str) -> int | None:
    """Parse like ``strtol(text, &end, 0)`` demanding ``*end == 0``; None when that fails."""
    match = _C_INTEGER.fullmatch(text.lstrip(_C_SPACE))
    if match is None:
        return None
    sign, digits = match.groups()
    if digits[:2] in ("0x", "0X"):
        value = int(digits[2:], 16)
    elif digits.startswith("0") and len(digits) > 1:
        value = int(digits[1:], 8)
    else:
        value = int(digits, 10)
    return -value if sign == "-" else value


def _parse_int(name: str, text: str) -> int:
    """``safe_atoi()``: a C int, base 0."""
    value = _parse_c_integer(text)
    if value is None or not -_INT_MAX - 1 <= value <= _INT_MAX:
        raise ValueError(f"{name}={text!r} is not an integer")
    return value


def _parse_unsigned(name: str, text: str, maximum: int) -> int:
    """``safe_atou64()``/``safe_atolu()``: unsigned, base 0, and a leading '-' is refused."""
    value = _parse_c_integer(text)
    # strtoul() would silently wrap a negative number; libsystemd refuses it (-ERANGE).
    if value is None or text.lstrip(_C_SPACE).startswith("-") or value > maximum:
        raise ValueError(f"{name}={text!r} is not an unsigned integer")
    return value


def _parse_pid(name: str, text: str) -> int:
    """``parse_pid()``: a positive pid_t."""
    pid = _parse_unsigned(name, text, _UINT64_MAX)
    if not 0 < pid <= _PID_MAX:
        raise ValueError(f"{name}={text!r} is not a valid pid")
    return pid


def _split_names(text: str) -> list[str]:
    """Split ``LISTEN_FDNAMES`` like ``strv_split_full(":", EXTRACT_DONT_COALESCE_SEPARATORS)``.

    Every ``:`` separates (so ``a::b`` is three names and ``""`` is one empty name); a backslash
    makes the next character literal, so ``a\\:b`` is the single name ``a:b``; a trailing
    backslash is an error (libsystemd: -EINVAL).
    """
    names: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise ValueError(f"LISTEN_FDNAMES={text!r} ends in a lone backslash")
            current.append(escaped)
        elif char == ":":
            names.append("".join(current))
            current = []
        else:
            current.append(char)
    names.append("".join(current))
    return names


def _own_pidfd_inode() -> int | None:
    """The inode number of a pidfd for this process (pidfs, Linux >= 6.9), or None if unknown."""
    try:
        pidfd = os.pidfd_open(os.getpid())
    except (AttributeError, OSError):
        return None
    try:
        return os.fstat(pidfd).st_ino
    finally:
        os.close(pidfd)


def _unset(names: Iterable[str]) -> None:
    for name in names:
        os.environ.pop(name, None)


# --------------------------------------------------------------------------------------------
# sd_listen_fds()


def listen_fds(unset_environment: bool = True) -> int:
    """Return how many fds were passed to this process (``sd_listen_fds``).

    The fds are ``SD_LISTEN_FDS_START .. SD_LISTEN_FDS_START + n - 1``; each gets ``FD_CLOEXEC``
    set so that they do not leak into programs this process executes later.

    Args:
        unset_environment: Remove ``LISTEN_PID``, ``LISTEN_PIDFDID``, ``LISTEN_FDS`` and
            ``LISTEN_FDNAMES`` from ``os.environ`` before returning, whether or not the call
            succeeded (so children never see fds that were not meant for them).

    Returns:
        The number of fds; 0 when ``LISTEN_PID`` or ``LISTEN_FDS`` is unset, or when
        ``LISTEN_PID`` (or systemd's ``LISTEN_PIDFDID``) names another process.

    Raises:
        ValueError: ``LISTEN_PID``, ``LISTEN_PIDFDID`` or ``LISTEN_FDS`` is malformed, or
            ``LISTEN_FDS`` is not positive although ``LISTEN_PID`` matches (libsystemd: -EINVAL).
        OSError: A listed fd is not open (``EBADF`` from setting ``FD_CLOEXEC``).
    """
    try:
        count = _listen_count(os.environ, os.getpid(), _own_pidfd_inode)
        for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            if not flags & fcntl.FD_CLOEXEC:
                fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        return count
    finally:
        if unset_environment:
            _unset(_LISTEN_VARS)


def listen_fds_with_names(unset_environment: bool = True) -> list[tuple[int, str]]:
    """Return the passed fds with their names (``sd_listen_fds_with_names``).

    Args:
        unset_environment: As for :func:`listen_fds`.

    Returns:
        ``[(fd, name), ...]`` in fd order; empty when nothing was passed to this process. Without
        ``LISTEN_FDNAMES`` every name is ``"unknown"``, as libsystemd reports.

    Raises:
        ValueError: As :func:`listen_fds`, or ``LISTEN_FDNAMES`` does not hold exactly one name
            per fd, or ends in a lone backslash (libsystemd: -EINVAL).
        OSError: As :func:`listen_fds`.
    """
    try:
        passed = parse_listen_environment(os.environ, os.getpid(), _own_pidfd_inode)
    finally:
        if unset_environment:
            _unset(_LISTEN_VARS)
    for fd, _ in passed:
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        if not flags & fcntl.FD_CLOEXEC:
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    return passed


def parse_listen_environment(environ: Mapping[str, str], pid: int,
                             own_pidfd_inode: Callable[[], int | None] | None = None) -> list[tuple[int, str]]:
    """What ``sd_listen_fds_with_names()`` would report for ``environ`` in process ``pid``; pure.

    Reads nothing but ``environ`` (and, only when ``LISTEN_PIDFDID`` is set,
    ``own_pidfd_inode()``: by default this process's pidfd inode when ``pid`` is
    ours) and touches no fd: the daemon uses it on its own copy of the
    environment, :func:`listen_fds_with_names` on ``os.environ``.

    Raises:
        ValueError: as :func:`listen_fds_with_names`.
    """
    if own_pidfd_inode is None:
        own_pidfd_inode = _own_pidfd_inode if pid == os.getpid() else (lambda: None)
    names_text = environ.get("LISTEN_FDNAMES")
    names = None if names_text is None else _split_names(names_text)
    count = _listen_count(environ, pid, own_pidfd_inode)
    if count <= 0:
        return []
    if names is None:
        names = ["unknown"] * count
    elif len(names) != count:
        raise ValueError(f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count}")
    return list(zip(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count), names, strict=True))


def _listen_count(environ: Mapping[str, str], pid: int, own_pidfd_inode: Callable[[], int | None]) -> int:
    """``sd_listen_fds``'s parse: the fd count meant for ``pid`` (0: none), or ValueError."""
    pid_text = environ.get("LISTEN_PID")
    if pid_text is None:
        return 0
    if _parse_pid("LISTEN_PID", pid_text) != pid:
        return 0
    pidfd_id_text = environ.get("LISTEN_PIDFDID")
    if pidfd_id_text is not None:
        # Newer systemd also names the process by its pidfd inode, which unlike a pid is
        # never reused. Only trust the comparison when we can compute our own id.
        wanted = _parse_unsigned("LISTEN_PIDFDID", pidfd_id_text, _UINT64_MAX)
        own = own_pidfd_inode()
        if own is not None and own != wanted:
            return 0
    fds_text = environ.get("LISTEN_FDS")
    if fds_text is None:
        return 0
    count = _parse_int("LISTEN_FDS", fds_text)
    if count <= 0 or count > _INT_MAX - SD_LISTEN_FDS_START:
        raise ValueError(f"LISTEN_FDS={fds_text!r} is not a positive fd count")
    return count


# --------------------------------------------------------------------------------------------
# Describing inherited fds


def _unix_name(raw: str | bytes) -> str:
    """A unix socket name as text: ``""`` unnamed, ``"@name"`` abstract, else the path."""
    if isinstance(raw, bytes):
        if not raw:
            return ""
        if raw[:1] == b"\0":
            return "@" + raw[1:].decode("utf-8", "surrogateescape")
        return os.fsdecode(raw)
    if raw.startswith("\0"):
        return "@" + raw[1:]
    return raw


@dataclass(frozen=True, slots=True)
class InheritedSocket:
    """One fd passed by the supervisor, described once at start-up.

    Attributes:
        fd: The fd number (3, 4, ...).
        name: Its name from ``LISTEN_FDNAMES`` (``"unknown"`` when none were given).
        kind: ``"socket"``, ``"fifo"``, or ``"other"`` (a regular file, a character device...).
        family: ``socket.AF_*`` (an ``int``); 0 unless ``kind == "socket"``.
        type: ``socket.SOCK_STREAM``, ``SOCK_DGRAM``, ``SOCK_SEQPACKET``...; 0 unless a socket.
        protocol: The socket protocol number (``SO_PROTOCOL``); 0 unless a socket.
        listening: ``SO_ACCEPTCONN``: True for a stream/seqpacket socket that ``listen()``\\ s.
        address: For a socket, what ``socket.getsockname()`` gives: ``(host, port)`` for inet,
            ``(host, port, flowinfo, scope_id)`` for inet6, a path for unix, ``"@name"`` for an
            abstract unix name, ``""`` for an unnamed unix socket. For a fifo or another file,
            the path it was opened as (from ``/proc/self/fd``), or ``""`` if that is unknown.
    """

    fd: int
    name: str
    kind: Kind
    family: int
    type: int
    protocol: int
    listening: bool
    address: SocketAddress

    @classmethod
    def from_fd(cls, fd: int, name: str = "unknown") -> InheritedSocket:
        """Describe ``fd`` without taking ownership of it.

        Args:
            fd: An open file descriptor.
            name: The name to record.

        Returns:
            The description.

        Raises:
            OSError: ``fd`` is not open, or the socket cannot be queried.
        """
        mode = os.fstat(fd).st_mode
        if not stat.S_ISSOCK(mode):
            kind: Kind = "fifo" if stat.S_ISFIFO(mode) else "other"
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                path = ""
            return cls(fd, name, kind, 0, 0, 0, False, path)
        # socket(fileno=) reads SO_DOMAIN/SO_TYPE/SO_PROTOCOL for us; detach() hands the fd back
        # untouched so that the object being collected never closes the caller's fd.
        sock = socket.socket(fileno=fd)
        try:
            raw = sock.getsockname()
            listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
            family, type_, protocol = int(sock.family), int(sock.type), sock.proto
        finally:
            sock.detach()
        address: SocketAddress = _unix_name(raw) if family == socket.AF_UNIX else raw
        return cls(fd, name, "socket", family, type_, protocol, listening, address)

    def socket(self) -> socket.socket:
        """Wrap the fd in a :class:`socket.socket`, which takes ownership of it.

        Closing (or garbage-collecting) the returned object closes the fd; call this once per
        fd and keep the object. The fd's blocking mode is left as it was passed (systemd passes
        listening sockets non-blocking only when the unit asks for it).

        Returns:
            The socket object.

        Raises:
            ValueError: The fd is not a socket (``kind != "socket"``).
        """
        if self.kind != "socket":
            raise ValueError(f"fd {self.fd} ({self.name}) is a {self.kind}, not a socket")
        return socket.socket(fileno=self.fd)


def listen_sockets(unset_environment: bool = True) -> list[InheritedSocket]:
    """Describe every fd passed to this process.

    Args:
        unset_environment: As for :func:`listen_fds`.

    Returns:
        One :class:`InheritedSocket` per passed fd, in fd order; empty if none were passed.

    Raises:
        ValueError: As :func:`listen_fds_with_names`.
        OSError: As :func:`listen_fds`, or an fd cannot be queried.
    """
    return [InheritedSocket.from_fd(fd, name) for fd, name in listen_fds_with_names(unset_environment)]


def sockets_by_name(name: str, sockets: Sequence[InheritedSocket] | None = None) -> list[InheritedSocket]:
    """All passed fds called ``name`` (several listen entries may share one name).

    Args:
        name: The ``LISTEN_FDNAMES`` entry to look for.
        sockets: The result of an earlier :func:`listen_sockets` call. When None, the
            environment is read again *without* unsetting it, so that repeated look-ups work;
            call :func:`listen_sockets` yourself to also clear the variables.

    Returns:
        The matching fds in fd order (possibly empty).

    Raises:
        ValueError: As :func:`listen_sockets` (only when ``sockets`` is None).
        OSError: As :func:`listen_sockets` (only when ``sockets`` is None).
    """
    if sockets is None:
        sockets = listen_sockets(unset_environment=False)
    return [s for s in sockets if s.name == name]


def socket_by_name(name: str, sockets: Sequence[InheritedSocket] | None = None) -> InheritedSocket | None:
    """The first passed fd called ``name``, or None; see :func:`sockets_by_name`.

    Args:
        name: The ``LISTEN_FDNAMES`` entry to look for.
        sockets: As for :func:`sockets_by_name`.

    Returns:
        The first match, or None when no fd has that name.

    Raises:
        ValueError: As :func:`sockets_by_name`.
        OSError: As :func:`sockets_by_name`.
    """
    found = sockets_by_name(name, sockets)
    return found[0] if found else None


# --------------------------------------------------------------------------------------------
# sd_is_*()


def _sockopt(fd: int, option: int) -> int:
    sock = socket.socket(fileno=fd)
    try:
        return sock.getsockopt(socket.SOL_SOCKET, option)
    finally:
        sock.detach()


def _sockname(fd: int) -> tuple[int, Any]:
    """(family, getsockname()) without taking ownership of ``fd``."""
    sock = socket.socket(fileno=fd)
    try:
        return int(sock.family), sock.getsockname()
    finally:
        sock.detach()


def _is_socket_internal(fd: int, type: int, listening: int) -> bool:
    if fd < 0:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    if type < 0:
        raise ValueError("type must be >= 0")
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        return False
    if type != 0 and _sockopt(fd, socket.SO_TYPE) != type:
        return False
    if listening >= 0:
        accepting = bool(_sockopt(fd, socket.SO_ACCEPTCONN))
        if accepting != bool(listening):
            return False
    return True


def is_socket(fd: int, family: int = 0, type: int = 0, listening: int = -1) -> bool:
    """Whether ``fd`` is a socket of the given kind (``sd_is_socket``).

    Args:
        fd: The fd to check.
        family: ``socket.AF_*`` to require, or 0 for any.
        type: ``socket.SOCK_*`` to require, or 0 for any.
        listening: 1 to require a listening socket, 0 a non-listening one, -1 either.

    Returns:
        True when every given condition holds.

    Raises:
        OSError: ``fd`` is not open (``EBADF``).
        ValueError: ``family`` or ``type`` is negative.
    """
    if family < 0:
        raise ValueError("family must be >= 0")
    if not _is_socket_internal(fd, type, listening):
        return False
    return family == 0 or _sockname(fd)[0] == family


def is_socket_inet(fd: int, family: int = 0, type: int = 0, listening: int = -1, port: int = 0) -> bool:
    """Whether ``fd`` is an ``AF_INET``/``AF_INET6`` socket of the given kind (``sd_is_socket_inet``).

    Args:
        fd: The fd to check.
        family: ``socket.AF_INET``, ``socket.AF_INET6``, or 0 for either.
        type: ``socket.SOCK_*`` to require, or 0 for any.
        listening: 1 listening, 0 not listening, -1 either.
        port: The local port to require, or 0 for any.

    Returns:
        True when every given condition holds.

    Raises:
        OSError: ``fd`` is not open.
        ValueError: ``family`` is not 0, ``AF_INET`` or ``AF_INET6``.
    """
    if family not in (0, socket.AF_INET, socket.AF_INET6):
        raise ValueError("family must be 0, AF_INET or AF_INET6")
    if not _is_socket_internal(fd, type, listening):
        return False
    actual, address = _sockname(fd)
    if actual not in (socket.AF_INET, socket.AF_INET6):
        return False
    if family != 0 and actual != family:
        return False
    return port <= 0 or int(address[1]) == port


def is_socket_unix(fd: int, type: int = 0, listening: int = -1, path: str | bytes | None = None) -> bool:
    """Whether ``fd`` is an ``AF_UNIX`` socket of the given kind (``sd_is_socket_unix``).

    Args:
        fd: The fd to check.
        type: ``socket.SOCK_*`` to require, or 0 for any.
        listening: 1 listening, 0 not listening, -1 either.
        path: The bound name to require: a filesystem path, an abstract name written as
            ``"\\0name"`` (libsystemd's notation) or ``"@name"`` (systemd's unit-file notation),
            ``""`` for an unnamed socket, or None for any.

    Returns:
        True when every given condition holds.

    Raises:
        OSError: ``fd`` is not open.
    """
    if not _is_socket_internal(fd, type, listening):
        return False
    actual, address = _sockname(fd)
    if actual != socket.AF_UNIX:
        return False
    if path is None:
        return True
    wanted = os.fsdecode(path) if isinstance(path, bytes) else path
    return _unix_name(address) == _unix_name(wanted)


def is_fifo(fd: int, path: str | None = None) -> bool:
    """Whether ``fd`` is a FIFO, optionally the one at ``path`` (``sd_is_fifo``).

    Args:
        fd: The fd to check.
        path: When given, ``fd`` must be the same inode as this path; a missing path is False.

    Returns:
        True when ``fd`` is a FIFO (at ``path``).

    Raises:
        OSError: ``fd`` is not open, or ``path`` cannot be examined for another reason than
            not existing.
    """
    st_fd = os.fstat(fd)
    if not stat.S_ISFIFO(st_fd.st_mode):
        return False
    if path is None:
        return True
    try:
        st_path = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return (st_path.st_dev, st_path.st_ino) == (st_fd.st_dev, st_fd.st_ino)


# --------------------------------------------------------------------------------------------
# sd_notify()


def _notify_address(value: str) -> str | bytes:
    """``NOTIFY_SOCKET`` as a ``sendmsg`` address: a path, or ``@name`` → ``b"\\0name"``."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    # libsystemd also speaks AF_VSOCK ("vsock:CID:PORT"), used between VMs; sockvisor does not.
    raise ValueError(f"NOTIFY_SOCKET={value!r} is neither an absolute path nor an @abstract name")


def notify(*assignments: str, fds: Sequence[int] = (), unset_environment: bool = False) -> bool:
    """Send one notification datagram to the supervisor (``sd_pid_notify_with_fds``).

    Args:
        *assignments: ``"KEY=VALUE"`` strings, sent joined by newlines, e.g. ``"READY=1"``,
            ``"STATUS=Serving"``.
        fds: File descriptors to pass along with ``SCM_RIGHTS`` (for ``FDSTORE=1``). The
            receiver gets duplicates; the caller still owns and must close its own.
        unset_environment: Remove ``NOTIFY_SOCKET`` from ``os.environ`` afterwards, whether or
            not the send succeeded (for a daemon that sends once and then starts children).

    Returns:
        True when the datagram was sent; False when ``NOTIFY_SOCKET`` is unset (not supervised).

    Raises:
        ValueError: ``NOTIFY_SOCKET`` is not an absolute path or ``@name``, or more than 253
            fds were given.
        OSError: The datagram could not be sent (e.g. ``ECONNREFUSED`` when nobody listens,
            ``ENOENT`` for a missing path).
    """
    try:
        target = os.environ.get("NOTIFY_SOCKET")
        if target is None:
            return False
        address = _notify_address(target)
        if len(fds) > _SCM_MAX_FD:
            raise ValueError(f"cannot pass {len(fds)} fds in one message (at most {_SCM_MAX_FD})")
        message = "\n".join(assignments).encode()
        ancillary = []
        if fds:
            ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes()))
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            with contextlib.suppress(OSError):  # best effort, as libsystemd's fd_inc_sndbuf()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _NOTIFY_SNDBUF)
            sent = sock.sendmsg([message], ancillary, socket.MSG_NOSIGNAL, address)
        if sent < len(message):
            raise OSError(errno.EIO, "short write to NOTIFY_SOCKET")
        return True
    finally:
        if unset_environment:
            _unset(("NOTIFY_SOCKET",))


def notify_ready(status: str | None = None) -> bool:
    """Tell the supervisor start-up is complete (``READY=1``, plus ``STATUS=`` if given).

    Args:
        status: A one-line human-readable status to show alongside.

    Returns:
        As :func:`notify`.

    Raises:
        ValueError: As :func:`notify`.
        OSError: As :func:`notify`.
    """
    return notify("READY=1", *(() if status is None else (f"STATUS={status}",)))


def notify_status(text: str) -> bool:
    """Set the one-line status shown by ``systemctl status`` / ``sockvisor status`` (``STATUS=``).

    Args:
        text: The status text (no newline).

    Returns:
        As :func:`notify`.

    Raises:
        ValueError: As :func:`notify`.
        OSError: As :func:`notify`.
    """
    return notify(f"STATUS={text}")


def notify_stopping() -> bool:
    """Tell the supervisor the daemon is shutting down (``STOPPING=1``).

    Returns:
        As :func:`notify`.

    Raises:
        ValueError: As :func:`notify`.
        OSError: As :func:`notify`.
    """
    return notify("STOPPING=1")


def notify_reloading() -> bool:
    """Tell the supervisor a configuration reload started (``RELOADING=1``).

    ``MONOTONIC_USEC=`` (``CLOCK_MONOTONIC`` now, in µs) is sent with it because systemd >= 253
    (``Type=notify-reload``) requires it to tell this reload apart from an earlier one. Send
    ``notify_ready()`` when the reload is done.

    Returns:
        As :func:`notify`.

    Raises:
        ValueError: As :func:`notify`.
        OSError: As :func:`notify`.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def notify_watchdog() -> bool:
    """Reset the supervisor's watchdog timer (``WATCHDOG=1``); see :func:`watchdog_enabled`.

    Returns:
        As :func:`notify`.

    Raises:
        ValueError: As :func:`notify`.
        OSError: As :func:`notify`.
    """
    return notify("WATCHDOG=1")


def store_fds(fds: Sequence[int], name: str | None = None) -> bool:
    """Hand fds to the supervisor's fd store to get them back after a restart (``FDSTORE=1``).

    They come back as extra passed fds, after the listening ones, named ``name``.

    Args:
        fds: The fds to store (the supervisor keeps duplicates).
        name: ``FDNAME=``: the name they come back under (at most 255 printable characters,
            no ``:``); None for the supervisor's default (``"stored"``).

    Returns:
        As :func:`notify`.

    Raises:
        ValueError: As :func:`notify`, or ``name`` contains a newline.
        OSError: As :func:`notify`.
    """
    if name is not None and "\n" in name:
        raise ValueError("an fd name cannot contain a newline")
    return notify("FDSTORE=1", *(() if name is None else (f"FDNAME={name}",)), fds=fds)


def remove_stored_fds(name: str) -> bool:
    """Drop every fd stored under ``name`` from the supervisor's fd store (``FDSTOREREMOVE=1``).

    Args:
        name: The ``FDNAME=`` they were stored under.

    Returns:
        As :func:`notify`.

    Raises:
        ValueError: As :func:`notify`, or ``name`` contains a newline.
        OSError: As :func:`notify`.
    """
    if "\n" in name:
        raise ValueError("an fd name cannot contain a newline")
    return notify("FDSTOREREMOVE=1", f"FDNAME={name}")


def watchdog_enabled(unset_environment: bool = False) -> float | None:
    """The watchdog interval the supervisor expects, if any (``sd_watchdog_enabled``).

    Send :func:`notify_watchdog` at least every interval (systemd suggests every half).

    Args:
        unset_environment: Remove ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` from ``os.environ``
            afterwards, whether or not the call succeeded.

    Returns:
        The interval in seconds, or None when ``WATCHDOG_USEC`` is unset or ``WATCHDOG_PID``
        names another process.

    Raises:
        ValueError: ``WATCHDOG_USEC`` is not a positive finite number of µs, or
            ``WATCHDOG_PID`` is malformed (libsystemd: -EINVAL/-ERANGE).
    """
    try:
        usec_text = os.environ.get("WATCHDOG_USEC")
        if usec_text is None:
            return None
        usec = _parse_unsigned("WATCHDOG_USEC", usec_text, _UINT64_MAX)
        # 0 and USEC_INFINITY mean "no timestamp" to systemd, hence invalid here.
        if usec in (0, _UINT64_MAX):
            raise ValueError(f"WATCHDOG_USEC={usec_text!r} is not a usable interval")
        pid_text = os.environ.get("WATCHDOG_PID")
        if pid_text is not None and _parse_pid("WATCHDOG_PID", pid_text) != os.getpid():
            return None
        return usec / 1_000_000
    finally:
        if unset_environment:
            _unset(("WATCHDOG_USEC", "WATCHDOG_PID"))


# --------------------------------------------------------------------------------------------
# asyncio


ClientConnected = Callable[["asyncio.StreamReader", "asyncio.StreamWriter"], Awaitable[None] | None]


async def start_servers(
    client_connected_cb: ClientConnected,
    *,
    names: Iterable[str] | None = None,
    sockets: Sequence[InheritedSocket] | None = None,
    **kwargs: Any,
) -> list[asyncio.AbstractServer]:
    """Serve every passed listening stream socket with asyncio streams.

    Each inherited socket that is a listening ``SOCK_STREAM`` socket becomes one server:
    ``asyncio.start_unix_server`` for ``AF_UNIX``, ``asyncio.start_server`` otherwise. Other
    fds (datagram and seqpacket sockets, FIFOs, connected sockets) have no stream-server meaning
    in asyncio and are skipped: handle them yourself from :func:`listen_sockets`. The servers
    are already accepting when this returns (``start_serving=True`` unless given in ``kwargs``).

    Args:
        client_connected_cb: Called with ``(reader, writer)`` for every connection.
        names: Only serve fds with these ``LISTEN_FDNAMES`` names.
        sockets: The result of an earlier :func:`listen_sockets` call; when None,
            :func:`listen_sockets` is called (and unsets the ``LISTEN_*`` variables).
        **kwargs: Passed on to ``asyncio.start_server`` / ``start_unix_server`` (``limit``,
            ``ssl``, ``ssl_handshake_timeout``...).

    Returns:
        The servers, in fd order. Close them with ``server.close()``; that closes the fds.

    Raises:
        LookupError: A name in ``names`` matches no listening stream socket, or ``names`` is
            None and no listening stream socket was passed at all.
        ValueError: As :func:`listen_sockets`.
        OSError: As :func:`listen_sockets`.
    """
    import asyncio

    if sockets is None:
        sockets = listen_sockets()
    wanted = None if names is None else set(names)
    chosen = [
        s
        for s in sockets
        if s.kind == "socket" and s.type == socket.SOCK_STREAM and s.listening and (wanted is None or s.name in wanted)
    ]
    if wanted is not None:
        missing = wanted - {s.name for s in chosen}
        if missing:
            raise LookupError(f"no listening stream socket named {', '.join(sorted(missing))}")
    elif not chosen:
        raise LookupError("no listening stream socket was passed to this process")
    servers: list[asyncio.AbstractServer] = []
    try:
        for inherited in chosen:
            sock = inherited.socket()
            if inherited.family == socket.AF_UNIX:
                servers.append(await asyncio.start_unix_server(client_connected_cb, sock=sock, **kwargs))
            else:
                servers.append(await asyncio.start_server(client_connected_cb, sock=sock, **kwargs))
    except BaseException:
        for server in servers:
            server.close()
        raise
    return servers
