"""The proxy's data path: bytes between two connected stream sockets, driven by the event loop.

Theory of operation
-------------------
``Relays`` holds a proxy unit's open connections. Each relay joins a client
connection and a backend connection: two directions, each moving data with
``splice(2)``, socket -> pipe -> socket, so bulk bytes never enter user space.
The moving is done by ``supervisor._relay`` (C): an engine with an epoll set
and one thread of its own (per unit, never per connection) that waits on it and
moves the bytes without the GIL and without waking the event loop. The loop
watches one eventfd, readable only when relays ended; then the engine tells
Python which ones and how many bytes each carried. No task, no Python call,
no loop wake-up per event.

The rules the engine keeps (``_relay.c`` says how):

- Both fds of a relay are registered once, edge-triggered, for reading and
  writing; each side keeps "may be readable" and "may be writable" flags that
  events set and EAGAIN clears, so no ``epoll_ctl`` is made while bytes flow.
- Small reads (requests, replies) are copied once through a shared 16 KiB
  buffer (one read, one write: cheaper than two splices), and a short read
  emptied the socket, so no read is made only to see EAGAIN; a read that fills
  the buffer switches the direction to splice, a short splice read back.
- A direction is *reading* or *flushing* (bytes wait, in its pipe or buffer,
  for a full destination). A pipe is held only while it holds bytes; empty
  pipes go back to a small pool, so a thousand idle connections hold no pipe.
- End of stream on one side is passed on as ``shutdown(SHUT_WR)`` on the
  other: half-closes go through. A reset or an error on either side closes
  both, the other with a reset too, so a client sees the backend die rather
  than a clean end. A hang-up is read to the end first.
- Errors are events: libuv (under uvloop) stops watching an fd for good on
  EPOLLERR and never calls its reader; the engine's own epoll set sees them.
- Where no pipe can be had (out of fds) or splice is refused, that direction
  copies through a 64 KiB buffer.
- A relay that ended keeps its id until Python heard of it (``done``, or
  ``close_one`` if that came first), so ids are never confused.

``Poller`` is the same idea for the few fds the proxy handles in Python
(connects in flight, udp flows): an epoll set watched as one fd, so EPOLLERR
reaches the callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
from collections.abc import Callable
from typing import Generic, TypeVar

from supervisor import _relay

PIPE_SIZE = 1 << 20  # 1 MiB pipes (F_SETPIPE_SZ; the default pipe-max-size); 64 KiB costs 16x the splices on bulk
POOL_KEEP = 64  # empty pipes kept for reuse
T = TypeVar("T")


class Relays(Generic[T]):
    """Open relays, each with its owner's ``T``; ``done(token, received, sent, reset)`` when one ends.

    ``received`` counts the bytes from the client delivered to the backend,
    ``sent`` those from the backend delivered to the client; ``reset``: it
    ended by an error or reset rather than by both ends closing.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, done: Callable[[T, int, int, bool], None], *,
                 pipe_size: int = PIPE_SIZE, keep: int = POOL_KEEP, splice: bool = True) -> None:
        self._engine = _relay.Engine(self._finished, pipe_size, keep, splice)
        self._loop = loop
        self._done = done
        self._open: dict[int, T] = {}
        loop.add_reader(self._engine.fileno(), self._engine.run)  # readable only when relays ended

    def add(self, client: int, backend: int, token: T) -> int:
        """Relay between two connected non-blocking fds, which the engine owns (and closes) from now on."""
        rid = self._engine.add(client, backend)
        self._open[rid] = token
        return rid

    def _finished(self, rid: int, received: int, sent: int, reset: bool) -> None:
        self._done(self._open.pop(rid), received, sent, reset)

    def close_one(self, rid: int, *, reset: bool = False) -> None:
        """End one relay now (a drain that ran out of time); ``done`` is called for it."""
        received, sent = self._engine.close_relay(rid, reset)
        self._done(self._open.pop(rid), received, sent, reset)

    def ids(self) -> list[int]:
        return list(self._open)

    def tokens(self) -> list[T]:
        return list(self._open.values())

    def totals(self) -> tuple[int, int]:
        """(received, sent) so far over the open relays."""
        return self._engine.totals()

    @property
    def pipes_created(self) -> int:
        return int(self._engine.pipes_created)

    def __len__(self) -> int:
        return len(self._open)

    def close(self) -> None:
        """Close every relay (without calling ``done``), the pipes and the engine (its thread is joined)."""
        self._loop.remove_reader(self._engine.fileno())
        self._engine.close()
        self._open.clear()


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
