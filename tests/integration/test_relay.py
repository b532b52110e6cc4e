"""The proxy's data path in-process: real loopback TCP pairs through the C relay engine on a uvloop loop."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from supervisor.relay import Relays


def _pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (outer end, daemon end)."""
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        outer = socket.create_connection(lst.getsockname())
        inner, _ = lst.accept()
    inner.setblocking(False)
    return outer, inner


def _run(body: Callable[[asyncio.AbstractEventLoop], Awaitable[Any]]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(body(runner.get_loop()))


class _Setup:
    def __init__(self, loop: asyncio.AbstractEventLoop, relays: Relays[_Setup] | None = None,
                 splice: bool = True) -> None:
        self.client, client_inner = _pair()
        self.backend, backend_inner = _pair()
        self.finished = asyncio.Event()
        self.result: tuple[int, int, bool] | None = None
        self.relays = relays if relays is not None else Relays(loop, _Setup._done, splice=splice)
        self.relays.add(client_inner.detach(), backend_inner.detach(), self)

    @staticmethod
    def _done(setup: _Setup, received: int, sent: int, reset: bool) -> None:
        setup.result = (received, sent, reset)
        setup.finished.set()


async def _send_all(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes) -> None:
    await loop.run_in_executor(None, sock.sendall, data)


def _drain(sock: socket.socket, chunk: int = 1 << 16, slow: bool = False) -> bytes:
    h = hashlib.sha256()
    total = 0
    while True:
        data = sock.recv(chunk)
        if not data:
            break
        h.update(data)
        total += len(data)
        if slow and total < (4 << 20):
            os.sched_yield()
    return h.hexdigest().encode() + b":%d" % total


def test_bulk_both_ways_with_a_slow_reader_arrives_intact() -> None:
    """32 MiB each way through the relay, the client reading in small pieces (the flush path): every byte
    arrives in order, counted per direction, and pipes are reused rather than made per round."""
    payload_up = os.urandom(1 << 20) * 32
    payload_down = os.urandom(1 << 20) * 32

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        s = _Setup(loop)
        got_down = loop.run_in_executor(None, _drain, s.client, 4096, True)
        got_up = loop.run_in_executor(None, _drain, s.backend)
        await _send_all(loop, s.client, payload_up)
        s.client.shutdown(socket.SHUT_WR)
        await _send_all(loop, s.backend, payload_down)
        s.backend.shutdown(socket.SHUT_WR)
        up, down = await got_up, await got_down
        await asyncio.wait_for(s.finished.wait(), 10)
        assert up == hashlib.sha256(payload_up).hexdigest().encode() + b":%d" % len(payload_up)
        assert down == hashlib.sha256(payload_down).hexdigest().encode() + b":%d" % len(payload_down)
        assert s.result == (len(payload_up), len(payload_down), False)
        assert s.relays.pipes_created <= 2 and len(s.relays) == 0
        s.client.close()
        s.backend.close()
        s.relays.close()

    _run(body)


def test_half_close_reaches_the_backend_and_the_answer_comes_back() -> None:
    """The client's end of stream is a shutdown(SHUT_WR) at the backend; the backend can still answer."""

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        s = _Setup(loop)
        s.client.sendall(b"request")
        s.client.shutdown(socket.SHUT_WR)
        request = await loop.run_in_executor(None, _read_to_end, s.backend)
        assert request == b"request"
        s.backend.sendall(b"answer after your end")
        s.backend.close()
        answer = await loop.run_in_executor(None, _read_to_end, s.client)
        assert answer == b"answer after your end"
        await asyncio.wait_for(s.finished.wait(), 10)
        assert s.result == (len(b"request"), len(b"answer after your end"), False)
        s.client.close()
        s.relays.close()

    _run(body)


def _read_to_end(sock: socket.socket) -> bytes:
    out = b""
    while data := sock.recv(65536):
        out += data
    return out


def test_backend_reset_is_passed_on_as_a_reset() -> None:
    """A backend that aborts (RST) ends the relay, and the client sees a reset, not a clean end of stream."""

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        s = _Setup(loop)
        s.client.sendall(b"hello")
        assert await loop.run_in_executor(None, s.backend.recv, 10) == b"hello"
        s.backend.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.backend.close()
        await asyncio.wait_for(s.finished.wait(), 10)
        s.client.settimeout(5)
        with pytest.raises(ConnectionResetError):
            s.client.recv(10)
        assert s.result is not None and s.result[2] is True
        s.client.close()
        s.relays.close()

    _run(body)


def test_without_splice_the_relay_copies() -> None:
    """With no pipe to be had (here: splice turned off, as when out of fds), a direction copies and still delivers."""
    payload = os.urandom(3 << 20)

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        s = _Setup(loop, splice=False)
        got = loop.run_in_executor(None, _drain, s.backend)
        await _send_all(loop, s.client, payload)
        s.client.shutdown(socket.SHUT_WR)
        assert await got == hashlib.sha256(payload).hexdigest().encode() + b":%d" % len(payload)
        s.backend.close()
        await asyncio.wait_for(s.finished.wait(), 10)
        assert s.result is not None and s.result[0] == len(payload)
        assert s.relays.pipes_created == 0
        s.client.close()
        s.relays.close()

    _run(body)


def test_idle_relays_hold_no_pipe() -> None:
    """200 relays that each moved a little hold no pipe between bursts: the pool makes only what one burst needs."""

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        first = _Setup(loop)
        setups = [first] + [_Setup(loop, first.relays) for _ in range(199)]
        for s in setups:
            s.client.sendall(b"ping")
        for s in setups:
            assert await loop.run_in_executor(None, s.backend.recv, 10) == b"ping"
        assert first.relays.pipes_created <= 4 and len(first.relays) == 200
        for s in setups:
            s.client.close()
            s.backend.close()
        for s in setups:
            await asyncio.wait_for(s.finished.wait(), 10)
        assert len(first.relays) == 0
        first.relays.close()

    _run(body)


def test_bytes_and_end_sent_before_the_relay_began_are_delivered() -> None:
    """What the client sent (and its end of stream) while the backend was starting is delivered: the
    edge-triggered set reports data already waiting, and an end seen with it is read, not lost."""

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        client, client_inner = _pair()
        backend, backend_inner = _pair()
        client.sendall(b"early request")
        client.shutdown(socket.SHUT_WR)
        await loop.run_in_executor(None, _wait_readable, client_inner)
        finished = asyncio.Event()
        result: list[tuple[int, int, bool]] = []

        def done(_: None, received: int, sent: int, reset: bool) -> None:
            result.append((received, sent, reset))
            finished.set()

        relays: Relays[None] = Relays(loop, done)
        relays.add(client_inner.detach(), backend_inner.detach(), None)
        assert await loop.run_in_executor(None, _read_to_end, backend) == b"early request"
        backend.sendall(b"late answer")
        backend.close()
        assert await loop.run_in_executor(None, _read_to_end, client) == b"late answer"
        await asyncio.wait_for(finished.wait(), 10)
        assert result == [(len(b"early request"), len(b"late answer"), False)]
        client.close()
        relays.close()

    _run(body)


def _wait_readable(sock: socket.socket) -> None:
    select.select([sock], [], [], 5)


def test_request_response_across_the_copy_and_splice_sizes() -> None:
    """Round trips of sizes on both sides of the copy/splice switch (1 byte to 200 KiB) come back whole and in
    order: a direction that went to splice for a big message copies small ones again."""
    sizes = [1, 64, 16383, 16384, 16385, 4095, 200_000, 10, 65536, 3, 1 << 17, 7] * 20

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        s = _Setup(loop)

        def echo() -> None:
            while data := s.backend.recv(1 << 18):
                s.backend.sendall(data)
            s.backend.close()

        echoing = loop.run_in_executor(None, echo)

        def drive() -> int:
            total = 0
            for i, size in enumerate(sizes):
                message = bytes([i % 251]) * size
                s.client.sendall(message)
                got = b""
                while len(got) < size:
                    chunk = s.client.recv(size - len(got))
                    assert chunk
                    got += chunk
                assert got == message
                total += size
            s.client.shutdown(socket.SHUT_WR)
            assert s.client.recv(1) == b""
            return total

        total = await loop.run_in_executor(None, drive)
        await echoing
        await asyncio.wait_for(s.finished.wait(), 10)
        assert s.result == (total, total, False)
        s.client.close()
        s.relays.close()

    _run(body)


def test_a_relay_that_ended_unreported_is_reported_once_by_close_one() -> None:
    """A relay that ended in the engine's thread before the loop heard of it is reported once, by close_one,
    and not again when the loop gets round to it (its id is not reused before it is reported)."""

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        calls: list[tuple[str, int, int, bool]] = []
        second = asyncio.Event()

        def done(name: str, received: int, sent: int, reset: bool) -> None:
            calls.append((name, received, sent, reset))
            if name == "second":
                second.set()

        relays: Relays[str] = Relays(loop, done)
        engine = relays._engine
        loop.remove_reader(engine.fileno())  # the loop does not hear of the end until told
        client, client_inner = _pair()
        backend, backend_inner = _pair()
        rid = relays.add(client_inner.detach(), backend_inner.detach(), "first")
        client.sendall(b"abc")
        assert await loop.run_in_executor(None, backend.recv, 10) == b"abc"
        client.close()
        backend.close()
        await loop.run_in_executor(None, _wait_fd, engine.fileno())  # the thread says a relay ended
        assert engine.open == 0 and len(relays) == 1
        relays.close_one(rid)
        assert calls == [("first", 3, 0, False)]
        client, client_inner = _pair()
        backend, backend_inner = _pair()
        assert relays.add(client_inner.detach(), backend_inner.detach(), "second") == rid  # the slot, free again
        engine.run()
        assert calls == [("first", 3, 0, False)]
        loop.add_reader(engine.fileno(), engine.run)
        client.close()
        backend.close()
        await asyncio.wait_for(second.wait(), 10)
        assert calls == [("first", 3, 0, False), ("second", 0, 0, False)]
        relays.close()

    _run(body)


def _wait_fd(fd: int) -> None:
    select.select([fd], [], [], 5)


def test_closing_the_engine_leaves_no_fd_and_no_thread() -> None:
    """Closing the relays stops the engine's thread and closes its epoll set, its eventfds, its pipes and the
    open connections: the process has the fds and threads it had before."""

    def counts() -> tuple[int, int]:
        return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        relays: Relays[_Setup] = Relays(loop, _Setup._done)
        setups = [_Setup(loop, relays) for _ in range(20)]
        for s in setups:
            s.client.sendall(b"x" * 100_000)
        for s in setups:
            await loop.run_in_executor(None, s.backend.recv, 10)
        relays.close()
        for s in setups:
            s.client.close()
            s.backend.close()

    async def warm_up(loop: asyncio.AbstractEventLoop) -> None:
        pass

    _run(warm_up)  # libuv keeps a process-wide signal pipe from its first loop on: not ours to count
    gc.collect()  # a socket an earlier test dropped is closed now, not by a collection during the count
    before = counts()
    threads = threading.active_count()
    _run(body)
    # A joined thread (the loop's executor worker) leaves /proc/self/task a moment after join()
    # returns: wait for the count to settle, bounded, rather than read it once.
    deadline = time.monotonic() + 5
    while counts() != before and time.monotonic() < deadline:
        select.select([], [], [], 0.01)
    assert counts() == before and threading.active_count() == threads


def test_client_reset_mid_transfer_is_passed_on_as_a_reset() -> None:
    """A client that aborts (RST) while the backend is still sending ends the relay, and the backend sees a
    reset too: both directions stop, with no fd left open by the engine."""

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        s = _Setup(loop)
        s.backend.sendall(b"y" * 100_000)
        assert await loop.run_in_executor(None, s.client.recv, 10)
        s.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.client.close()
        await asyncio.wait_for(s.finished.wait(), 10)
        assert s.result is not None and s.result[2] is True
        s.backend.settimeout(5)
        with pytest.raises(ConnectionResetError):
            while s.backend.recv(65536):
                pass
        assert s.relays._engine.open == 0
        s.backend.close()
        s.relays.close()

    _run(body)
