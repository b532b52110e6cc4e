"""mode: proxy, end to end: real backends that cannot take fds, started on demand and driven by their own clients."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PROGRAMS, Sockvisor, connect, free_port, wait_for

PY = sys.executable
BACKEND = PROGRAMS / "proxy_backend.py"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _echo(port: int, data: bytes) -> bytes:
    with connect(port) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _proxy_unit(sockvisor: Sockvisor, name: str, listen: str, backend: str, extra: str = "",
                exec_args: str | None = None) -> None:
    exec_line = f"exec: {exec_args}\n" if exec_args is not None else ""
    logs = "" if "log_connections" in extra else "log_connections: true\n"
    sockvisor.unit(name, f"name: {name}\nmode: proxy\nlisten:\n  - {listen}\nbackend: \"{backend}\"\n"
                         f"{exec_line}{logs}{extra}")


# ---------------------------------------------------------------- cold start, idle stop


def test_http_backend_started_by_first_client_and_stopped_when_idle(sockvisor: Sockvisor, port: int,
                                                                    short_tmp: Path) -> None:
    """The first curl starts a plain HTTP server (which binds its own port) and is answered; after idle_stop
    the server is gone, and the next curl starts it again."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    back = free_port()
    (short_tmp / "hi.txt").write_text("hello through the proxy\n")
    _proxy_unit(sockvisor, "web", f"tcp: 127.0.0.1:{port}", f"127.0.0.1:{back}",
                "idle_stop: 500ms\nstart_timeout: 20s\n",
                f"[{PY}, -m, http.server, --bind, 127.0.0.1, '{back}', --directory, '{short_tmp}']")
    sockvisor.start()
    st = sockvisor.unit_status("web")
    assert st["proxy"]["backend"]["state"] == "listening" and st["pids"] == []  # nothing runs before a client
    url = f"http://127.0.0.1:{port}/hi.txt"
    out = subprocess.run(["curl", "-sS", "--max-time", "20", url], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout == "hello through the proxy\n", out.stderr
    first = sockvisor.wait_event("child_started", unit="web")["pid"]
    sockvisor.wait_event("backend_idle_stop", unit="web")
    sockvisor.wait_event("child_exited", unit="web", pid=first)
    assert not _alive(first)
    st = sockvisor.unit_status("web")
    assert st["proxy"]["backend"]["state"] == "listening" and st["proxy"]["cold_starts"] == 1
    out = subprocess.run(["curl", "-sS", "--max-time", "20", url], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout == "hello through the proxy\n", out.stderr
    second = sockvisor.wait_event("child_started", unit="web", count=2)["pid"]
    assert second != first
    st = sockvisor.unit_status("web")
    assert st["proxy"]["cold_starts"] == 2 and st["connections"]["refused"] == 0
    assert st["proxy"]["bytes"]["in"] > 0 and st["proxy"]["bytes"]["out"] > 2 * len("hello through the proxy\n")


def test_client_is_held_while_the_backend_starts(sockvisor: Sockvisor, port: int) -> None:
    """A backend that takes 1.5 s to bind: the first client is accepted at once, waits, and is answered."""
    back = free_port()
    _proxy_unit(sockvisor, "slow", f"tcp: 127.0.0.1:{port}", f"127.0.0.1:{back}", "start_timeout: 30s\n",
                f"[{PY}, '{BACKEND}', '127.0.0.1:{back}', --delay, '1.5']")
    sockvisor.start()
    began = time.monotonic()
    assert _echo(port, b"first words") == b"first words"
    took = time.monotonic() - began
    assert took >= 1.5  # it really waited for the backend ...
    st = sockvisor.unit_status("slow")
    assert st["connections"]["refused"] == 0 and st["connections"]["accepted"] == 1  # ... and was never refused
    ready = sockvisor.wait_event("backend_ready", unit="slow")
    assert ready["took"] >= 1.5
    assert st["proxy"]["cold_start_seconds"]["sum"] >= 1.5


def test_redis_started_on_demand_and_driven_by_redis_benchmark(sockvisor: Sockvisor, port: int,
                                                               short_tmp: Path) -> None:
    """redis-server (no socket activation) behind the proxy: redis-cli and redis-benchmark with 1 and 64
    clients are served; the bytes are counted in both directions."""
    redis = shutil.which("redis-server")
    if redis is None or shutil.which("redis-benchmark") is None:
        pytest.skip("redis-server/redis-tools are not installed (apt-get install redis-server)")
    back = free_port()
    _proxy_unit(sockvisor, "redis", f"tcp: 127.0.0.1:{port}", f"127.0.0.1:{back}",
                "start_timeout: 20s\nmax_connections: 1000\nlog_connections: false\n",
                f"[{redis}, --port, '{back}', --bind, 127.0.0.1, --save, '', --appendonly, 'no', "
                f"--dir, '{short_tmp}', --daemonize, 'no']")
    sockvisor.start()
    out = subprocess.run(["redis-cli", "-p", str(port), "PING"], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "PONG", out.stderr
    out = subprocess.run(["redis-cli", "-p", str(port), "SET", "k", "v" * 1000], capture_output=True, text=True,
                         timeout=30)
    assert out.stdout.strip() == "OK"
    for clients in (1, 64):
        bench = subprocess.run(["redis-benchmark", "-p", str(port), "-c", str(clients), "-n", "2000", "-t",
                                "ping,set,get", "-q"], capture_output=True, text=True, timeout=120)
        assert bench.returncode == 0, bench.stderr
        assert bench.stdout.count("requests per second") >= 3, bench.stdout
    st = sockvisor.unit_status("redis")
    assert st["proxy"]["cold_starts"] == 1 and st["connections"]["refused"] == 0
    assert st["proxy"]["bytes"]["in"] > 100_000 and st["proxy"]["bytes"]["out"] > 20_000


# ---------------------------------------------------------------- faults


def test_backend_that_never_listens_closes_clients_after_start_timeout(sockvisor: Sockvisor, port: int) -> None:
    """A backend that never binds: the client is held for start_timeout, then closed with reason
    backend_unavailable; the daemon keeps answering."""
    back = free_port()
    _proxy_unit(sockvisor, "dead", f"tcp: 127.0.0.1:{port}", f"127.0.0.1:{back}", "start_timeout: 1s\n",
                "[/bin/sleep, '600']")
    sockvisor.start()
    began = time.monotonic()
    with connect(port) as s:
        s.sendall(b"anyone?")
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(10) == b""
    took = time.monotonic() - began
    assert 0.9 <= took < 5
    ev = sockvisor.wait_event("connection_refused", unit="dead", reason="backend_unavailable")
    assert ev["level"] == "info"
    st = sockvisor.unit_status("dead")
    assert st["connections"]["refused_by_reason"] == {"backend_unavailable": 1}
    assert st["proxy"]["backend"]["reachable"] is False
    assert sockvisor.proc is not None and sockvisor.proc.poll() is None


def test_backend_dying_mid_transfer_closes_its_clients_and_restarts(sockvisor: Sockvisor, port: int) -> None:
    """SIGKILL to the backend during a transfer: that client's connection ends; the next client starts a
    new backend after the back-off and is served."""
    back = free_port()
    _proxy_unit(sockvisor, "crash", f"tcp: 127.0.0.1:{port}", f"127.0.0.1:{back}",
                "start_timeout: 20s\nrestart_delay: 200ms\n", f"[{PY}, '{BACKEND}', '127.0.0.1:{back}']")
    sockvisor.start()
    s = connect(port)
    s.sendall(b"x" * 1000)
    got = b""
    while len(got) < 1000:
        got += s.recv(65536)
    pid = sockvisor.unit_status("crash")["pids"][0]
    os.kill(pid, signal.SIGKILL)
    s.settimeout(10)
    with contextlib.suppress(ConnectionResetError):
        while s.recv(65536):
            pass  # the connection ends (EOF or reset): nothing hangs
    s.close()
    sockvisor.wait_event("child_exited", unit="crash", pid=pid)
    sockvisor.wait_event("restart_scheduled", unit="crash")
    assert _echo(port, b"again") == b"again"
    st = sockvisor.unit_status("crash")
    assert st["pids"] and st["pids"][0] != pid and st["exits"] == {"signal": 1}


def test_half_close_is_passed_on(sockvisor: Sockvisor, port: int, short_tmp: Path) -> None:
    """A client that sends and then shuts down its write side gets the backend's answer to the end of stream
    (over a unix backend in the abstract namespace, with no exec: a pure forwarder)."""
    name = f"@sv-proxy-{os.getpid()}-{port}"
    backend = subprocess.Popen([PY, str(BACKEND), name, "--role", "count"])
    try:
        _proxy_unit(sockvisor, "fwd", f"tcp: 127.0.0.1:{port}", name, "start_timeout: 20s\n")
        sockvisor.start()
        assert _echo(port, b"y" * 300_000) == b"COUNT 300000\n"
        st = sockvisor.unit_status("fwd")
        assert st["proxy"]["backend"]["state"] == "external" and st["pids"] == []
        assert st["proxy"]["bytes"] == {"in": 300_000, "out": len(b"COUNT 300000\n")}
    finally:
        backend.kill()
        backend.wait()


def test_many_concurrent_connections_leak_no_fd(sockvisor: Sockvisor, port: int) -> None:
    """1,000 proxied connections open at once, each echoing, then closed: the daemon's fd count returns to
    where it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 3000:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below what 1,000 connections need")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 3000), hard))
    back = free_port()
    _proxy_unit(sockvisor, "many", f"tcp: 127.0.0.1:{port}", f"127.0.0.1:{back}",
                "start: eager\nmax_connections: 2000\nlog_connections: false\nstart_timeout: 30s\n",
                f"[{PY}, '{BACKEND}', '127.0.0.1:{back}']")
    try:
        sockvisor.start()
        assert _echo(port, b"warm") == b"warm"
        assert sockvisor.proc is not None
        fd_dir = Path(f"/proc/{sockvisor.proc.pid}/fd")
        before = len(os.listdir(fd_dir))
        clients = [connect(port) for _ in range(1000)]
        for i, c in enumerate(clients):
            c.sendall(b"%d\n" % i)
        for i, c in enumerate(clients):
            want = b"%d\n" % i
            got = b""
            while len(got) < len(want):
                got += c.recv(100)
            assert got == want
        assert wait_for(lambda: sockvisor.unit_status("many")["proxy"]["connections"] == 1000, what="1000 relays")
        for c in clients:
            c.close()
        wait_for(lambda: sockvisor.unit_status("many")["proxy"]["connections"] == 0, what="relays closed")
        wait_for(lambda: len(os.listdir(fd_dir)) <= before, what=f"fds back to {before}")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ---------------------------------------------------------------- protocol, udp, stop


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_protocol_header_carries_the_client_address(sockvisor: Sockvisor, port: int, version: str) -> None:
    """proxy_protocol: the backend reads a PROXY header naming the client's address and port first."""
    back = free_port()
    _proxy_unit(sockvisor, "pp", f"tcp: 127.0.0.1:{port}", f"127.0.0.1:{back}",
                f"proxy_protocol: {version}\nstart_timeout: 20s\n",
                f"[{PY}, '{BACKEND}', '127.0.0.1:{back}', --role, header]")
    sockvisor.start()
    with connect(port) as s:
        client_port = s.getsockname()[1]
        s.settimeout(20)
        line = b""
        while not line.endswith(b"\n"):
            chunk = s.recv(4096)
            assert chunk
            line += chunk
    header = bytes.fromhex(line.decode().strip())
    if version == "v1":
        assert header == f"PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {port}\r\n".encode()
    else:
        assert header[:12] == b"\r\n\r\n\x00\r\nQUIT\n" and header[12:14] == b"\x21\x11"
        assert header[16:24] == socket.inet_aton("127.0.0.1") * 2
        assert header[24:28] == client_port.to_bytes(2, "big") + port.to_bytes(2, "big")


def test_udp_flows_get_their_replies_and_expire(sockvisor: Sockvisor) -> None:
    """Two udp clients through the proxy each get their own replies; their flows end after udp_idle."""
    port = free_port(socket.SOCK_DGRAM)
    back = free_port(socket.SOCK_DGRAM)
    _proxy_unit(sockvisor, "dns", f"udp: 127.0.0.1:{port}", f"127.0.0.1:{back}",
                "udp_idle: 1s\nstart: eager\n", f"[{PY}, '{BACKEND}', '127.0.0.1:{back}', --role, udp-echo]")
    sockvisor.start()
    sockvisor.wait_event("child_started", unit="dns")
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for i, c in enumerate(clients):
            c.settimeout(0.5)
            for _ in range(40):  # the backend binds its socket after it started: udp retries, as clients do
                c.sendto(b"q%d" % i, ("127.0.0.1", port))
                try:
                    data, src = c.recvfrom(100)
                    break
                except TimeoutError:
                    continue
            else:
                raise AssertionError("no udp reply through the proxy")
            assert data == b"echo:q%d" % i and src == ("127.0.0.1", port)
        st = sockvisor.unit_status("dns")
        assert st["proxy"]["flows"] == 2
        assert st["proxy"]["datagrams"]["out"] >= 2
        wait_for(lambda: sockvisor.unit_status("dns")["proxy"]["flows"] == 0, what="flows expired")
    finally:
        for c in clients:
            c.close()


def test_stop_lets_open_connections_finish_then_stops_the_backend(sockvisor: Sockvisor, port: int) -> None:
    """sockvisor stop: an open connection keeps working until stop_timeout, then is closed; then the backend
    stops; start serves again."""
    back = free_port()
    _proxy_unit(sockvisor, "drain", f"tcp: 127.0.0.1:{port}", f"127.0.0.1:{back}",
                "stop_timeout: 1500ms\nstart_timeout: 20s\n", f"[{PY}, '{BACKEND}', '127.0.0.1:{back}']")
    sockvisor.start()
    s = connect(port)
    s.sendall(b"one")
    assert s.recv(10) == b"one"
    pid = sockvisor.unit_status("drain")["pids"][0]
    began = time.monotonic()
    sockvisor.cli("stop", "drain", check=True)
    s.sendall(b"two")
    assert s.recv(10) == b"two"  # still forwarded while draining
    assert _alive(pid)
    s.settimeout(10)
    with contextlib.suppress(ConnectionResetError):
        assert s.recv(10) == b""
    assert time.monotonic() - began >= 1.4
    s.close()
    sockvisor.wait_event("child_exited", unit="drain", pid=pid)
    assert sockvisor.unit_status("drain")["state"] == "stopped"
    sockvisor.cli("start", "drain", check=True)
    assert _echo(port, b"three") == b"three"


def test_shutdown_drains_a_pure_forwarder(sockvisor: Sockvisor, port: int) -> None:
    """SIGTERM with a connection open through a forwarder (no exec): the daemon waits for it up to
    stop_timeout, then exits 0."""
    back = free_port()
    backend = subprocess.Popen([PY, str(BACKEND), f"127.0.0.1:{back}"])
    try:
        _proxy_unit(sockvisor, "fwd", f"tcp: 127.0.0.1:{port}", f"127.0.0.1:{back}",
                    "stop_timeout: 1s\nstart_timeout: 20s\n")
        sockvisor.start()
        s = connect(port)
        s.sendall(b"hi")
        assert s.recv(10) == b"hi"
        began = time.monotonic()
        assert sockvisor.stop() == 0
        assert time.monotonic() - began >= 0.9
        s.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(10) == b""
        s.close()
    finally:
        backend.kill()
        backend.wait()


def test_policy_applies_to_proxy_clients(sockvisor: Sockvisor, port: int) -> None:
    """allow/deny on the client side: a denied client is closed with reason deny and never reaches the backend."""
    back = free_port()
    _proxy_unit(sockvisor, "acl", f"tcp: 127.0.0.1:{port}", f"127.0.0.1:{back}",
                "deny: [127.0.0.0/8]\n", f"[{PY}, '{BACKEND}', '127.0.0.1:{back}']")
    sockvisor.start()
    with connect(port) as s, contextlib.suppress(ConnectionResetError):
        assert s.recv(10) == b""
    st = sockvisor.unit_status("acl")
    assert st["connections"]["refused_by_reason"] == {"deny": 1} and st["pids"] == []
    assert st["proxy"]["cold_starts"] == 0


def test_proxy_metrics_count_bytes_starts_and_cold_starts(sockvisor: Sockvisor, port: int) -> None:
    """The metrics carry a proxy's bytes by direction, its backend starts and a cold-start histogram, and
    promtool finds them clean."""
    from tests.integration.test_metrics import _get, _value

    mport, back = free_port(), free_port()
    sockvisor.write_main(f"metrics:\n  listen: 127.0.0.1:{mport}\n")
    _proxy_unit(sockvisor, "px", f"tcp: 127.0.0.1:{port}", f"127.0.0.1:{back}", "start_timeout: 20s\n",
                f"[{PY}, '{BACKEND}', '127.0.0.1:{back}']")
    sockvisor.start()
    assert _echo(port, b"z" * 5000) == b"z" * 5000
    wait_for(lambda: sockvisor.unit_status("px")["proxy"]["connections"] == 0, what="connection closed")
    text = _get(mport)[2]
    assert _value(text, 'sockvisor_proxy_bytes_total{direction="in",unit="px"}') == 5000
    assert _value(text, 'sockvisor_proxy_bytes_total{direction="out",unit="px"}') == 5000
    assert _value(text, 'sockvisor_backend_starts_total{unit="px"}') == 1
    assert _value(text, 'sockvisor_backend_up{unit="px"}') == 1
    assert _value(text, 'sockvisor_backend_cold_start_seconds_count{unit="px"}') == 1
    assert _value(text, 'sockvisor_backend_cold_start_seconds_bucket{le="+Inf",unit="px"}') == 1
    promtool = shutil.which("promtool")
    if promtool is not None:
        res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        assert res.returncode == 0 and res.stdout.strip() == "" and res.stderr.strip() == "", res.stdout + res.stderr
