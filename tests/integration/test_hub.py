"""The reaper's hub thread: it reaps every child, and serves accept mode's bulk units.

Real children and loopback sockets in process. What is pinned: a pid the
thread reaped is never signalled before its exit is dispatched (it may be
another process's by then); a paused hub reaps nothing, not even when asked to
collect (a re-exec hands over live children); a bulk unit on a host with a reaper is served by the hub, its
accepts and exits drained in batches, with the exit's own time in the log.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import textwrap
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from supervisor import _spawn, config, sockets
from supervisor.reaper import Reaper, exit_of, signal_child
from supervisor.registry import Registry
from supervisor.spawn import Offload
from supervisor.units import Host
from tests.conftest import free_port, run_on_uvloop

pytestmark = pytest.mark.usefixtures("sigchld_restored")
_run = run_on_uvloop


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0].decode()


def _wait_readable(fd: int, timeout: float = 10.0) -> None:
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, "the hub never woke the loop"


def test_a_reaped_child_is_not_signalled_before_its_exit_is_dispatched() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        seen: list[tuple[int, int]] = []
        reaper = Reaper(loop, lambda pid, status: seen.append((pid, status)))
        try:
            pid = os.posix_spawn("/bin/sh", ["sh", "-c", "exit 3"], {})
            _wait_readable(reaper._fd)  # reaped by the thread, filed, not dispatched: the loop has not run
            assert not os.path.exists(f"/proc/{pid}"), "the hub did not reap it"
            assert seen == []
            assert signal_child(pid, signal.SIGTERM) is False
            assert _spawn.signal_child(pid, 0, False) is False
            reaper.reap()
            assert [(p, exit_of(s).code) for p, s in seen] == [(pid, 3)]
            with pytest.raises(ProcessLookupError):  # dispatched: now it is an ordinary unknown pid
                _spawn.signal_child(pid, 0, False)
        finally:
            reaper.close()

    _run(scenario())


def test_a_paused_hub_reaps_nothing_until_it_is_started_again() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        seen: list[int] = []
        reaper = Reaper(loop, lambda pid, status: seen.append(pid))
        try:
            reaper.freeze()
            pid = os.posix_spawn("/bin/true", ["true"], {})
            for _ in range(2000):  # the child is a zombie once it exited: wait on /proc, bounded
                if _state(pid) == "Z":
                    break
                await asyncio.sleep(0.005)  # wait-ok: bounded poll of /proc for the exit
            assert _state(pid) == "Z", "the child did not exit"
            select.select([reaper._fd], [], [], 0.2)  # nothing wakes the loop while paused
            assert _state(pid) == "Z" and seen == []
            reaper.reap()  # what a status or a unit's hand-over does: it must not reap either
            assert _state(pid) == "Z" and seen == []
            reaper.thaw()
            _wait_readable(reaper._fd)
            reaper.reap()
            assert seen == [pid]
        finally:
            reaper.close()

    _run(scenario())


def test_a_bulk_unit_on_a_host_with_a_reaper_is_served_by_the_hub() -> None:
    port = free_port()
    (unit,) = config.load_units_from_text(textwrap.dedent(f"""\
        name: hi
        listen: [{{tcp: '127.0.0.1:{port}'}}]
        mode: accept
        log_connections: true
        exec: [/bin/sh, -c, 'echo hi; exec sleep 0.2']
        """), "hub.yaml")

    async def scenario() -> tuple[Any, list[Any], bool]:
        loop = asyncio.get_running_loop()
        children: dict[int, Any] = {}

        def reaped(pid: int, status: int) -> None:
            callback = children.pop(pid, None)
            if callback is not None:
                callback(pid, exit_of(status))

        reaper = Reaper(loop, reaped)
        offload: Offload[Any] = Offload(loop)
        with capture_logs() as logs:
            host = Host(loop, structlog.get_logger(), {}, children.__setitem__, offload, reaper=reaper)
            registry = Registry(host, host.log)
            runtime = registry.add(unit, [sockets.bind(unit.listen[0], unit="hi")])
            runtime.activate()
            on_hub = getattr(runtime, "_engine", None) is not None
            clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            for reader, _ in clients:
                assert await reader.readline() == b"hi\n"
            assert runtime.status()["connections"]["active"] == 3  # status takes in the records first
            for reader, writer in clients:
                assert await reader.read() == b""
                writer.close()
            for _ in range(2000):
                if not children:
                    break
                await asyncio.sleep(0.005)  # wait-ok: bounded poll for the exits to be dispatched
            status = runtime.status()
            runtime.shutdown()
            runtime.close(remove=True)
        offload.close()
        reaper.close()
        return status, logs, on_hub

    status, logs, on_hub = _run(scenario())
    assert on_hub
    assert status["connections"]["accepted"] == 3 and status["connections"]["active"] == 0
    exited = [e for e in logs if e["event"] == "child_exited"]
    assert len(exited) == 3
    # The child's own duration (it lives 0.2 s), not when the batch happened to be drained.
    assert all(0.15 <= e["duration"] < 2.0 for e in exited), exited
    assert all(e["remote"].startswith("127.0.0.1:") for e in exited)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the hub waits for every exec off x86-64")
def test_a_hub_child_that_fails_before_its_exec_is_one_failure_and_no_exit() -> None:
    """The hub does not wait for its children's exec, so a child that fails before it (here: no
    such program) is known only later. It must still come out as vfork() reported it: a refusal
    counted as spawn_failed per connection, no child and no exit for it, and no slot left held.
    A working program next to it is filed as started, with its exit."""
    port, good_port = free_port(), free_port()
    units = config.load_units_from_text(textwrap.dedent(f"""\
        name: gone
        listen: [{{tcp: '127.0.0.1:{port}'}}]
        mode: accept
        exec: [/nonexistent/program]
        """), "gone.yaml") + config.load_units_from_text(textwrap.dedent(f"""\
        name: good
        listen: [{{tcp: '127.0.0.1:{good_port}'}}]
        mode: accept
        exec: [/bin/echo, hi]
        """), "good.yaml")

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], list[Any], int, list[int]]:
        loop = asyncio.get_running_loop()
        children: dict[int, Any] = {}
        exited: list[int] = []

        def reaped(pid: int, status: int) -> None:
            exited.append(pid)
            callback = children.pop(pid, None)
            if callback is not None:
                callback(pid, exit_of(status))

        reaper = Reaper(loop, reaped)
        offload: Offload[Any] = Offload(loop)
        with capture_logs() as logs:
            host = Host(loop, structlog.get_logger(), {}, children.__setitem__, offload, reaper=reaper)
            registry = Registry(host, host.log)
            gone, good = (registry.add(u, [sockets.bind(u.listen[0], unit=u.name)]) for u in units)
            gone.activate()
            good.activate()
            for _ in range(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                assert await reader.read() == b""  # refused: closed without a byte
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", good_port)
                assert await reader.read() == b"hi\n"
                writer.close()
            for _ in range(2000):
                if good.status()["connections"]["active"] == 0 and \
                        gone.status()["connections"]["refused"] >= 5:
                    break
                await asyncio.sleep(0.005)  # wait-ok: bounded poll for the records and exits
            statuses = gone.status(), good.status()
            pending = _spawn.hub_pending()
            for r in (gone, good):
                r.shutdown()
                r.close(remove=True)
        offload.close()
        reaper.close()
        return statuses[0], statuses[1], logs, pending, exited

    gone, good, logs, pending, exited = _run(scenario())
    assert gone["connections"]["refused_by_reason"] == {"spawn_failed": 5}
    assert gone["connections"]["accepted"] == 0 and not gone.get("pids")
    failed = [e for e in logs if e["event"] == "spawn_failed"]
    assert failed and failed[0]["reason"] == "execve", failed
    assert good["connections"]["accepted"] == 5 and good["connections"]["active"] == 0
    assert len(exited) == 5, exited  # the five echo children; none for the failed ones
    assert pending == 0
