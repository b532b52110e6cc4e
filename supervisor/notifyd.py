"""The daemon's side of the sd_notify protocol.

Theory of operation
-------------------
Each unit gets its own datagram socket in the abstract namespace
(``@sockvisor/<daemon pid>/<token>/<unit>``), offered to its children as
``NOTIFY_SOCKET``. Abstract sockets have no permissions: any local user can
send to one. So a message acts on a unit only when its sender is positively
known to be one of the unit's processes (``identify``):

- the pid from ``SCM_CREDENTIALS`` (the kernel fills it in; only
  CAP_SYS_ADMIN can claim another) is a child we started and have not yet
  finished reaping: its pid cannot have been reused; or
- the sender (from ``SCM_PIDFD`` when the kernel has it, else a pidfd we open
  for the credential pid) is alive, its uid is root or the unit's user, and
  it is in the tree of one of our children: its session is the child's (every
  child is a session leader, and nobody can join a session from outside), or
  its parent chain reaches the child. The pidfd is opened *before* reading
  ``/proc`` and checked alive *after*: a live pidfd pins the pid, so what
  ``/proc`` said was about the process the pidfd names.

Everything else is dropped with a reason (the caller counts and logs it). A
sender that exited before its datagram was read is no longer in any tree and
is dropped: that is what ``BARRIER=1`` is for (``systemd-notify`` and
``sd_notify_barrier()`` wait, alive, until the daemon has read what they sent
and closed the barrier fd).

Messages are ``KEY=VALUE`` lines (at most ``MAX_MESSAGE`` bytes, as systemd's
limit); oversized, malformed or credential-less datagrams are dropped, never
raised. fds arriving with ``SCM_RIGHTS`` are handed to the caller with the
message or closed at once.

Work per wake-up is bounded: at most ``BATCH`` datagrams per readiness
callback, and a token bucket per unit (``RATE`` a second, ``BURST`` at once);
when it runs dry the socket is left unread until it refills a quarter, so a
flooding sender blocks on the full socket buffer instead of costing the
daemon its CPU.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import select
import socket
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass

from supervisor import recovery

MAX_MESSAGE = 4096  # systemd's NOTIFY_BUFFER_MAX is PIPE_BUF
MAX_FDS = 768  # systemd accepts at most this many fds in one message
_UCRED = struct.Struct("3i")
# Linux 6.5+: a pidfd of the sender with every message (not yet named in Python's socket module).
SO_PASSPIDFD = 76
SCM_PIDFD = 0x04
BATCH = 64  # datagrams read per readiness callback
RATE = 200.0  # sustained messages a second per unit; nothing legitimate sends more
BURST = 400.0
_TREE_DEPTH = 64  # parent links followed from a sender towards one of our children

GONE = "sender is gone"
FOREIGN = "sender is not a child of this unit"
WRONG_USER = "sender's user does not fit"


@dataclass(frozen=True, slots=True)
class Message:
    pid: int  # the sender's pid, from SCM_CREDENTIALS
    uid: int  # the sender's uid, from SCM_CREDENTIALS
    fields: dict[str, str]
    fds: tuple[int, ...]
    pidfd: int = -1  # from SCM_PIDFD, -1 without; the receiver closes it


@dataclass(slots=True)
class Bucket:
    """A token bucket on the caller's clock: ``take`` one token, ``wait`` for a quarter refill."""

    rate: float = RATE
    burst: float = BURST
    tokens: float = BURST
    at: float = 0.0

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def wait(self) -> float:
        """Seconds until a quarter of the burst is back."""
        return max(0.0, (self.burst / 4 - self.tokens) / self.rate)


def parse(data: bytes) -> dict[str, str] | None:
    """``KEY=VALUE`` lines into a dict; None when malformed (not UTF-8, a line without '=')."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    fields: dict[str, str] = {}
    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            return None
        fields[key] = value
    return fields


class Endpoint:
    """One unit's notify socket; ``on_message`` gets each valid message, ``on_drop`` each dropped one.

    ``on_drop(reason, pid)`` gets the credential pid, or 0 when there was none.
    """

    def __init__(self, unit: str, on_message: Callable[[Message], None],
                 on_drop: Callable[[str, int], None], on_pause: Callable[[float], None] | None = None,
                 *, adopt: tuple[str, int] | None = None) -> None:
        """``adopt``: (address, fd) of the socket a previous image of the daemon bound (re-exec)."""
        if adopt is not None:
            self.address = adopt[0]
            self.sock = socket.socket(fileno=adopt[1])
            os.set_inheritable(adopt[1], False)
            self.sock.setblocking(False)
        else:
            self.address = f"@sockvisor/{os.getpid()}/{os.urandom(4).hex()}/{unit}"
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_PASSPIDFD, 1)
            self.pidfds = True
        except OSError:
            self.pidfds = False  # before Linux 6.5: pidfd_open(credential pid) instead
        if adopt is None:
            self.sock.bind("\0" + self.address[1:])
        # Room for a message up to MAX_MESSAGE; larger ones are truncated
        # (MSG_TRUNC tells) and dropped.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        self._on_message = on_message
        self._on_drop = on_drop
        self._on_pause = on_pause
        self._ancbuf = (socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(MAX_FDS * 4)
                        + socket.CMSG_SPACE(4))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._resume: asyncio.TimerHandle | None = None
        self.bucket = Bucket()
        self.paused = 0  # times the socket was left unread for the rate

    def fileno(self) -> int:
        return self.sock.fileno()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the socket whenever it is readable (within the rate)."""
        self._loop = loop
        self.bucket.at = loop.time()
        self._watch(True)

    def _watch(self, on: bool) -> None:
        if self._loop is None or on == self._reading:
            return
        self._reading = on
        if on:
            self._loop.add_reader(self.fileno(), self.readable)
        else:
            self._loop.remove_reader(self.fileno())

    def pause(self) -> None:
        """Leave datagrams queued in the socket (a re-exec: the next image reads them)."""
        self._watch(False)

    def resume(self) -> None:
        self._watch(True)

    def close(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        self._watch(False)
        self.sock.close()

    def readable(self) -> None:
        """Read up to ``BATCH`` datagrams within the unit's rate (called when the socket polls readable)."""
        loop = self._loop
        for _ in range(BATCH):
            if loop is not None and not self.bucket.take(loop.time()):
                self._pause(loop)
                return
            if not self._receive_one():
                return

    def _pause(self, loop: asyncio.AbstractEventLoop) -> None:
        self._watch(False)
        self.paused += 1
        delay = max(self.bucket.wait(), 0.01)
        if self._on_pause is not None:
            self._on_pause(delay)

        def resume() -> None:
            self._resume = None
            self._watch(True)
        self._resume = loop.call_later(delay, resume)

    def drain(self, limit: int = BATCH) -> None:
        """Read up to ``limit`` queued datagrams now, ignoring the rate (a child's last words before its exit)."""
        for _ in range(limit):
            if not self._receive_one():
                return

    def _receive_one(self) -> bool:
        """Read and dispatch one datagram; False when none was queued (or the socket failed)."""
        try:
            data, anc, flags, _ = self.sock.recvmsg(MAX_MESSAGE, self._ancbuf, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._on_drop(f"receive failed: {exc.strerror}", 0)
            return False
        pid = uid = -1
        pidfd = -1
        fds: list[int] = []
        for level, kind, payload in anc:
            if level != socket.SOL_SOCKET:
                continue
            if kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                pid, uid, _gid = _UCRED.unpack_from(payload)
            elif kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
            elif kind == SCM_PIDFD and len(payload) >= 4:
                pidfd = struct.unpack_from("i", payload)[0]  # negative: the kernel's errno (sender gone)
        reason = None
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            reason = "message too large"
        fields = parse(data) if reason is None else None
        if reason is None and fields is None:
            reason = "malformed message"
        if reason is None and pid <= 0:
            reason = "no sender credentials"
        if reason is not None or fields is None:
            _close(fds)
            _close([pidfd])
            self._on_drop(reason or "malformed message", max(pid, 0))
            return True
        try:
            self._on_message(Message(pid=pid, uid=uid, fields=fields, fds=tuple(fds), pidfd=pidfd))
        except Exception as exc:  # one bad message must not stop the drain, nor the exit handling that drains
            self._on_drop(f"handler failed: {exc!r}", pid)
        finally:
            _close([pidfd])
        return True


def _close(fds: Collection[int]) -> None:
    for fd in fds:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, session id) of ``pid`` from /proc, or None if it is gone."""
    rest = recovery.stat_fields(pid)
    try:
        return (int(rest[1]), int(rest[3])) if rest is not None else None
    except (IndexError, ValueError):
        return None


def _pidfd_pid(pidfd: int) -> int:
    """The pid a pidfd names (from /proc/self/fdinfo), or -1 once that process is gone."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
            for line in f:
                if line.startswith(b"Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return -1


def _alive(pidfd: int) -> bool:
    """Whether the process of ``pidfd`` still runs (a pidfd polls readable once it has exited)."""
    readable, _, _ = select.select([pidfd], [], [], 0)
    return not readable


def _in_tree(pid: int, children: Collection[int]) -> int | None:
    """The child of ours whose session or parent chain holds ``pid``, or None."""
    current = pid
    for _ in range(_TREE_DEPTH):
        st = _stat(current)
        if st is None:
            return None
        ppid, sid = st
        if current == pid and sid in children:
            return sid
        if ppid in children:
            return ppid
        if ppid <= 1 or ppid == os.getpid():
            return None
        current = ppid
    return None


def identify(msg: Message, children: Collection[int], uids: Collection[int]) -> tuple[int | None, str]:
    """(the child ``msg``'s sender belongs to, "") or (None, why it cannot be credited to any).

    Args:
        msg: a received message (its credentials and optional pidfd).
        children: the pids of the unit's children that we started and still own (unreaped,
            or being reaped right now).
        uids: the uids a sender of this unit may have (root and the unit's user).
    """
    if msg.pid in children:
        return msg.pid, ""
    if msg.uid not in uids:
        return None, WRONG_USER
    own = -1
    pidfd = msg.pidfd
    if pidfd < 0:
        try:
            pidfd = own = os.pidfd_open(msg.pid)
        except OSError:
            return None, GONE
        sender = msg.pid
    else:
        sender = _pidfd_pid(pidfd)
        if sender <= 0:
            return None, GONE
    try:
        owner = _in_tree(sender, children)
        if not _alive(pidfd):
            return None, GONE
        if owner is None:
            return None, FOREIGN
        return owner, ""
    finally:
        if own >= 0:
            os.close(own)
