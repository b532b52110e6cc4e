"""mode: service, end to end: the real daemon, real sockets, real child programs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PROGRAMS, Sockvisor, connect, free_port, wait_for

PY = sys.executable


def _read_all(s: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _report(port: int) -> dict[str, object]:
    with connect(port) as s:
        return json.loads(_read_all(s))  # type: ignore[no-any-return]


def test_on_demand_start_passes_fds_like_systemd(sockvisor: Sockvisor, short_tmp: Path) -> None:
    """The first connection starts the service with fds 3.. in listen order, LISTEN_FDS/PID/FDNAMES exact."""
    port, uport = free_port(), free_port(socket.SOCK_DGRAM)
    sockvisor.unit("web", f"""
        listen:
          - tcp: 127.0.0.1:{port}
            name: http
          - udp: 127.0.0.1:{uport}
          - unix: {short_tmp}/web.sock
            name: ctl
        exec: [{PY}, {PROGRAMS}/svc_report.py]
        environment: {{GREETING: hello}}
    """)
    os.environ["SOCKVISOR_TEST_LEAK"] = "1"
    try:
        sockvisor.start()
    finally:
        del os.environ["SOCKVISOR_TEST_LEAK"]
    assert sockvisor.unit_status("web")["state"] == "listening"
    rep = _report(port)
    env = rep["env"]
    assert isinstance(env, dict)
    assert env["LISTEN_FDS"] == "3"
    assert env["LISTEN_PID"] == str(rep["pid"])
    assert env["LISTEN_FDNAMES"] == "http:web:ctl"
    assert env["SOCKVISOR_UNIT"] == "web"
    assert env["GREETING"] == "hello"
    assert env["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert "SOCKVISOR_TEST_LEAK" not in env
    assert env["NOTIFY_SOCKET"].startswith("@")
    fds = rep["fds"]
    assert isinstance(fds, dict)
    assert sorted(int(f) for f in fds if not fds[f]["cloexec"]) == [0, 1, 2, 3, 4, 5]
    assert all(fds[str(f)]["nonblock"] for f in (3, 4, 5)), "listening fds arrive non-blocking, as systemd passes them"
    assert rep["sid"] == rep["pid"]


def test_service_exit_resumes_polling_and_restarts_on_next_connection(sockvisor: Sockvisor, port: int) -> None:
    """After the service exits the daemon polls again, and the next connection starts a new process."""
    sockvisor.unit("once", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        exec: [{PY}, {PROGRAMS}/svc_report.py]
    """)
    sockvisor.start()
    first = _report(port)
    sockvisor.wait_event("child_exited", unit="once")
    second = _report(port)
    assert first["pid"] != second["pid"]


def test_libsystemd_accepts_the_handoff(sockvisor: Sockvisor, short_tmp: Path) -> None:
    """A C program using libsystemd's sd_listen_fds_with_names sees the right count, names, kinds and addresses."""
    if not Path("/usr/include/systemd/sd-daemon.h").exists() or shutil.which("gcc") is None:
        pytest.skip("needs gcc and libsystemd-dev (apt-get install libsystemd-dev)")
    exe = short_tmp / "sd_listen"
    subprocess.run(["gcc", "-O1", "-o", str(exe), str(PROGRAMS / "sd_listen.c"), "-lsystemd"], check=True)
    port, uport = free_port(), free_port(socket.SOCK_DGRAM)
    sockvisor.unit("sd", f"""
        listen:
          - tcp: 127.0.0.1:{port}
            name: web
          - udp: 127.0.0.1:{uport}
            name: dns
          - unix: {short_tmp}/sd.sock
            name: admin
        exec: [{exe}]
    """)
    sockvisor.start()
    with connect(port) as s:
        out = _read_all(s).decode()
    assert "count=3\n" in out
    assert f"fd=3 name=web kind=inet-stream addr=127.0.0.1:{port}\n" in out
    assert f"fd=4 name=dns kind=inet-dgram addr=127.0.0.1:{uport}\n" in out
    assert f"fd=5 name=admin kind=unix-stream addr={short_tmp}/sd.sock\n" in out


def test_pass_stdio_is_the_inetd_wait_contract(sockvisor: Sockvisor, port: int) -> None:
    """pass: stdio puts the one listening socket on stdin/stdout, blocking, with no LISTEN_* variables."""
    sockvisor.unit("wait", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        pass: stdio
        exec: [{PY}, {PROGRAMS}/svc_report.py]
        environment: {{REPORT_VIA: stdio}}
    """)
    sockvisor.start()
    rep = _report(port)
    env = rep["env"]
    assert isinstance(env, dict)
    assert not [k for k in env if k.startswith("LISTEN_")]
    fds = rep["fds"]
    assert isinstance(fds, dict)
    assert fds["0"]["target"].startswith("socket:") and fds["0"]["target"] == fds["1"]["target"]
    assert not fds["0"]["nonblock"]


def test_queued_datagram_is_kept_for_the_service(sockvisor: Sockvisor) -> None:
    """A datagram that triggers the start is still queued when the service reads its socket."""
    uport = free_port(socket.SOCK_DGRAM)
    sockvisor.unit("udp", f"""
        listen: [{{udp: "127.0.0.1:{uport}"}}]
        exec: [{PY}, {PROGRAMS}/svc_report.py]
    """)
    sockvisor.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.settimeout(15)
        c.sendto(b"first datagram", ("127.0.0.1", uport))
        data, _ = c.recvfrom(65536)
    assert json.loads(data)["datagram"] == "first datagram"


def test_eager_start_runs_without_a_connection(sockvisor: Sockvisor, port: int) -> None:
    """start: eager spawns the service when the daemon starts, before any traffic."""
    sockvisor.unit("eager", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        start: eager
        exec: [{PY}, {PROGRAMS}/svc_serve.py]
    """)
    sockvisor.start()
    started = sockvisor.wait_event("child_started", unit="eager")
    assert sockvisor.unit_status("eager")["pids"] == [started["pid"]]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_crash_loop_backs_off_cheaply_and_recovers_when_fixed(sockvisor: Sockvisor, port: int,
                                                               short_tmp: Path) -> None:
    """A service that crashes on start backs off with growing delays at near-zero daemon CPU, and serves once fixed."""
    prog = short_tmp / "svc.sh"
    prog.write_text("#!/bin/sh\nexit 3\n")
    prog.chmod(0o755)
    sockvisor.unit("crashy", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        exec: [{prog}]
        restart_delay: 50ms
        restart_delay_max: 400ms
    """)
    sockvisor.start()
    assert sockvisor.proc is not None
    client = connect(port)  # stays pending in the backlog, triggering restarts
    delays = [sockvisor.wait_event("restart_scheduled", unit="crashy", count=n)["delay"] for n in range(1, 6)]
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.4]
    cpu0, t0 = _cpu_seconds(sockvisor.proc.pid), time.monotonic()
    sockvisor.wait_event("restart_scheduled", unit="crashy", count=9)
    cpu = _cpu_seconds(sockvisor.proc.pid) - cpu0
    wall = time.monotonic() - t0
    assert cpu < 0.1 * wall + 0.05, f"daemon used {cpu:.3f}s CPU in {wall:.2f}s of crash loop"
    assert sockvisor.unit_status("crashy")["state"] in ("backoff", "starting", "listening")
    # Fix the program in place: the pending client is served by the next attempt.
    fixed = short_tmp / "svc.new"
    fixed.write_text(f"#!/bin/sh\nexec {PY} {PROGRAMS}/svc_report.py\n")
    fixed.chmod(0o755)
    fixed.rename(prog)
    client.settimeout(15)
    rep = json.loads(_read_all(client))
    client.close()
    assert rep["env"]["LISTEN_FDS"] == "1"


def test_sigterm_stops_children_kills_stubborn_ones_and_removes_nodes(sockvisor: Sockvisor, port: int,
                                                                      short_tmp: Path) -> None:
    """SIGTERM: the stop signal, SIGKILL after stop_timeout for a child that ignores it, unix nodes removed, exit 0."""
    sock_path = short_tmp / "stub.sock"
    sockvisor.unit("stubborn", f"""
        listen:
          - tcp: 127.0.0.1:{port}
          - unix: {sock_path}
        start: eager
        exec: [{PY}, {PROGRAMS}/svc_serve.py, stubborn]
        stop_timeout: 300ms
    """)
    sockvisor.start()
    pid = sockvisor.wait_event("child_started", unit="stubborn")["pid"]
    # Wait until the child is serving, so it has installed its SIGTERM handler.
    with connect(port) as s:
        assert s.recv(100).startswith(str(pid).encode())
    assert sock_path.exists()
    assert sockvisor.stop() == 0
    assert sockvisor.find("child_killed", unit="stubborn", pid=pid)
    assert not sock_path.exists()
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), what="child gone")


def test_bind_failure_names_unit_and_address_and_exits_1(sockvisor: Sockvisor) -> None:
    """An address already in use makes `run` exit 1 with one line naming the unit and the address."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    sockvisor.unit("busy", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        exec: [/bin/true]
    """)
    res = subprocess.run([PY, "-m", "supervisor", "run", "--config", str(sockvisor.config)],
                         capture_output=True, text=True, timeout=30)
    blocker.close()
    assert res.returncode == 1
    lines = [ln for ln in res.stderr.splitlines() if "busy" in ln and f"127.0.0.1:{port}" in ln]
    assert lines, res.stderr
    assert "Traceback" not in res.stderr


def test_notify_ready_and_status_reach_the_daemon(sockvisor: Sockvisor, port: int) -> None:
    """ready: notify keeps the unit starting until READY=1; STATUS= shows in `sockvisor status`."""
    sockvisor.unit("ready", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        start: eager
        ready: notify
        exec: [{PY}, {PROGRAMS}/svc_serve.py, notify]
    """)
    sockvisor.start()
    sockvisor.wait_event("child_ready", unit="ready")
    st = sockvisor.unit_status("ready")
    assert st["state"] == "running"
    assert st["status"] == "serving"
