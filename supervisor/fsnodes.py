"""File-system nodes made by a root daemon: one rule for every path it creates, changes or removes.

Theory of operation
-------------------
The daemon runs as root and makes nodes (unix sockets, fifos, symlinks, their
parent directories) at paths that pass through directories other users may
write to. A path lookup that follows a link an unprivileged user planted, or a
directory that user can rename under us, turns a ``chmod`` into "make
``/etc/shadow`` 0666". So every operation here goes through ``walk``:

* The parent directory is reached from ``/`` one component at a time with
  ``openat(O_NOFOLLOW | O_DIRECTORY)``; every directory on the way is checked
  with ``fstat`` on the fd just opened. A directory is *trusted* when it is
  owned by root or by the daemon's euid and no one else can write to it (not
  group-writable unless the group is root, not world-writable), or when it is
  sticky (``/tmp``): there others can add names but never rename or remove
  ours. Anything else is a ``PathError`` naming the directory.
* A symlink on the way is followed only when it is owned by root or by the
  daemon (it sits in a trusted directory, so nobody else could have put it
  there): ``/var/run -> /run`` works, a link ``nobody`` planted does not.
* Missing parents are made with ``mkdirat`` on the verified fd and checked
  again after they are opened.

Because every directory on the chain is trusted, the kernel's own lookup of
the same path string (``bind()`` has no ``bindat``) reaches the same directory:
nobody who could change the answer can write to the chain. The only name an
attacker can still touch is the last one in a sticky directory, so there only
our own node is touched: a node owned by another user is refused, never
unlinked, and ``bind()`` itself never follows a link at the last component.
Mode and owner are then set with ``fchmodat``/``fchownat`` relative to the
verified directory fd, without following links, after checking that the name
still holds the node we created. The process umask is never changed (it is
process-wide and the daemon has threads): a socket's node takes its mode from
the socket inode (set with ``fchmod`` before ``bind()``) minus the umask, so
it is never more open than asked, and is made exact afterwards.

The same walk serves the unit sockets (``sockets``), the control socket
(``control``) and ``sockvisor activate``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, overload

__all__ = [
    "Parent",
    "PathError",
    "bind_socket",
    "make_symlink",
    "open_fifo",
    "parent",
    "remove_node",
    "remove_symlink",
    "set_node_mode",
]

_MAX_LINKS = 40  # as the kernel's MAXSYMLINKS
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class PathError(Exception):
    """A path operation was refused or failed; ``reason`` names the path and says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _trusted_uid(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def check_directory(st: os.stat_result, shown: str) -> None:
    """Refuse a directory that a user other than root or the daemon could change (pure on ``st``).

    Raises:
        PathError: naming ``shown``.
    """
    sticky = bool(st.st_mode & stat.S_ISVTX)
    if not _trusted_uid(st.st_uid):
        raise PathError(f"directory {shown} is owned by {_owner(st.st_uid)}, not root or the daemon's user;"
                        " refusing to use it")
    if sticky:
        return
    if st.st_mode & stat.S_IWOTH:
        raise PathError(f"directory {shown} is writable by every user and not sticky; refusing to use it")
    if st.st_mode & stat.S_IWGRP and st.st_gid != 0:
        raise PathError(f"directory {shown} is writable by group {st.st_gid}; refusing to use it")


@dataclass
class Parent:
    """A verified, open parent directory of ``path``; ``name`` is the last component."""

    fd: int
    path: str  # the node's absolute path, as walked
    dir_path: str
    name: str
    sticky: bool

    def lstat(self) -> os.stat_result | None:
        """The node at ``name`` without following a link, or None when there is none."""
        try:
            return os.stat(self.name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise PathError(f"cannot stat {self.path}: {exc.strerror}") from exc

    def check_ours(self, st: os.stat_result, what: str) -> None:
        """In a sticky directory only our own nodes are touched; refuse anyone else's."""
        if self.sticky and not _trusted_uid(st.st_uid):
            raise PathError(f"{what} {self.path} belongs to {_owner(st.st_uid)} in the shared directory"
                            f" {self.dir_path}; refusing to touch it")


def _split(path: str) -> list[str]:
    return [c for c in path.split("/") if c and c != "."]


@contextlib.contextmanager
def parent(path: str, *, create_mode: int | None = None) -> Iterator[Parent]:
    """Open and verify the parent directory of ``path``, creating missing ones with ``create_mode``.

    Args:
        path: the node's path (made absolute against the working directory).
        create_mode: the mode of parents made here (exact, umask aside); None: make nothing.

    Yields:
        The verified parent, its fd open until the block ends.

    Raises:
        PathError: a directory on the way is not trusted, a link on the way is
            not root's or the daemon's, a component is not a directory, or a
            directory could not be made.
    """
    absolute = os.path.abspath(path)
    if absolute == "/" or path.endswith("/"):
        raise PathError(f"{path} names a directory, not a node")
    dir_path, name = os.path.split(absolute)
    todo = _split(dir_path)
    stack: list[tuple[int, str]] = []  # (fd, shown path) of each directory walked, "/" first
    links = 0
    try:
        fd = os.open("/", _DIR_FLAGS)
        stack.append((fd, "/"))
        check_directory(os.fstat(fd), "/")
        while todo:
            component = todo.pop(0)
            here, shown_here = stack[-1]
            shown = os.path.join(shown_here, component)
            if component == "..":
                if len(stack) > 1:
                    os.close(stack.pop()[0])
                continue
            try:
                fd = os.open(component, _DIR_FLAGS, dir_fd=here)
            except FileNotFoundError:
                if create_mode is None:
                    raise PathError(f"directory {shown} does not exist") from None
                try:
                    os.mkdir(component, create_mode & 0o7777, dir_fd=here)
                    made = True
                except FileExistsError:
                    made = False  # made meanwhile by someone else: theirs; verified below like any other
                except OSError as exc:
                    raise PathError(f"cannot create directory {shown}: {exc.strerror}") from exc
                fd = _open_dir(component, here, shown)
                if made:
                    st = os.fstat(fd)
                    if st.st_uid == os.geteuid():
                        os.fchmod(fd, create_mode & 0o7777)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise PathError(f"cannot open directory {shown}: {exc.strerror}{_hint(exc)}") from exc
                st = os.stat(component, dir_fd=here, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    raise PathError(f"{shown} is not a directory") from None
                if not _trusted_uid(st.st_uid):
                    raise PathError(f"{shown} is a symlink owned by {_owner(st.st_uid)}; refusing to follow it"
                                    ) from None
                links += 1
                if links > _MAX_LINKS:
                    raise PathError(f"too many levels of symbolic links at {shown}") from None
                target = os.readlink(component, dir_fd=here)
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop()[0])
                todo[:0] = _split(target)
                continue
            stack.append((fd, shown))
            check_directory(os.fstat(fd), shown)
        fd, _ = stack.pop()
        st = os.fstat(fd)
    except PathError:
        for fd, _ in stack:
            os.close(fd)
        raise
    except OSError as exc:
        for fd, _ in stack:
            os.close(fd)
        raise PathError(f"cannot walk to {dir_path}: {exc.strerror or exc}") from exc
    for other, _ in stack:
        os.close(other)
    try:
        yield Parent(fd, absolute, dir_path, name, bool(st.st_mode & stat.S_ISVTX))
    finally:
        os.close(fd)


def _hint(exc: OSError) -> str:
    return " (check the permissions of the directories on the path)" if exc.errno == errno.EACCES else ""


def _open_dir(component: str, at: int, shown: str) -> int:
    try:
        return os.open(component, _DIR_FLAGS, dir_fd=at)
    except OSError as exc:
        raise PathError(f"cannot open directory {shown}: {exc.strerror}{_hint(exc)}") from exc


def _probe_live(path: str, type_: int) -> bool:
    """Whether something still answers on the unix socket at ``path`` (the parent chain is verified)."""
    probe = socket.socket(socket.AF_UNIX, type_ | socket.SOCK_CLOEXEC)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False  # no socket bound to the node (or it vanished): stale
    except BlockingIOError:
        return True  # a listener with a full backlog
    except OSError as exc:
        # EPROTOTYPE: a live socket of another type; EPERM: a live datagram
        # socket connected to someone else.
        if exc.errno not in (errno.EPROTOTYPE, errno.EPERM):
            raise PathError(f"cannot check the existing socket {path}: {exc.strerror or exc}") from exc
        return True
    finally:
        probe.close()
    return True


def clear_stale(where: Parent, type_: int) -> None:
    """Unlink a stale socket node at ``where.name``; refuse a live one, anyone else's, or anything else."""
    st = where.lstat()
    if st is None:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise PathError(f"{where.path} exists and is not a socket; refusing to replace it")
    where.check_ours(st, "the socket")
    if _probe_live(where.path, type_):
        raise PathError(f"{where.path} is in use by a running process; refusing to take it over")
    again = where.lstat()
    if again is None:
        return
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
        raise PathError(f"{where.path} was replaced while it was checked; refusing to touch it")
    try:
        os.unlink(where.name, dir_fd=where.fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise PathError(f"cannot remove the stale socket {where.path}: {exc.strerror}") from exc


def _own(where: Parent, node: tuple[int, int], mode: int, uid: int, gid: int) -> None:
    """Mode and owner of the node at ``where.name``, which must still be ``node``, without following links."""
    st = where.lstat()
    if st is None or (st.st_dev, st.st_ino) != node or stat.S_ISLNK(st.st_mode):
        raise PathError(f"{where.path} is no longer the node this process made")
    try:
        os.chmod(where.name, mode & 0o7777, dir_fd=where.fd, follow_symlinks=False)
    except OSError as exc:
        raise PathError(f"cannot set the mode of {where.path}: {exc.strerror}") from exc
    if (uid, gid) != (-1, -1):
        try:
            os.chown(where.name, uid, gid, dir_fd=where.fd, follow_symlinks=False)
        except OSError as exc:
            raise PathError(f"cannot change the owner of {where.path}: {exc.strerror}") from exc


def bind_socket(sock: socket.socket, path: str, *, mode: int, uid: int = -1, gid: int = -1,
                directory_mode: int = 0o755) -> tuple[int, int]:
    """Bind ``sock`` (AF_UNIX) at ``path``: verified parents, a stale node replaced, mode and owner set.

    Args:
        sock: an unbound unix socket.
        path: where; the node's mode is exactly ``mode`` and its owner ``uid``/``gid`` (-1: leave).
        directory_mode: the mode of parents made here.

    Returns:
        (st_dev, st_ino) of the node made, for ``remove_node``.

    Raises:
        PathError: the path is unsafe, a live socket or another file is in
            the way, or a step failed. A node made by this call is removed.
    """
    with parent(path, create_mode=directory_mode) as where:
        clear_stale(where, sock.type)
        # The node takes the socket inode's mode minus the umask: never more open than asked.
        try:
            os.fchmod(sock.fileno(), mode & 0o777)
        except OSError as exc:
            raise PathError(f"cannot set the mode of the socket: {exc.strerror}") from exc
        try:
            sock.bind(where.path)
        except OSError as exc:
            in_use = exc.errno == errno.EADDRINUSE
            hint = " (a node appeared at the path while binding)" if in_use else _hint(exc)
            raise PathError(f"{exc.strerror or exc}{hint}") from exc
        st = where.lstat()
        # Nobody else can rename or remove a node in a trusted directory, so this is ours.
        if st is None or not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise PathError(f"{where.path} is not the socket node this process bound")
        node = (st.st_dev, st.st_ino)
        try:
            _own(where, node, mode, uid, gid)
        except BaseException:
            with contextlib.suppress(OSError, PathError):
                _unlink_if(where, node)
            raise
        return node


def _unlink_if(where: Parent, node: tuple[int, int] | None) -> None:
    st = where.lstat()
    if st is not None and node is not None and (st.st_dev, st.st_ino) == node:
        os.unlink(where.name, dir_fd=where.fd)


@overload
def set_node_mode(path: str, node: tuple[int, int] | None, *, mode: int, uid: int = ..., gid: int = ...,
                  missing_ok: Literal[False] = ...) -> tuple[int, int]: ...
@overload
def set_node_mode(path: str, node: tuple[int, int] | None, *, mode: int, uid: int = ..., gid: int = ...,
                  missing_ok: bool) -> tuple[int, int] | None: ...
def set_node_mode(path: str, node: tuple[int, int] | None, *, mode: int, uid: int = -1, gid: int = -1,
                  missing_ok: bool = False) -> tuple[int, int] | None:
    """Mode and owner of the existing socket node at ``path`` (``node``: the inode it must be; None: any).

    Args:
        missing_ok: when the path holds no socket, do nothing and return None.

    Returns:
        (st_dev, st_ino) of the node changed.

    Raises:
        PathError: the path is unsafe, or holds another node (unless ``missing_ok``).
    """
    with parent(path) as where:
        st = where.lstat()
        if st is None or not stat.S_ISSOCK(st.st_mode):
            if missing_ok:
                return None
            raise PathError(f"{path} is no longer this socket's node")
        if node is not None and (st.st_dev, st.st_ino) != node:
            raise PathError(f"{path} is no longer this socket's node")
        where.check_ours(st, "the node")
        found = (st.st_dev, st.st_ino)
        _own(where, found, mode, uid, gid)
        return found


def remove_node(path: str, node: tuple[int, int]) -> None:
    """Unlink ``path`` if it is still the inode ``node``, reached without following planted links; best effort."""
    with contextlib.suppress(PathError, OSError), parent(path) as where:
        _unlink_if(where, node)


def open_fifo(path: str, *, mode: int, directory_mode: int) -> tuple[int, bool]:
    """Make (or reuse our own) fifo at ``path`` and open it ``O_RDWR | O_NONBLOCK``.

    Returns:
        (fd, created): ``created`` when this call made the node (then the caller removes it on failure).

    Raises:
        PathError: the path is unsafe, or another file (or anyone else's fifo in a sticky directory) is there.
    """
    with parent(path, create_mode=directory_mode) as where:
        st = where.lstat()
        if st is not None:
            # Refuse before open(): opening some other file read-write (a device, say) could have effects.
            if not stat.S_ISFIFO(st.st_mode):
                raise PathError(f"{path} exists and is not a fifo; refusing to replace it")
            where.check_ours(st, "the fifo")
        created = False
        try:
            os.mkfifo(where.name, mode & 0o777, dir_fd=where.fd)
            created = True
        except FileExistsError:
            pass  # a fifo left by an earlier run (checked above, re-checked after open)
        except OSError as exc:
            raise PathError(f"cannot create fifo: {exc.strerror}") from exc
        try:
            fd = os.open(where.name, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY | os.O_NOFOLLOW,
                         dir_fd=where.fd)
        except OSError as exc:
            if created:
                with contextlib.suppress(OSError):
                    os.unlink(where.name, dir_fd=where.fd)
            raise PathError(f"cannot open fifo: {exc.strerror}") from exc
        return fd, created


def make_symlink(link: str, target: str, *, directory_mode: int) -> None:
    """Point ``link`` at ``target`` (created, or an existing symlink of ours replaced atomically).

    Raises:
        PathError: the path is unsafe, a file that is not a symlink is in the
            way, or another user's symlink in a sticky directory.
    """
    with parent(link, create_mode=directory_mode) as where:
        st = where.lstat()
        if st is not None:
            if not stat.S_ISLNK(st.st_mode):
                raise PathError(f"symlink {link}: a file that is not a symlink is in the way")
            where.check_ours(st, "the symlink")
        temporary = f".{where.name[:64]}.sockvisor-{secrets.token_hex(6)}"
        try:
            os.symlink(target, temporary, dir_fd=where.fd)
        except OSError as exc:
            raise PathError(f"cannot create symlink {link}: {exc.strerror}") from exc
        try:
            os.replace(temporary, where.name, src_dir_fd=where.fd, dst_dir_fd=where.fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=where.fd)
            raise PathError(f"cannot create symlink {link}: {exc.strerror}") from exc


def remove_symlink(link: str, target: str) -> None:
    """Unlink ``link`` if it is our symlink still pointing at ``target``; best effort."""
    with contextlib.suppress(PathError, OSError), parent(link) as where:
        st = where.lstat()
        if st is None or not stat.S_ISLNK(st.st_mode) or not _trusted_uid(st.st_uid):
            return
        if os.readlink(where.name, dir_fd=where.fd) == target:
            os.unlink(where.name, dir_fd=where.fd)
