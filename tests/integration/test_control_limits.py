"""Bounds on what local clients and the fd limit can cost the daemon: control connections, idle peers, RLIMIT_NOFILE."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from supervisor import control
from tests.conftest import Sockvisor, free_port, wait_for

PY = sys.executable


def _socket_fds(pid: int) -> int:
    """How many of ``pid``'s fds are sockets (the control connections show up here)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count


def _is_closed(s: socket.socket, timeout: float = 5.0) -> bool:
    """True if the daemon closed ``s`` (recv gives b"" or a reset) within ``timeout``."""
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_held_connections_are_capped_and_status_answers_after(sockvisor: Sockvisor) -> None:
    """200 held control connections cost at most about the cap in fds, one over the cap is closed at once.

    And ``sockvisor status`` answers once they are gone.
    """
    sv = sockvisor.start()
    assert sv.proc is not None
    pid = sv.proc.pid
    base = _socket_fds(pid)
    held: list[socket.socket] = []
    try:
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(sv.control))
            held.append(s)
        sv.wait_event("control_refused", reason="too_many_connections")
        # The served ones stay open; every one beyond the cap is closed by the daemon.
        wait_for(lambda: _socket_fds(pid) - base <= control.MAX_CONNECTIONS, what="refused connections closed")
        assert _socket_fds(pid) - base <= control.MAX_CONNECTIONS + 20
        extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.connect(str(sv.control))
        held.append(extra)
        assert _is_closed(extra)
        assert _socket_fds(pid) - base <= control.MAX_CONNECTIONS + 20
    finally:
        for s in held:
            s.close()
    assert sv.status()["units"] == []
    refused = sv.find("control_refused", reason="too_many_connections")
    assert len(refused) <= 2  # summarized, not one line per connection


class _Log:
    """A stand-in bound logger: records events, ``bind`` returns itself."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def bind(self, **_: Any) -> _Log:
        return self

    def __getattr__(self, level: str) -> Any:
        def record(event: str, **fields: Any) -> None:
            self.events.append((event, fields))
        return record


def test_idle_connection_is_closed_after_timeout(short_tmp: Path) -> None:
    """A control connection that sends no complete request within idle_timeout is closed; a live one is answered."""
    path = short_tmp / "ctl.sock"
    log = _Log()

    async def handle(req: control.Request) -> control.Reply:
        return control.Reply(ok=True, units=[])

    async def scenario() -> None:
        server = control.ControlServer(str(path), 0o600, log, handle, idle_timeout=0.2)
        await server.start()
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b'{"cmd": "sta')  # never completed
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b'{"cmd": "status"}\n')
            reply = json.loads(await asyncio.wait_for(reader.readline(), 5))
            assert reply["ok"] is True
            writer.close()
        finally:
            await server.close()

    asyncio.run(scenario())
    assert any(event == "control_idle_closed" for event, _ in log.events)


def _accept_unit(sv: Sockvisor, name: str, port: int, extra: str = "") -> None:
    sv.unit(name, f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: accept
        exec: [/bin/echo, hi]
        {extra}
    """)


def _run_argv(sv: Sockvisor, nofile: str) -> list[str]:
    return ["prlimit", f"--nofile={nofile}", PY, "-m", "supervisor", "run", "--config", str(sv.config)]


def test_soft_nofile_raised_to_hard(sockvisor: Sockvisor) -> None:
    """The daemon raises its soft RLIMIT_NOFILE to the hard limit at start and logs both."""
    _accept_unit(sockvisor, "web", free_port())
    sv = sockvisor.start(argv=_run_argv(sockvisor, "256:1024"))
    event = sv.wait_event("nofile_limit")
    assert (event["soft"], event["hard"]) == (1024, 1024)
    assert sv.proc is not None
    with open(f"/proc/{sv.proc.pid}/limits") as f:
        line = next(x for x in f if x.startswith("Max open files"))
    assert line.split()[3:5] == ["1024", "1024"]


def test_fd_budget_over_limit_fails_start_with_one_line(sockvisor: Sockvisor) -> None:
    """Units whose fd_store_max sum exceeds the fd limit fail start-up with exit 1 and one line naming the limit."""
    _accept_unit(sockvisor, "a", free_port(), "fd_store_max: 100")
    _accept_unit(sockvisor, "b", free_port(), "fd_store_max: 100")
    res = subprocess.run(_run_argv(sockvisor, "128:128"), capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("sockvisor:")]
    assert len(errors) == 1, res.stderr
    assert "RLIMIT_NOFILE=128" in errors[0] and "266 fds" in errors[0]


def test_fd_budget_over_limit_refuses_reload(sockvisor: Sockvisor) -> None:
    """A reload whose units would exceed the fd limit is refused and the old configuration is kept."""
    _accept_unit(sockvisor, "a", free_port())
    sv = sockvisor.start(argv=_run_argv(sockvisor, "1024:1024"))
    _accept_unit(sv, "b", free_port(), "fd_store_max: 2000")
    res = sv.cli("reload")
    assert res.returncode != 0
    assert "RLIMIT_NOFILE=1024" in res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert [u["name"] for u in sv.status()["units"]] == ["a"]
