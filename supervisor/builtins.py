"""``builtin:``: the small services xinetd answers itself, answered by the daemon without spawning.

Theory of operation
-------------------
echo (RFC 862), discard (RFC 863), daytime (RFC 867), chargen (RFC 864) and
time (RFC 868), over streams and datagrams.

- Streams (``mode: accept``): the accept runtime admits the connection with
  its usual policy (limits, allow/deny, access_times, banners, logs) and hands
  it to ``Streams`` instead of spawning. daytime and time answer and close;
  echo sends back what it reads; discard reads and drops; chargen writes its
  rotating 72-character lines for as long as the peer reads, and stops when it
  closes. Every write is non-blocking: a peer that does not read makes echo
  stop reading and chargen stop writing, never the daemon wait. The fds sit in
  a ``relay.Poller`` (errors are events). When a connection ends, ``done`` lets
  the runtime release its admission.
- Datagrams (``mode: service`` on udp or unix-dgram listeners): ``DatagramRuntime``
  polls the listeners and answers each datagram: echo returns it, discard drops
  it, daytime and time reply, chargen replies with a random-length line block
  (0-512 characters, as RFC 864 says).
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import struct
import time
from collections.abc import Callable

from supervisor import sockets
from supervisor.lifecycle import SlotState
from supervisor.model import Builtin, Unit
from supervisor.relay import Poller
from supervisor.units import Host, UnitRuntime, UnitState

RFC868_EPOCH = 2208988800  # seconds from 1900-01-01 to 1970-01-01
_LINE = 72
_PRINTABLE = bytes(range(32, 127))  # the 95 printable characters chargen cycles through
CHARGEN_BLOCK = 64  # lines per write attempt
ECHO_MAX = 1 << 16


def daytime(now: float) -> bytes:
    """RFC 867 leaves the format open; this is xinetd's (``06 DEC 2026 03:05:09 UTC``), local time."""
    return time.strftime("%d %b %Y %H:%M:%S %Z\r\n", time.localtime(now)).upper().encode()


def time_reply(now: float) -> bytes:
    """RFC 868: seconds since 1900 as 32 bits, big-endian (wrapping in 2036 as the RFC's clock does)."""
    return struct.pack("!I", (int(now) + RFC868_EPOCH) & 0xFFFFFFFF)


def chargen_line(index: int) -> bytes:
    """Line ``index`` of RFC 864's pattern: 72 printable characters starting one further each line, CRLF."""
    start = index % len(_PRINTABLE)
    doubled = _PRINTABLE + _PRINTABLE
    return doubled[start:start + _LINE] + b"\r\n"


def chargen_datagram(rng: random.Random) -> bytes:
    """A datagram reply: a random number (0-512) of characters of the pattern."""
    n = rng.randint(0, 512)
    out = b"".join(chargen_line(i)[:-2] for i in range(n // _LINE + 1))
    return out[:n]


class _Conn:
    __slots__ = ("fd", "line", "pending", "token")

    def __init__(self, fd: int, token: object) -> None:
        self.fd = fd
        self.token = token
        self.pending = b""  # echo: what the peer did not take yet
        self.line = 0  # chargen: next line index


class Streams:
    """The stream connections of one builtin unit; ``done(token)`` when each ends."""

    def __init__(self, host: Host, kind: Builtin, done: Callable[[object], None]) -> None:
        self.kind = kind
        self._kind = kind
        self._done = done
        self._poller = Poller(host.loop)
        self._conns: dict[int, _Conn] = {}

    def __len__(self) -> int:
        return len(self._conns)

    def serve(self, fd: int, token: object) -> None:
        """Take over an admitted connection (its fd is ours from now on)."""
        os.set_blocking(fd, False)
        kind = self._kind
        if kind in (Builtin.DAYTIME, Builtin.TIME):
            now = time.time()
            reply = daytime(now) if kind is Builtin.DAYTIME else time_reply(now)
            with contextlib.suppress(OSError):
                os.write(fd, reply)  # a few bytes into an empty send buffer
            os.close(fd)
            self._done(token)
            return
        conn = _Conn(fd, token)
        self._conns[fd] = conn
        mask = select.EPOLLIN | (select.EPOLLOUT if kind is Builtin.CHARGEN else 0)
        self._poller.watch(fd, mask, lambda events: self._ready(conn, events))

    def _ready(self, c: _Conn, events: int) -> None:
        try:
            if events & select.EPOLLERR:
                raise ConnectionResetError
            if self._kind is Builtin.CHARGEN:
                self._chargen(c, events)
            else:
                self._echo_or_discard(c, events)
        except OSError:
            self._end(c)

    def _echo_or_discard(self, c: _Conn, events: int) -> None:
        if c.pending and events & select.EPOLLOUT:
            c.pending = c.pending[os.write(c.fd, c.pending):]
            if not c.pending:
                self._poller.change(c.fd, select.EPOLLIN)
            return
        if not events & (select.EPOLLIN | select.EPOLLHUP) or c.pending:
            return
        try:
            data = os.read(c.fd, ECHO_MAX)
        except BlockingIOError:
            return
        if not data:
            self._end(c)
            return
        if self._kind is Builtin.ECHO:
            try:
                sent = os.write(c.fd, data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                c.pending = data[sent:]  # the peer is not reading: stop reading until it does
                self._poller.change(c.fd, select.EPOLLOUT)

    def _chargen(self, c: _Conn, events: int) -> None:
        if events & (select.EPOLLIN | select.EPOLLHUP):
            try:
                if os.read(c.fd, 4096) == b"":
                    self._end(c)  # the peer closed: chargen stops
                    return
            except BlockingIOError:
                pass
        if events & select.EPOLLOUT:
            while True:
                if not c.pending:
                    c.pending = b"".join(chargen_line(c.line + i) for i in range(CHARGEN_BLOCK))
                    c.line += CHARGEN_BLOCK
                try:
                    sent = os.write(c.fd, c.pending)
                except BlockingIOError:
                    return
                c.pending = c.pending[sent:]
                if c.pending:
                    return

    def _end(self, c: _Conn) -> None:
        if self._conns.pop(c.fd, None) is None:
            return
        self._poller.forget(c.fd)
        with contextlib.suppress(OSError):
            os.close(c.fd)
        self._done(c.token)

    def end_all(self) -> None:
        """End every connection now (each ``done`` is called): the unit stops."""
        for c in list(self._conns.values()):
            self._end(c)

    def close(self) -> None:
        self.end_all()
        self._poller.close()


class DatagramRuntime(UnitRuntime):
    """``mode: service`` with ``builtin``: the daemon answers each datagram on the unit's listeners."""

    def __init__(self, host: Host, unit: Unit, bound: list[sockets.Bound]) -> None:
        super().__init__(host, unit, bound)
        self._rng = random.Random()
        self.datagrams = 0

    def pids(self) -> list[int]:
        return []

    def state(self) -> str:
        return str((SlotState.RUNNING if self.polling else SlotState.STOPPED).value)

    def set_blocking(self) -> None:
        for b in self.bound:
            if b.sock is not None:
                sockets.set_blocking(b.fd, False)

    def activate(self) -> None:
        if self.unit.enabled and self.life is UnitState.ENABLED:
            self.poll(True)

    def operator_start(self) -> None:
        self.life = UnitState.ENABLED
        self.activate()

    def operator_stop(self) -> None:
        self.life = UnitState.STOPPED
        self.poll(False)

    def operator_restart(self) -> None:
        self.operator_stop()
        self.operator_start()

    def shutdown(self) -> None:
        if self.life is not UnitState.RETIRING:
            self.life = UnitState.SHUTTING_DOWN
        self.poll(False)

    def readable(self, bound: sockets.Bound) -> None:
        sock = bound.sock
        if sock is None:
            return
        kind = self.unit.builtin
        for _ in range(64):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # an ICMP error from an earlier reply: that peer is gone
            self.datagrams += 1
            self.accepted += 1
            if kind is Builtin.DISCARD:
                continue
            now = time.time()
            if kind is Builtin.ECHO:
                reply = data
            elif kind is Builtin.DAYTIME:
                reply = daytime(now)
            elif kind is Builtin.TIME:
                reply = time_reply(now)
            else:
                reply = chargen_datagram(self._rng)
            if not addr:
                continue  # an unbound unix-dgram sender cannot be answered
            with contextlib.suppress(OSError):
                sock.sendto(reply, addr)

