"""The proxy's data path: bytes between two connected stream sockets, on the event loop.

Theory of operation
-------------------
A ``Relay`` joins a client connection and a backend connection: two
directions, each reading one fd and writing the other. A direction moves data
with ``splice(2)``: socket -> pipe -> socket, so the bytes never enter user
space. Nothing runs per connection but readiness callbacks: no thread, no
task, no buffer object.

A direction is either *reading* (a reader registered on its source) or
*flushing* (bytes wait in its pipe because the destination is full: the
reader is off, a writer on the destination is on). Whatever a pipe holds is
owned by one direction, so pipes are only held while they hold bytes: an
empty pipe goes back to a small ``PipePool`` after each callback, and a
thousand idle connections hold no pipe at all.

End of stream on one side (splice returns 0 with nothing pending) is passed on
as ``shutdown(SHUT_WR)`` on the other: half-closes go through. A reset or any
other error on either side closes both (the other side gets a reset too, so a
client sees the backend die rather than a clean end). When both directions
have ended, the relay closes itself and calls ``done``.

Where splice cannot be used (no pipe can be had: out of fds; or a kernel that
refuses splice for a socket type), that direction copies through one
bytearray with ``recv_into``/``send``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Callable

CHUNK = 1 << 20  # most bytes one splice() may move: bounded by the pipe's capacity anyway
PIPE_SIZE = 1 << 18  # 256 KiB pipes (F_SETPIPE_SZ); the default 64 KiB costs 4x the syscalls on bulk data
POOL_KEEP = 64  # empty pipes kept for reuse
ROUNDS = 16  # read/write rounds per readiness callback before yielding to the loop
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# Errors after which the connection is gone (the other side gets a reset).
_GONE = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH,
                   errno.ECONNABORTED, errno.ENOTCONN})
_NO_SPLICE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
_LINGER_RESET = struct.pack("ii", 1, 0)


class PipePool:
    """Empty pipes for reuse; a pipe that still holds bytes is never given back (it is closed)."""

    def __init__(self, keep: int = POOL_KEEP, size: int = PIPE_SIZE) -> None:
        self._free: list[tuple[int, int]] = []
        self._keep = keep
        self._size = size
        self.created = 0

    def take(self) -> tuple[int, int] | None:
        """An empty pipe (read end, write end), or None when none can be made (out of fds)."""
        if self._free:
            return self._free.pop()
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, F_SETPIPE_SZ, self._size)  # a smaller pipe still works
        self.created += 1
        return r, w

    def give(self, pipe: tuple[int, int]) -> None:
        """Take back an empty pipe."""
        if len(self._free) < self._keep:
            self._free.append(pipe)
        else:
            _close(pipe)

    def __len__(self) -> int:
        return len(self._free)

    def close(self) -> None:
        for pipe in self._free:
            _close(pipe)
        self._free.clear()


def _close(pipe: tuple[int, int]) -> None:
    for fd in pipe:
        with contextlib.suppress(OSError):
            os.close(fd)


class _Direction:
    """One way through a relay: ``src`` is read, ``dst`` written; ``moved`` counts the bytes delivered."""

    __slots__ = ("buffer", "dst", "ended", "flushing", "moved", "pending", "pipe", "splice", "src")

    def __init__(self, src: int, dst: int) -> None:
        self.src = src
        self.dst = dst
        self.pipe: tuple[int, int] | None = None
        self.pending = 0  # bytes in the pipe (or buffer) not yet written to dst
        self.moved = 0
        self.ended = False
        self.flushing = False
        self.splice = True
        self.buffer: bytearray | None = None


class Relay:
    """Forward between ``client`` and ``backend`` (connected, non-blocking stream socket fds) until both ends close.

    The relay owns both fds from now on and closes them. ``done(relay)`` is
    called once, after both are closed. ``received`` counts the bytes from the
    client delivered to the backend, ``sent`` those from the backend delivered
    to the client.
    """

    __slots__ = ("_down", "_loop", "_pipes", "_up", "backend", "client", "closed", "done", "started")

    def __init__(self, loop: asyncio.AbstractEventLoop, client: int, backend: int, pipes: PipePool,
                 done: Callable[[Relay], None]) -> None:
        self._loop = loop
        self._pipes = pipes
        self.client = client
        self.backend = backend
        self.done = done
        self.closed = False
        self.started = loop.time()
        self._up = _Direction(client, backend)
        self._down = _Direction(backend, client)
        loop.add_reader(client, self._pump, self._up)
        loop.add_reader(backend, self._pump, self._down)

    @property
    def received(self) -> int:
        return self._up.moved

    @property
    def sent(self) -> int:
        return self._down.moved

    # ------------------------------------------------------------ moving bytes

    def _pump(self, d: _Direction) -> None:
        try:
            if d.splice:
                self._splice(d)
            else:
                self._copy(d)
        except OSError as exc:
            if exc.errno in _NO_SPLICE and d.splice and d.pending == 0:
                d.splice = False  # this socket cannot splice: copy instead, from now on
                self._release_pipe(d)
                self._pump(d)
                return
            self.close(reset=exc.errno in _GONE)
            return
        if not self.closed and not d.flushing and d.pipe is not None and d.pending == 0:
            self._release_pipe(d)

    def _splice(self, d: _Direction) -> None:
        for _ in range(ROUNDS):
            if d.pending:
                assert d.pipe is not None
                try:
                    n = os.splice(d.pipe[0], d.dst, d.pending, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    self._flush_later(d)
                    return
                d.pending -= n
                d.moved += n
                if d.pending:
                    self._flush_later(d)
                    return
                if d.flushing:
                    self._read_again(d)
            if d.pipe is None:
                d.pipe = self._pipes.take()
                if d.pipe is None:
                    d.splice = False  # no pipe to be had (out of fds): copy this direction
                    self._copy(d)
                    return
            try:
                n = os.splice(d.src, d.pipe[1], CHUNK, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return
            if n == 0:
                self._ended(d)
                return
            d.pending = n

    def _copy(self, d: _Direction) -> None:
        if d.buffer is None:
            d.buffer = bytearray(1 << 16)
        view = memoryview(d.buffer)
        for _ in range(ROUNDS):
            if d.pending:
                try:
                    n = os.write(d.dst, view[:d.pending])
                except BlockingIOError:
                    self._flush_later(d)
                    return
                d.moved += n
                if n < d.pending:
                    d.buffer[:d.pending - n] = d.buffer[n:d.pending]
                    d.pending -= n
                    self._flush_later(d)
                    return
                d.pending = 0
                if d.flushing:
                    self._read_again(d)
            try:
                n = os.readv(d.src, [view])
            except BlockingIOError:
                return
            if n == 0:
                self._ended(d)
                return
            d.pending = n

    def _flush_later(self, d: _Direction) -> None:
        """The destination is full: stop reading the source until the destination can take more."""
        if not d.flushing:
            d.flushing = True
            self._loop.remove_reader(d.src)
            self._loop.add_writer(d.dst, self._pump, d)

    def _read_again(self, d: _Direction) -> None:
        d.flushing = False
        self._loop.remove_writer(d.dst)
        self._loop.add_reader(d.src, self._pump, d)

    def _release_pipe(self, d: _Direction) -> None:
        if d.pipe is not None:
            self._pipes.give(d.pipe)
            d.pipe = None

    def _ended(self, d: _Direction) -> None:
        """End of stream from ``d.src`` (everything read was written): pass the half-close on."""
        d.ended = True
        self._loop.remove_reader(d.src)
        other = self._down if d is self._up else self._up
        if other.ended:
            self.close()
            return
        try:
            _shutdown_write(d.dst)
        except OSError:
            self.close(reset=True)

    # ------------------------------------------------------------ closing

    def close(self, *, reset: bool = False) -> None:
        """Close both sides now (``reset``: with an RST, so the peer sees an abort, not an end)."""
        if self.closed:
            return
        self.closed = True
        loop = self._loop
        for fd in (self.client, self.backend):
            loop.remove_reader(fd)
            loop.remove_writer(fd)
            if reset:
                with contextlib.suppress(OSError):
                    _linger_reset(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
        for d in (self._up, self._down):
            if d.pipe is not None:
                if d.pending == 0:
                    self._pipes.give(d.pipe)
                else:
                    _close(d.pipe)  # bytes nobody will read
                d.pipe = None
        self.done(self)


def _shutdown_write(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    finally:
        sock.detach()


def _linger_reset(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    finally:
        sock.detach()
