"""The daemon's side of the sd_notify protocol.

Theory of operation
-------------------
Each unit gets its own datagram socket in the abstract namespace
(``@sockvisor/<daemon pid>/<token>/<unit>``), offered to its children as
``NOTIFY_SOCKET``. A message arriving on a unit's socket can only be about
that unit, whatever pid the sender claims; to know *which* of the unit's
processes sent it (a pool has several), the sender's credentials
(``SO_PASSCRED``) are resolved to its session: every child is spawned as a
session leader, so ``getsid(sender)`` is the pid of the child it belongs to,
even when the sender is a helper such as ``systemd-notify`` run from a shell.

Messages are ``KEY=VALUE`` lines (at most ``MAX_MESSAGE`` bytes, as systemd's
limit); oversized, malformed or credential-less datagrams are dropped and
logged, never raised. fds arriving with ``SCM_RIGHTS`` are handed to the
caller with the message (``FDSTORE=1``) or closed at once.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

MAX_MESSAGE = 4096  # systemd's NOTIFY_BUFFER_MAX is PIPE_BUF
MAX_FDS = 768  # systemd accepts at most this many fds in one message
_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class Message:
    pid: int  # the sender's pid, from SCM_CREDENTIALS
    fields: dict[str, str]
    fds: tuple[int, ...]


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
    """One unit's notify socket; ``on_message`` gets each valid message, ``on_drop`` each dropped one."""

    def __init__(self, unit: str, on_message: Callable[[Message], None], on_drop: Callable[[str], None]) -> None:
        self.address = f"@sockvisor/{os.getpid()}/{os.urandom(4).hex()}/{unit}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + self.address[1:])
        # Room for a message up to MAX_MESSAGE; larger ones are truncated
        # (MSG_TRUNC tells) and dropped.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        self._on_message = on_message
        self._on_drop = on_drop
        self._ancbuf = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(MAX_FDS * 4)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def readable(self) -> None:
        """Drain every queued datagram (called when the socket polls readable)."""
        while True:
            try:
                data, anc, flags, _ = self.sock.recvmsg(MAX_MESSAGE, self._ancbuf, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._on_drop(f"receive failed: {exc.strerror}")
                return
            pid = 0
            fds: list[int] = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                    pid = _UCRED.unpack_from(payload)[0]
                elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                    fds.extend(arr)
            reason = None
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                reason = "message too large"
            fields = parse(data) if reason is None else None
            if reason is None and fields is None:
                reason = "malformed message"
            if reason is None and pid <= 0:
                reason = "no sender credentials"
            if reason is not None or fields is None:
                for fd in fds:
                    os.close(fd)
                self._on_drop(reason or "malformed message")
                continue
            try:
                self._on_message(Message(pid=pid, fields=fields, fds=tuple(fds)))
            except Exception as exc:  # one bad message must not stop the drain, nor the exit handling that drains
                self._on_drop(f"handler failed: {exc!r}")


def session_of(pid: int) -> int | None:
    """The session id of ``pid`` (our child's pid for anything it started), or None if it is gone."""
    try:
        return os.getsid(pid)
    except OSError:
        return None
