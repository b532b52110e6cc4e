"""The real CLI on hostile configuration: located one-line errors and exit 2, or a located bind error and exit 1."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import sockets
from supervisor.config import load_units_from_text
from tests.conftest import free_port

LOCATED = re.compile(r"[^\n:]+:\d+:\d+: [^\n]+")
BASE = "listen: [{tcp: '127.0.0.1:8080'}]\nexec: [/bin/true]\n"


def sockvisor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True, text=True, timeout=60)


def config(tmp_path: Path, text: str | bytes) -> Path:
    (tmp_path / "sockets.d").mkdir(exist_ok=True)
    unit = tmp_path / "sockets.d" / "web.yaml"
    if isinstance(text, bytes):
        unit.write_bytes(text)
    else:
        unit.write_text(text)
    (tmp_path / "sockvisor.yaml").write_text(f"control:\n  socket: {tmp_path}/c.sock\n")
    return tmp_path


@pytest.mark.parametrize(
    "text",
    [
        BASE + "mode: [accept]\n",
        BASE + "stop_timeout: " + "9" * 400 + "\n",
        BASE + "stop_timeout: " + "9" * 5000 + "\n",
        BASE + "stop_timeout: 2001-02-30\n",
        BASE + "environment: " + "[" * 500 + "]" * 500 + "\n",
        "listen: [{tcp: '127.0.0.1:8080', receive_buffer: '" + "9" * 400 + "K'}]\nexec: [/bin/true]\n",
        BASE + "nice: !!int 0xfff+f\n",
        BASE + "restart_delay: .inf\n",
        BASE + "description: \x01\n",
        b"exec: [/bin/true]\ndescription: \xff\n",
        "",
    ],
    ids=["mode-list", "duration-400", "duration-5000", "timestamp", "nested-500", "size-huge", "bad-int",
         "infinite-restart-delay", "control-char", "undecodable", "empty"],
)
@pytest.mark.parametrize("command", ["check", "run"])
def test_bad_config_is_located_exit_2(tmp_path: Path, text: str | bytes, command: str) -> None:
    """check and run refuse each crashing input of issue 9 with located one-line errors and exit 2."""
    res = sockvisor(command, "--config", str(config(tmp_path, text)))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert lines and all(LOCATED.fullmatch(line) for line in lines), lines
    assert all(line.startswith("sockets.d/web.yaml:") for line in lines), lines


def test_run_bind_failure_names_the_listen_entry(tmp_path: Path) -> None:
    """run exits 1 with the listen entry's location, the unit and the reason when a listener cannot bind."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        res = sockvisor("run", "--config", str(config(tmp_path, f"listen: [{{tcp: '127.0.0.1:{port}'}}]\n"
                                                               "exec: [/bin/true]\n")))
    assert res.returncode == 1
    last = res.stderr.splitlines()[-1]
    assert last.startswith(f"sockets.d/web.yaml:1:10: unit web: cannot bind tcp:127.0.0.1:{port}: "), last
    assert "Traceback" not in res.stderr


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK and high SO_PRIORITY need root")
def test_largest_accepted_socket_options_bind_on_the_real_kernel() -> None:
    """The largest mark, buffers, priority and keepalive that check accepts are applied by the real kernel."""
    port = free_port()
    (unit,) = load_units_from_text(
        f"listen:\n  - tcp: '127.0.0.1:{port}'\n    mark: 2147483647\n    receive_buffer: 2147483647\n"
        "    send_buffer: 2147483647\n    priority: 2147483647\n    keepalive_time: 32767\n"
        "    keepalive_interval: 32767\n    backlog: 2147483647\nexec: [/bin/true]\n",
        "web.yaml",
    )
    bound = sockets.bind(unit.listen[0], unit="web")
    try:
        assert bound.sock is not None
        assert bound.sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 2**31 - 1
    finally:
        bound.close(remove=True)
    with socket.socket() as probe, pytest.raises((OverflowError, TypeError)):
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 2**31)  # why config stops at 2^31-1
