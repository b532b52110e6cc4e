"""The adapters in process: a runtime on a real loop with a Host, and the Daemon with an injected lifetime.

Real loopback sockets and real children, no daemon subprocess: the seams the
daemon is built from (``Host``, ``Registry``, ``reload.apply``, ``Daemon.handle``,
``run(shutdown=..., started=...)``) are driven directly, and log events are
read with ``structlog.testing.capture_logs``.
"""

from __future__ import annotations

import asyncio
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from supervisor import config, reload, sockets
from supervisor.control import Command, Request
from supervisor.daemon import Daemon
from supervisor.errors import BindError, ConfigError
from supervisor.lifecycle import Exit
from supervisor.reaper import Reaper, exit_of
from supervisor.registry import Registry
from supervisor.spawn import Offload
from supervisor.units import Host
from tests.conftest import free_port, run_on_uvloop

pytestmark = pytest.mark.usefixtures("sigchld_restored")
_run = run_on_uvloop


async def _fetch(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await reader.read()
    finally:
        writer.close()


def _unit(text: str) -> Any:
    (unit,) = config.load_units_from_text(textwrap.dedent(text), "inprocess.yaml")
    return unit


async def _until(predicate: Any, what: str) -> None:
    for _ in range(2000):
        if predicate():
            return
        await asyncio.sleep(0.005)  # wait-ok: bounded poll inside a readiness wait
    raise AssertionError(f"timed out waiting for {what}")


def test_an_accept_runtime_on_a_host_serves_and_logs() -> None:
    """A runtime needs only its Host: a real loop, a logger, child registration and the spawn helper."""
    port = free_port()
    unit = _unit(f"name: hi\nlisten: [{{tcp: '127.0.0.1:{port}'}}]\nmode: accept\nexec: [/bin/echo, hi]\n")

    async def scenario() -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        children: dict[int, Any] = {}
        exits: list[tuple[int, Exit]] = []

        def reaped(pid: int, status: int) -> None:
            callback = children.pop(pid, None)
            if callback is not None:
                callback(pid, exit_of(status))
                exits.append((pid, exit_of(status)))

        reaper = Reaper(loop, reaped)
        offload: Offload[Any] = Offload(loop)
        with capture_logs() as logs:
            host = Host(loop, structlog.get_logger(), {}, children.__setitem__, offload)
            registry = Registry(host, host.log)
            runtime = registry.add(unit, [sockets.bind(unit.listen[0], unit="hi")])
            runtime.activate()
            assert await _fetch(port) == b"hi\n"
            assert await _fetch(port) == b"hi\n"
            await _until(lambda: len(exits) == 2, "both children reaped")
            status = runtime.status()
            runtime.shutdown()
            runtime.close(remove=True)
        offload.close()
        reaper.close()
        assert status["connections"]["accepted"] == 2 and status["connections"]["active"] == 0
        assert all(ex == Exit(code=0) for _, ex in exits)
        return logs

    logs = _run(scenario())
    events = [e["event"] for e in logs if e.get("unit") == "hi"]
    assert events.count("connection_accepted") == 2 and events.count("child_exited") == 2


def _config_dir(tmp_path: Path, units: dict[str, str]) -> Path:
    conf = tmp_path / "conf"
    (conf / "sockets.d").mkdir(parents=True, exist_ok=True)
    (conf / "sockvisor.yaml").write_text(f"control:\n  socket: {tmp_path}/control.sock\n")
    for old in (conf / "sockets.d").glob("*.yaml"):
        if old.stem not in units:
            old.unlink()
    for name, text in units.items():
        (conf / "sockets.d" / f"{name}.yaml").write_text(textwrap.dedent(text))
    return conf


def test_the_daemon_in_process_serves_dispatches_reloads_and_shuts_down(tmp_path: Path) -> None:
    """run(shutdown=, started=) binds first, handle() answers, reload keeps fds, shutdown stops every child."""
    a, b, c = free_port(), free_port(), free_port()
    echo = "mode: accept\nexec: [/bin/echo, {word}]\nlisten: [{{tcp: '127.0.0.1:{port}'}}]\n"
    units = {"a": echo.format(word="a", port=a),
             "svc": f"listen: [{{tcp: '127.0.0.1:{b}'}}]\nstart: eager\nexec: [/bin/sleep, '60']\n"}
    conf = _config_dir(tmp_path, units)

    async def scenario() -> None:
        started = asyncio.Event()
        stop = asyncio.Event()
        with capture_logs() as logs:
            daemon = Daemon(config.load_config(str(conf), environ={}), environ={}, config_path=str(conf))
            task = asyncio.ensure_future(daemon.run(shutdown=stop.wait(), started=started.set))
            await asyncio.wait_for(started.wait(), 10)
            assert await _fetch(a) == b"a\n"
            status = await daemon.handle(Request(Command.STATUS))
            assert [u["name"] for u in status["units"]] == ["a", "svc"]
            svc = daemon.units.get("svc")
            assert svc is not None
            await _until(lambda: bool(svc.pids()), "the eager service running")
            pid = svc.pids()[0]

            # reload: a unit added, "a" unchanged keeps its very fd, "svc" removed retires
            fd = daemon.units.get("a").bound[0].fd  # type: ignore[union-attr]
            _config_dir(tmp_path, {"a": units["a"], "c": echo.format(word="c", port=c)})
            reply = await daemon.handle(Request(Command.RELOAD))
            assert reply["ok"] and reply["added"] == ["c"] and reply["removed"] == ["svc"], reply
            assert daemon.units.get("a").bound[0].fd == fd  # type: ignore[union-attr]
            assert await _fetch(c) == b"c\n" and await _fetch(a) == b"a\n"
            await _until(lambda: not _alive(pid), "the retired service's child gone")

            # a reload whose new unit cannot be valid (port of "a" twice) changes nothing
            _config_dir(tmp_path, {"a": units["a"], "c": echo.format(word="c", port=c),
                                   "d": echo.format(word="d", port=a)})
            with pytest.raises(ConfigError):
                await daemon.reload()
            assert daemon.units.names() == ["a", "c"]
            assert await _fetch(a) == b"a\n"

            stopped = await daemon.handle(Request(Command.STOP, "c"))
            assert stopped["ok"] and stopped["unit"]["state"] == "stopped"
            unknown = await daemon.handle(Request(Command.START, "nope"))
            assert not unknown["ok"] and "unknown unit" in unknown["error"]

            stop.set()
            await asyncio.wait_for(task, 15)
        names = [e["event"] for e in logs]
        assert names.index("daemon_ready") < names.index("reloaded") < names.index("daemon_stopped")
        assert not daemon.children

    _run(scenario())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_reload_apply_on_a_registry_refuses_a_taken_address_and_changes_nothing(tmp_path: Path) -> None:
    """reload.apply works on the registry alone; a bind failure undoes everything and raises BindError."""
    port, taken = free_port(), free_port()
    a = _unit(f"name: a\nlisten: [{{tcp: '127.0.0.1:{port}'}}]\nmode: accept\nexec: [/bin/true]\n")

    async def scenario() -> None:
        import socket

        loop = asyncio.get_running_loop()
        offload: Offload[Any] = Offload(loop)
        with capture_logs() as logs:
            host = Host(loop, structlog.get_logger(), {}, lambda pid, cb: None, offload)
            registry = Registry(host, host.log)
            bound = sockets.bind(a.listen[0], unit="a")
            registry.add(a, [bound]).activate()
            conf = _config_dir(tmp_path, {
                "a": f"listen: [{{tcp: '127.0.0.1:{port}'}}, {{tcp: '127.0.0.1:{taken}'}}]\nmode: accept\n"
                     "exec: [/bin/true]\n"})
            with socket.socket() as busy:
                busy.bind(("127.0.0.1", taken))
                busy.listen()
                with pytest.raises(BindError):
                    reload.apply(registry, config.load_config(str(conf), environ={}), host.log)
            runtime = registry.get("a")
            assert runtime is not None and runtime.bound == [bound] and not bound.closed and runtime.polling
            runtime.close(remove=True)
        offload.close()
        assert any(e["event"] == "reload_failed" for e in logs)

    _run(scenario())
