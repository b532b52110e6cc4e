"""Surviving the daemon's own death: what a SIGKILLed or OOM-killed run left, found and taken back.

Theory of operation
-------------------
While it runs, the daemon keeps a small state file beside its control socket
(``CONTROL.state``): every child it supervises, with its unit, its role
(``slot``: a service, pool worker or proxy backend, which holds the unit's
listening sockets; ``child``: a per-connection child) and its start time
(``/proc/PID/stat`` field 22, so a recycled pid is never mistaken for it). It is
rewritten at most once a second, and only when the set of children changed, so
the accept path pays a flag. A clean shutdown removes it.

The next run, before binding anything, reads it back. For each recorded child
still alive with the same start time it opens a pidfd, and for a ``slot`` it
takes copies of every listening socket the child holds (``pidfd_getfd(2)``,
Linux 5.6, root or ptrace rights): those become inherited fds, adopted by
address exactly like ``LISTEN_FDS``, so no listener fails to bind and the
kernel objects (with their queued connections) are the same. The old slot
processes are then stopped gracefully (their stop signal to the process group,
SIGKILL after the unit's ``stop_timeout``), since their lifecycle state
(ready or not, restart counts, deadlines) died with the daemon and a process
the daemon cannot ``waitpid`` cannot be supervised by the lifecycle core; the
unit starts afresh on the next connection, on the sockets it got back.
Per-connection children are left to finish their connection: they are
watched through their pidfds until they exit (logged), and stopped with the
daemon if it stops first.

The file is trusted only if it is a regular file (never followed through a
symlink), owned by the daemon's user, and not writable by group or others;
otherwise it is ignored with a warning. Under systemd the daemon also stores
its listeners in systemd's fd store (``FDSTORE=1``, ``FDNAME=`` the unit), so
a restart by systemd hands them back as ``LISTEN_FDS`` even when the children
were killed with the daemon's cgroup.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import socket
import stat
from dataclasses import dataclass

SYS_PIDFD_GETFD = 438  # the same number on every architecture (asm-generic)
MAX_FDS_PER_CHILD = 1024  # fds of one old child examined at most
MAX_STATE_BYTES = 16 * 1024 * 1024
FORMAT = "sockvisor-children"


@dataclass(frozen=True, slots=True)
class Entry:
    """One child of a previous run: its unit, role (``slot`` or ``child``), pid and start time."""

    unit: str
    role: str
    pid: int
    start: int


def stat_fields(pid: int) -> list[bytes] | None:
    """``/proc/PID/stat`` from field 3 (state) on, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: the fields after it follow the last ')'.
    return data[data.rfind(b")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (``/proc/PID/stat`` field 22), None if gone."""
    rest = stat_fields(pid)
    try:
        return int(rest[19]) if rest is not None else None
    except (IndexError, ValueError):
        return None


def path_for(control_socket: str) -> str:
    return control_socket + ".state"


def write(path: str, entries: list[Entry]) -> None:
    """Replace the state file atomically (a temporary beside it, renamed over); errors are the caller's."""
    doc = {"format": FORMAT, "version": 1, "daemon": os.getpid(),
           "children": [[e.unit, e.role, e.pid, e.start] for e in entries]}
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(doc).encode())
    finally:
        os.close(fd)
    os.rename(temporary, path)


def remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def read(path: str) -> tuple[list[Entry], str | None]:
    """The entries of a previous run's state file, and why it was not trusted (None: it was, or is absent)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return [], None
    except OSError as exc:
        return [], f"cannot open {path}: {exc.strerror}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return [], f"{path} is not a regular file"
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return [], f"{path} is not owned by the daemon's user or is writable by others"
        raw = os.read(fd, MAX_STATE_BYTES + 1)
    except OSError as exc:
        return [], f"cannot read {path}: {exc.strerror}"
    finally:
        os.close(fd)
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return [], f"{path} is not JSON"
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("children"), list):
        return [], f"{path} is not a sockvisor state file"
    entries = []
    for item in doc["children"]:
        if (isinstance(item, list) and len(item) == 4 and isinstance(item[0], str) and item[1] in ("slot", "child")
                and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in item[2:])):
            entries.append(Entry(item[0], item[1], item[2], item[3]))
    return entries, None


_libc: ctypes.CDLL | None = None


def pidfd_getfd(pidfd: int, target: int) -> int:
    """A copy of fd ``target`` of the process behind ``pidfd`` (close-on-exec). Raises OSError."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = int(_libc.syscall(ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_int(pidfd), ctypes.c_int(target),
                           ctypes.c_uint(0)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def _listening(fd: int, link: str) -> bool:
    """A listening socket, a bound datagram socket, or a named fifo opened read-write (as sockvisor opens
    its fifo listeners): what a unit's listener can be. ``link`` is what /proc/PID/fd/N points to."""
    import fcntl

    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    if stat.S_ISFIFO(mode):
        # An anonymous pipe (the old daemon's stderr, say) is never a listener.
        return not link.startswith("pipe:") and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    if not stat.S_ISSOCK(mode):
        return False
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            if s.type in (socket.SOCK_DGRAM,):
                return s.getsockname() not in ("", None, ("0.0.0.0", 0))
            return bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False


@dataclass(slots=True)
class Survivor:
    """A child of a previous run that is still alive, watched through ``pidfd``."""

    entry: Entry
    pidfd: int


def recover(entries: list[Entry]) -> tuple[list[int], list[Survivor], list[str]]:
    """(listening fds taken back, surviving children, problems) for the entries of a previous run."""
    fds: list[int] = []
    seen: set[tuple[int, int]] = set()  # one socket held by several workers is taken once
    survivors: list[Survivor] = []
    problems: list[str] = []
    for entry in entries:
        if entry.pid == os.getpid() or start_time(entry.pid) != entry.start:
            continue  # gone, or the pid now belongs to another process
        try:
            pidfd = os.pidfd_open(entry.pid)
        except OSError:
            continue
        if start_time(entry.pid) != entry.start:  # recycled between the check and the open
            os.close(pidfd)
            continue
        survivors.append(Survivor(entry, pidfd))
        if entry.role != "slot":
            continue
        try:
            numbers = sorted(int(n) for n in os.listdir(f"/proc/{entry.pid}/fd"))[:MAX_FDS_PER_CHILD]
        except OSError as exc:
            problems.append(f"pid {entry.pid}: cannot list its fds: {exc.strerror}")
            continue
        for number in numbers:
            try:
                link = os.readlink(f"/proc/{entry.pid}/fd/{number}")
                fd = pidfd_getfd(pidfd, number)
            except OSError as exc:
                if exc.errno in (errno.EPERM, errno.ENOSYS):
                    problems.append(f"pid {entry.pid}: cannot take its fds: {exc.strerror}")
                    break
                continue
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) not in seen and _listening(fd, link):
                seen.add((st.st_dev, st.st_ino))
                fds.append(fd)
            else:
                os.close(fd)
    return fds, survivors, problems
