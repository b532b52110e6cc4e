"""The command line as users meet it: exit codes and one-line errors, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_config_errors import CASES, Case

REPO = Path(__file__).resolve().parent.parent.parent


def sockvisor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_check_prints_every_located_problem_and_exits_2(case: Case, tmp_path: Path) -> None:
    """`sockvisor check` prints exactly the located messages of each broken config, one per line, and exits 2."""
    for name, text in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "sockets.d").mkdir(exist_ok=True)
    res = sockvisor("check", "--config", str(tmp_path))
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.splitlines() == case.messages


def test_run_refuses_a_broken_config_with_exit_2(tmp_path: Path) -> None:
    """`sockvisor run` on an invalid config binds nothing and exits 2 with the located message."""
    (tmp_path / "sockets.d").mkdir()
    (tmp_path / "sockets.d" / "web.yaml").write_text("listen: [{tcp: 127.0.0.1:70000}]\nexec: [/bin/true]\n")
    res = sockvisor("run", "--config", str(tmp_path))
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        "sockets.d/web.yaml:1:16: listen[0].tcp: port 70000 is out of range (1-65535)"
    ]


def test_check_summarises_the_shipped_example_config() -> None:
    """The example config in config/ passes `check` with one summary line per unit."""
    res = sockvisor("check", "--config", str(REPO / "config"))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[-1] == "ok: 4 unit(s)"
    assert any(line.startswith("hello-web: service, 2 listeners") for line in lines)


def test_control_commands_without_a_daemon_exit_1_with_one_line(tmp_path: Path) -> None:
    """status/start/stop/restart/reload with no daemon running: one line on stderr, exit 1."""
    sock = str(tmp_path / "nope.sock")
    for args in (["status"], ["start", "x"], ["stop", "x"], ["restart", "x"], ["reload"]):
        res = sockvisor(*args, "--control", sock)
        assert res.returncode == 1, (args, res.stderr)
        assert len(res.stderr.splitlines()) == 1 and "cannot reach the daemon" in res.stderr


def test_usage_errors_exit_2() -> None:
    """An unknown command or a missing argument is a usage error (exit 2), one line."""
    for args in (["frobnicate"], ["start"], []):
        res = sockvisor(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


def test_run_names_the_file_line_of_a_listener_it_cannot_bind(tmp_path: Path) -> None:
    """`sockvisor run` with an address already in use exits 1 with one line located at the listen entry."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (tmp_path / "sockets.d").mkdir()
        (tmp_path / "sockvisor.yaml").write_text(f"control:\n  socket: {tmp_path}/control.sock\n")
        (tmp_path / "sockets.d" / "web.yaml").write_text(
            f"name: web\nlisten:\n  - tcp: 127.0.0.1:{port}\nexec: [/bin/true]\n")
        res = sockvisor("run", "--config", str(tmp_path))
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    # Startup log records (JSON, e.g. nofile_limit where the limit was raised) may precede it;
    # the error itself is exactly one plain line.
    plain = [line for line in res.stderr.strip().splitlines() if not line.startswith("{")]
    assert plain == [
        f"sockets.d/web.yaml:3:5: unit web: cannot bind tcp:127.0.0.1:{port}: Address already in use "
        "(another socket is bound to it; `ss -lnp` shows which process)"], res.stderr
