"""The control socket and the CLI on top of it: every command, every error reply, peer checks, floods."""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PROGRAMS, Sockvisor, connect, free_port, roundtrip

PY = sys.executable


def raw_exchange(path: Path, payload: bytes, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Send raw bytes on the control socket, half-close, and parse every reply line until EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon may close an oversized request early; its reply is still readable
        buf = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            buf += chunk
    return [json.loads(line) for line in buf.splitlines() if line.strip()]


def hello_unit(sv: Sockvisor, port: int, name: str = "hello", text: str = "hello") -> None:
    sv.unit(name, f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: accept
        exec: [/bin/echo, {text}]
    """)


def eager_service(sv: Sockvisor, port: int, name: str = "svc") -> None:
    sv.unit(name, f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        start: eager
        stop_timeout: 2s
        exec: [{PY}, {PROGRAMS}/svc_serve.py]
    """)


def test_status_json_carries_every_spec_field(sockvisor: Sockvisor) -> None:
    """status --json lists each unit with name, mode, state, listen, pids, connections, restarts and last_exit."""
    hport, sport = free_port(), free_port()
    hello_unit(sockvisor, hport)
    eager_service(sockvisor, sport)
    sockvisor.start()
    sockvisor.wait_event("child_started", unit="svc")
    assert roundtrip(hport) == b"hello\n"
    sockvisor.wait_event("child_exited", unit="hello")
    units = {u["name"]: u for u in sockvisor.status()["units"]}
    assert set(units) == {"hello", "svc"}
    for u in units.values():
        assert {"name", "mode", "state", "listen", "pids", "connections", "restarts", "last_exit"} <= set(u)
        assert set(u["connections"]) == {"active", "accepted", "refused", "refused_by_reason"}  # SPEC 8
    hello, svc = units["hello"], units["svc"]
    assert (hello["mode"], hello["state"], hello["listen"]) == ("accept", "listening", [f"tcp:127.0.0.1:{hport}"])
    assert hello["connections"] == {"active": 0, "accepted": 1, "refused": 0, "refused_by_reason": {}}
    assert hello["last_exit"]["status"] == "exit 0"
    assert (svc["mode"], svc["state"], svc["restarts"], svc["last_exit"]) == ("service", "running", 0, None)
    assert len(svc["pids"]) == 1 and svc["connections"]["active"] == 1
    assert sockvisor.status("svc")["units"] == [sockvisor.unit_status("svc")]


def test_status_table_is_readable(sockvisor: Sockvisor, port: int) -> None:
    """Plain status prints a header and one aligned row per unit with its address, counters and last exit."""
    hello_unit(sockvisor, port)
    sockvisor.start()
    roundtrip(port)
    sockvisor.wait_event("child_exited", unit="hello")
    res = sockvisor.cli("status", check=True)
    header, row = res.stdout.splitlines()
    assert header.split()[:4] == ["UNIT", "MODE", "STATE", "LISTEN"]
    assert "LAST EXIT" in header
    assert row.split()[:8] == ["hello", "accept", "listening", f"tcp:127.0.0.1:{port}", "-", "0", "1", "0"]
    assert "exit 0 (pid" in row
    assert header.index("LAST EXIT") == row.index("exit 0")


def test_unknown_unit_is_exit_1_with_one_line(sockvisor: Sockvisor, port: int) -> None:
    """status, start, stop and restart of a unit that does not exist exit 1 with one line on stderr."""
    hello_unit(sockvisor, port)
    sockvisor.start()
    for cmd in ("status", "start", "stop", "restart"):
        res = sockvisor.cli(cmd, "nope")
        assert res.returncode == 1, cmd
        assert res.stderr == "sockvisor: unknown unit 'nope'\n", cmd
        assert res.stdout == ""


def test_unreachable_daemon_is_exit_1_with_one_line(short_tmp: Path) -> None:
    """Every control command without a daemon exits 1 with "cannot reach the daemon" and no traceback."""
    ghost = short_tmp / "ghost.sock"
    for args in (["status"], ["status", "--json"], ["reload"], ["stop", "x"], ["start", "x"], ["restart", "x"]):
        res = subprocess.run([PY, "-m", "supervisor", *args, "--control", str(ghost)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 1, args
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and "cannot reach the daemon" in lines[0], res.stderr


def test_missing_unit_argument_is_a_usage_error(sockvisor: Sockvisor, port: int) -> None:
    """start/stop/restart without a name is a usage error: exit 2, one line."""
    hello_unit(sockvisor, port)
    sockvisor.start()
    for cmd in ("start", "stop", "restart"):
        res = sockvisor.cli(cmd)
        assert res.returncode == 2, cmd
        assert len(res.stderr.splitlines()) == 1


def test_stop_keeps_the_socket_bound_and_start_serves_the_queue(sockvisor: Sockvisor, port: int) -> None:
    """stop NAME stops polling but keeps the socket: a client queues, and start NAME serves it."""
    hello_unit(sockvisor, port)
    sockvisor.start()
    res = sockvisor.cli("stop", "hello", check=True)
    assert res.stdout == "hello: stopped\n"
    assert sockvisor.unit_status("hello")["state"] == "stopped"
    client = connect(port)  # the handshake completes in the kernel's backlog
    with client:
        client.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.recv(16)  # nobody accepts while stopped
        assert sockvisor.unit_status("hello")["connections"]["accepted"] == 0
        client.settimeout(10)
        res = sockvisor.cli("start", "hello", check=True)
        assert res.stdout == "hello: listening\n"
        assert client.recv(16) == b"hello\n"
    assert sockvisor.unit_status("hello")["connections"]["accepted"] == 1


def test_stop_and_start_a_service(sockvisor: Sockvisor, port: int) -> None:
    """stop NAME terminates a running service and keeps its socket; start NAME runs it and it serves the queue."""
    eager_service(sockvisor, port)
    sockvisor.start()
    first = sockvisor.wait_event("child_started", unit="svc")["pid"]
    sockvisor.cli("stop", "svc", check=True)
    sockvisor.wait_event("child_exited", unit="svc", pid=first)
    st = sockvisor.unit_status("svc")
    assert (st["state"], st["pids"]) == ("stopped", [])
    assert st["last_exit"]["pid"] == first
    with connect(port) as queued:  # the socket stays bound while stopped: the client waits in the backlog
        assert sockvisor.unit_status("svc")["state"] == "stopped", "a connection does not start a stopped unit"
        sockvisor.cli("start", "svc", check=True)
        second = sockvisor.wait_event("child_started", unit="svc", count=2)["pid"]
        assert second != first
        assert queued.recv(64).split()[0] == str(second).encode()


def test_restart_replaces_the_units_children(sockvisor: Sockvisor, port: int) -> None:
    """restart NAME stops the running process and starts a new one."""
    eager_service(sockvisor, port)
    sockvisor.start()
    first = sockvisor.wait_event("child_started", unit="svc")["pid"]
    sockvisor.cli("restart", "svc", check=True)
    sockvisor.wait_event("child_exited", unit="svc", pid=first)
    second = sockvisor.wait_event("child_started", unit="svc", count=2)["pid"]
    assert second != first
    assert sockvisor.unit_status("svc")["pids"] == [second]


def test_bad_requests_get_error_replies_on_one_connection(sockvisor: Sockvisor, port: int) -> None:
    """Garbage, non-objects, unknown commands and bad unit fields each get an error reply; good ones still work."""
    hello_unit(sockvisor, port)
    sockvisor.start()
    lines = [
        b"this is not json",
        b"\xff\xfe\x00garbage",
        b"[1, 2, 3]",
        b'"status"',
        b'{"cmd": "dance"}',
        b'{"nocmd": 1}',
        b'{"cmd": "status", "unit": 42}',
        b'{"cmd": "stop"}',
        b"[" * 5000 + b"]" * 5000,
        b'{"cmd": "status"}',
    ]
    replies = raw_exchange(sockvisor.control, b"\n".join(lines) + b"\n")
    assert len(replies) == len(lines)
    errors = [r.get("error", "") for r in replies[:-1]]
    assert all(r["ok"] is False for r in replies[:-1])
    assert errors[0].startswith("malformed request") and errors[1].startswith("malformed request")
    assert errors[2].startswith("malformed request") and errors[3].startswith("malformed request")
    assert errors[4].startswith("unknown command 'dance'") and errors[5].startswith("unknown command None")
    assert errors[6] == "unit must be a string"
    assert errors[7] == "stop needs a unit name"
    assert errors[8].startswith("malformed request")
    assert replies[-1]["ok"] is True and replies[-1]["units"][0]["name"] == "hello"


def test_oversized_request_is_refused_and_the_daemon_carries_on(sockvisor: Sockvisor, port: int) -> None:
    """A request line over 64 KiB gets an error reply and its connection is closed; others are unaffected."""
    hello_unit(sockvisor, port)
    sockvisor.start()
    replies = raw_exchange(sockvisor.control, b'{"cmd": "status", "pad": "' + b"x" * 200_000 + b'"}\n')
    assert replies == [{"ok": False, "error": "request too large (max 65536 bytes)"}]
    assert sockvisor.unit_status("hello")["state"] == "listening"


def test_flood_of_concurrent_clients_garbage_and_a_huge_line(sockvisor: Sockvisor, port: int) -> None:
    """200 concurrent clients, garbage and an oversized line all get answers, and the daemon still serves after."""
    hello_unit(sockvisor, port)
    sockvisor.start()
    results: list[Any] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        payload = {0: b"\x00\x01garbage\n", 1: b"{" * 100_000 + b"\n"}.get(i % 50, b'{"cmd": "status"}\n')
        try:
            got: Any = raw_exchange(sockvisor.control, payload, timeout=30)
        except OSError as exc:
            got = exc
        with lock:
            results.append((i, got))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 200
    for i, got in results:
        assert isinstance(got, list) and len(got) == 1, (i, got)
        assert got[0]["ok"] is (i % 50 not in (0, 1)), (i, got)
    assert roundtrip(port) == b"hello\n"
    assert sockvisor.unit_status("hello")["connections"]["accepted"] == 1
    assert not sockvisor.find("control_error")


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to setuid() a client to another user")
def test_peer_of_another_uid_is_refused_and_logged(sockvisor: Sockvisor, port: int) -> None:
    """A client running as another user (nobody) gets an error reply and a control_refused log line."""
    nobody = pwd.getpwnam("nobody")
    (sockvisor.config / "sockvisor.yaml").write_text(
        f'control:\n  socket: {sockvisor.control}\n  mode: "0666"\nlog:\n  format: json\n  level: debug\n')
    hello_unit(sockvisor, port)
    sockvisor.start()
    assert oct(os.stat(sockvisor.control).st_mode & 0o777) == "0o666"
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the helper: drop to nobody, ask for status, report the reply through the pipe
        code = 1
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            replies = raw_exchange(sockvisor.control, b'{"cmd": "stop", "unit": "hello"}\n')
            os.write(wfd, json.dumps(replies).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        data = r.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    replies = json.loads(data)
    assert replies == [{"ok": False, "error": "permission denied: only root or the daemon's user"}]
    assert sockvisor.wait_event("control_refused")["uid"] == nobody.pw_uid
    assert sockvisor.unit_status("hello")["state"] == "listening", "the refused stop did nothing"
