"""subreaper: true and PID 1: orphans of a unit's processes are reaped by the daemon and stopped with it."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PROGRAMS, Sockvisor, wait_for

PY = sys.executable
DOUBLE_FORK = PROGRAMS / "double_fork.py"


def _state(pid: int) -> str | None:
    """The process state letter (R, S, Z, ...), or None when the pid is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _ppid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError("no PPid")


def _orphan_unit(sockvisor: Sockvisor, tmp: Path, seconds: float, port: int) -> Path:
    pidfile = tmp / "orphan.pid"
    sockvisor.unit("forker", f"""
        listen: [{{tcp: 127.0.0.1:{port}}}]
        start: eager
        exec: [{PY}, '{DOUBLE_FORK}', '{pidfile}', '{seconds}']
        stop_timeout: 2s
    """)
    return pidfile


def test_subreaper_adopts_and_reaps_a_double_forked_orphan(sockvisor: Sockvisor, short_tmp: Path,
                                                           port: int) -> None:
    """With subreaper: true a double-forked grandchild is reparented to the daemon, and when it exits it is
    reaped (gone, not a zombie)."""
    sockvisor.write_main("subreaper: true\n")
    pidfile = _orphan_unit(sockvisor, short_tmp, 1.0, port)
    sockvisor.start()
    sockvisor.wait_event("subreaper", enabled=True)
    orphan = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), what="orphan pid"))
    assert sockvisor.proc is not None
    assert wait_for(lambda: _ppid(orphan) == sockvisor.proc.pid if _state(orphan) else True, what="reparented")
    wait_for(lambda: _state(orphan) is None, what="orphan reaped")  # a zombie would stay as "Z"


def test_shutdown_stops_orphans_left_behind(sockvisor: Sockvisor, short_tmp: Path, port: int) -> None:
    """SIGTERM: the unit stops, then the orphan it left gets SIGTERM too; the daemon exits 0 and leaves
    nothing running."""
    sockvisor.write_main("subreaper: true\n")
    pidfile = _orphan_unit(sockvisor, short_tmp, 600, port)
    sockvisor.start()
    orphan = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), what="orphan pid"))
    assert _state(orphan) not in (None, "Z")
    assert sockvisor.stop() == 0
    # The orphan sits in its slot's cgroup: the unit's stop may already end it ("leftovers_stopping"),
    # else the subreaper's last sweep does ("orphans_stopping"); which one wins is a race.
    stopped = [p for e in sockvisor.find("orphans_stopping") + sockvisor.find("leftovers_stopping") for p in e["pids"]]
    assert orphan in stopped, "\n".join(sockvisor.raw[-15:])
    assert _state(orphan) is None


def test_as_pid_1_the_daemon_reaps_orphans_and_exits_0_on_sigterm(sockvisor: Sockvisor, short_tmp: Path,
                                                                  port: int) -> None:
    """Run as PID 1 of a new PID namespace (a container's init): it is a subreaper without being told, reaps a
    double-forked orphan, and SIGTERM stops everything with exit 0."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare (util-linux) for a PID namespace")
    pidfile = _orphan_unit(sockvisor, short_tmp, 600, port)
    sockvisor.start(argv=[unshare, "--pid", "--fork", "--mount-proc", PY, "-m", "supervisor", "run",
                          "--config", str(sockvisor.config)], wait=False)
    ready = sockvisor.wait_event("daemon_ready", timeout=30)
    assert ready["pid"] == 1
    assert sockvisor.find("subreaper", enabled=True, pid1=True)
    wait_for(lambda: pidfile.exists(), what="orphan started")
    assert sockvisor.proc is not None
    daemon = int(Path(f"/proc/{sockvisor.proc.pid}/task/{sockvisor.proc.pid}/children").read_text().split()[0])
    began = time.monotonic()
    os.kill(daemon, signal.SIGTERM)
    code = sockvisor.proc.wait(30)
    assert code == 0, "\n".join(sockvisor.raw[-15:])
    assert time.monotonic() - began < 15
    # The orphan sits in its slot's cgroup: the unit's stop may already end it ("leftovers_stopping"),
    # else the subreaper's last sweep does ("orphans_stopping"); which one wins is a race.
    stopped = [p for e in sockvisor.find("orphans_stopping") + sockvisor.find("leftovers_stopping") for p in e["pids"]]
    assert stopped, "\n".join(sockvisor.raw[-15:])
