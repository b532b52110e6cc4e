"""LogWriter on a real pipe and a real event loop: never blocks, keeps order, counts what it drops."""

from __future__ import annotations

import asyncio
import json
import os

import structlog

from supervisor import log
from supervisor.model import LogFormat


def _drain(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = bytearray()
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def test_a_full_pipe_queues_then_drops_whole_lines_and_reports_the_count() -> None:
    rfd, wfd = os.pipe()
    writer = log.LogWriter(wfd, limit=8192)
    os.close(wfd)  # the writer holds its own description of the pipe
    try:
        line = "x" * 100
        for i in range(2000):  # ~200 KB: the pipe (64 KiB) fills, the queue (8 KiB) fills, the rest drops
            writer.emit(f"{i:05d} {line}")
        assert writer.dropped > 0
        dropped = writer.dropped

        async def catch_up() -> bytes:
            loop = asyncio.get_running_loop()
            log.configure(LogFormat.JSON, "info", writer=writer)
            writer.attach(loop)
            got = bytearray()
            while b"log_lines_dropped" not in got:
                await asyncio.sleep(0)  # let the writer's add_writer callback run
                got += _drain(rfd)
            return bytes(got)

        got = asyncio.run(catch_up())
        lines = got.decode().splitlines()
        numbers = [int(x.split()[0]) for x in lines if not x.startswith("{")]
        assert numbers == sorted(numbers) and numbers[0] == 0  # in order, from the first
        assert len(numbers) + dropped == 2000  # every line delivered or counted
        note = json.loads(lines[-1])
        assert note["event"] == "log_lines_dropped" and note["count"] == dropped
    finally:
        writer.close(timeout=0)
        os.close(rfd)
        structlog.reset_defaults()


def test_a_child_setting_o_nonblock_on_the_shared_description_does_not_reach_ours() -> None:
    rfd, wfd = os.pipe()
    writer = log.LogWriter(wfd)
    try:
        os.set_blocking(wfd, False)  # what a child does to its inherited fd 2
        assert not os.get_blocking(writer.fd)  # ours is non-blocking by design, and separate:
        os.set_blocking(wfd, True)
        assert not os.get_blocking(writer.fd)
        writer.emit("hello")
        assert _drain(rfd) == b"hello\n"
    finally:
        writer.close(timeout=0)
        os.close(wfd)
        os.close(rfd)


def test_final_flush_is_bounded_when_nobody_reads() -> None:
    import time

    rfd, wfd = os.pipe()
    writer = log.LogWriter(wfd, limit=1 << 20)
    try:
        for _ in range(3000):
            writer.emit("y" * 100)
        t0 = time.monotonic()
        writer.close(timeout=0.2)
        assert time.monotonic() - t0 < 1.0
    finally:
        os.close(wfd)
        os.close(rfd)
