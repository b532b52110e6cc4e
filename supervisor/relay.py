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
import select
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


class Poller:
    """An epoll set of its own, watched by the loop as one fd: readiness *with errors* for many fds.

    libuv (under uvloop) stops watching an fd for good when the kernel reports
    EPOLLERR on it (a reset connection, an ICMP error on a udp socket, a failed
    connect) and never calls its reader. A proxy must see exactly those events,
    so its connections are watched here instead: the loop watches this set's
    epoll fd (which is only ever readable), and ``_dispatch`` hands each fd's
    events, errors included, to its callback. Changing what an fd waits for is
    one ``epoll_ctl``, cheaper than the loop's add_reader/remove_reader.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._ep = select.epoll()
        self._callbacks: dict[int, Callable[[int], None]] = {}
        self._masks: dict[int, int] = {}
        self._loop = loop
        loop.add_reader(self._ep.fileno(), self._dispatch)

    def watch(self, fd: int, mask: int, callback: Callable[[int], None]) -> None:
        self._ep.register(fd, mask)
        self._callbacks[fd] = callback
        self._masks[fd] = mask

    def change(self, fd: int, mask: int) -> None:
        if self._masks.get(fd) != mask:
            self._ep.modify(fd, mask)
            self._masks[fd] = mask

    def forget(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            del self._masks[fd]
            with contextlib.suppress(OSError):
                self._ep.unregister(fd)

    def __len__(self) -> int:
        return len(self._callbacks)

    def _dispatch(self) -> None:
        for fd, events in self._ep.poll(0, 256):
            callback = self._callbacks.get(fd)
            if callback is not None:
                callback(events)

    def close(self) -> None:
        self._loop.remove_reader(self._ep.fileno())
        self._ep.close()
        self._callbacks.clear()
        self._masks.clear()


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


IN = select.EPOLLIN
OUT = select.EPOLLOUT


class Relay:
    """Forward between ``client`` and ``backend`` (connected, non-blocking stream socket fds) until both ends close.

    The relay owns both fds from now on and closes them. ``done(relay)`` is
    called once, after both are closed. ``received`` counts the bytes from the
    client delivered to the backend, ``sent`` those from the backend delivered
    to the client.
    """

    __slots__ = ("_down", "_parked", "_pipes", "_poller", "_up", "backend", "client", "closed", "done", "started")

    def __init__(self, poller: Poller, client: int, backend: int, pipes: PipePool,
                 done: Callable[[Relay], None], now: float) -> None:
        self._poller = poller
        self._pipes = pipes
        self.client = client
        self.backend = backend
        self.done = done
        self.closed = False
        self.started = now
        self._up = _Direction(client, backend)
        self._down = _Direction(backend, client)
        self._parked: int | None = None  # an fd left out of the poller after a hang-up (see _ready)
        poller.watch(client, IN, self._client_ready)
        poller.watch(backend, IN, self._backend_ready)

    @property
    def received(self) -> int:
        return self._up.moved

    @property
    def sent(self) -> int:
        return self._down.moved

    # ------------------------------------------------------------ readiness

    def _client_ready(self, events: int) -> None:
        # The client fd is read by "up" and written by "down".
        self._ready(events, self.client, self._up, self._down)

    def _backend_ready(self, events: int) -> None:
        self._ready(events, self.backend, self._down, self._up)

    def _ready(self, events: int, fd: int, reads: _Direction, writes: _Direction) -> None:
        """``fd`` is read by ``reads`` and written by ``writes``."""
        if events & select.EPOLLERR:
            self._hung_up(fd)
            return
        if events & OUT and writes.flushing:
            self._pump(writes)
        if self.closed or not events & (IN | select.EPOLLHUP):
            return
        if not reads.flushing and not reads.ended:
            self._pump(reads)  # after a hang-up, what is left is still read (then the end of stream)
        elif events & select.EPOLLHUP:
            if reads.ended:
                self.close()  # both ways closed: nothing more can pass
            else:
                # Everything is sent, but we cannot read now (our pipe waits for a full peer): a
                # hang-up is reported whatever the mask says, so leave the fd out until the flush is done.
                self._poller.forget(fd)
                self._parked = fd

    def _hung_up(self, fd: int) -> None:
        """An error or a full hang-up on ``fd``: nothing more can pass; a reset is passed on as a reset."""
        sock = socket.socket(fileno=fd)
        try:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            err = errno.EBADF
        finally:
            sock.detach()
        self.close(reset=err != 0)

    def _masks(self) -> None:
        """Tell the poller what each fd waits for now."""
        up, down = self._up, self._down
        parked = self._parked
        if parked is not None and not (up if parked == self.client else down).flushing:
            self._parked = None  # flushed: read what is left after the hang-up
            self._poller.watch(parked, IN, self._client_ready if parked == self.client else self._backend_ready)
        if self._parked != self.client:
            self._poller.change(self.client, (0 if up.flushing or up.ended else IN) | (OUT if down.flushing else 0))
        if self._parked != self.backend:
            self._poller.change(self.backend, (0 if down.flushing or down.ended else IN) | (OUT if up.flushing else 0))

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
        if self.closed:
            return
        if not d.flushing and d.pipe is not None and d.pending == 0:
            self._release_pipe(d)
        self._masks()

    def _splice(self, d: _Direction) -> None:
        for _ in range(ROUNDS):
            if d.pending:
                assert d.pipe is not None
                try:
                    n = os.splice(d.pipe[0], d.dst, d.pending, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    d.flushing = True
                    return
                d.pending -= n
                d.moved += n
                if d.pending:
                    d.flushing = True
                    return
                d.flushing = False
            if d.ended:
                return
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
                    d.flushing = True
                    return
                d.moved += n
                if n < d.pending:
                    d.buffer[:d.pending - n] = d.buffer[n:d.pending]
                    d.pending -= n
                    d.flushing = True
                    return
                d.pending = 0
                d.flushing = False
            if d.ended:
                return
            try:
                n = os.readv(d.src, [view])
            except BlockingIOError:
                return
            if n == 0:
                self._ended(d)
                return
            d.pending = n

    def _release_pipe(self, d: _Direction) -> None:
        if d.pipe is not None:
            self._pipes.give(d.pipe)
            d.pipe = None

    def _ended(self, d: _Direction) -> None:
        """End of stream from ``d.src`` (everything read was written): pass the half-close on."""
        d.ended = True
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
        for fd in (self.client, self.backend):
            self._poller.forget(fd)
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
