"""A unit's whole process tree is the unit's: a grandchild that escapes with setsid() is stopped too.

With a writable cgroup v2 hierarchy, `stop` leaves nothing of the service running and status
counts its processes; without cgroups (``cgroups: false``) the subreaper still reaps the
orphan and stops it when the daemon stops (what is not covered: it outlives the unit's stop).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from supervisor import cgroups
from tests.conftest import PROGRAMS, Sockvisor, alive, connect, wait_for


def escaping_service(sockvisor: Sockvisor, port: int, pidfile: Path, argv: list[str] | None = None) -> int:
    """A service whose grandchild escapes with setsid(); the daemon started (by ``argv``); the grandchild's pid."""
    sockvisor.unit("esc", f"""\
        listen: [{{tcp: 127.0.0.1:{port}}}]
        mode: service
        start: eager
        exec: [{sys.executable}, {PROGRAMS / 'setsid_escape.py'}, {pidfile}]
        stop_timeout: 5s
        """)
    sockvisor.start(argv=argv)
    grandchild = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), what="the grandchild's pid"))
    with connect(port) as s, s.makefile("r") as reader:
        service = int(reader.readline())
    # Another session and process group: the stop signal to the service's group misses it.
    assert alive(grandchild) and os.getsid(grandchild) != os.getsid(service)
    assert os.getpgid(grandchild) != os.getpgid(service)
    return grandchild


def test_stop_takes_the_escaped_grandchild_with_it(sockvisor: Sockvisor, port: int, short_tmp: Path) -> None:
    if cgroups.find_base()[0] is None:
        pytest.skip(f"no writable cgroup v2 hierarchy here: {cgroups.find_base()[1]}")
    grandchild = escaping_service(sockvisor, port, short_tmp / "grandchild.pid")
    assert sockvisor.unit_status("esc")["processes"] == 2
    sockvisor.cli("stop", "esc", check=True)
    wait_for(lambda: not alive(grandchild), what="the grandchild stopped with its unit")
    assert sockvisor.find("leftovers_stopping", unit="esc")
    wait_for(lambda: sockvisor.unit_status("esc").get("processes", 0) == 0, what="no process left")
    assert sockvisor.stop() == 0


def test_without_cgroups_the_subreaper_stops_it_at_shutdown(sockvisor: Sockvisor, port: int,
                                                            short_tmp: Path) -> None:
    sockvisor.write_main("subreaper: true\ncgroups: false\n")
    grandchild = escaping_service(sockvisor, port, short_tmp / "grandchild.pid")
    assert "processes" not in sockvisor.unit_status("esc")
    sockvisor.cli("stop", "esc", check=True)
    sockvisor.wait_event("child_exited", unit="esc")
    assert alive(grandchild)  # not covered without cgroups: it outlives its unit's stop ...
    assert sockvisor.stop() == 0
    assert not alive(grandchild)  # ... but not the daemon


def test_where_clone3_is_refused_the_service_is_still_placed_in_its_cgroup(sockvisor: Sockvisor, port: int,
                                                                             short_tmp: Path) -> None:
    """Under a seccomp filter that fails clone3 with ENOSYS (as Docker's default profile does), a
    service cannot be born in its cgroup: it joins it before its exec, so the grandchild it forks at
    once is in it too, and still stops with it."""
    import platform
    import shutil
    import subprocess

    if cgroups.find_base()[0] is None:
        pytest.skip(f"no writable cgroup v2 hierarchy here: {cgroups.find_base()[1]}")
    if platform.machine() != "x86_64" or shutil.which("gcc") is None:
        pytest.skip("the filter program is x86-64's and needs gcc")
    exe = short_tmp / "no_clone3"
    subprocess.run(["gcc", "-O1", "-o", str(exe), str(PROGRAMS / "no_clone3.c")], check=True)
    argv = [str(exe), sys.executable, "-m", "supervisor", "run", "--config", str(sockvisor.config)]
    grandchild = escaping_service(sockvisor, port, short_tmp / "grandchild.pid", argv)
    assert sockvisor.proc is not None
    with open(f"/proc/{sockvisor.proc.pid}/status") as f:
        assert "Seccomp:\t2" in f.read()  # the filter is on the daemon
    assert sockvisor.unit_status("esc")["processes"] == 2
    assert not sockvisor.find("cgroup_failed")
    sockvisor.cli("stop", "esc", check=True)
    wait_for(lambda: not alive(grandchild), what="the grandchild stopped with its unit")
    assert sockvisor.stop() == 0
