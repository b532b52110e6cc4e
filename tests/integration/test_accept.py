"""mode: accept, end to end: the real daemon, real sockets, one real child per connection."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PROGRAMS, Sockvisor, connect, free_port, roundtrip, wait_for

PY = sys.executable
REPORT = PROGRAMS / "accept_report.py"


def _read_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _report(port: int, host: str = "127.0.0.1") -> tuple[dict[str, Any], socket.socket]:
    s = connect(port, host)
    with s:
        data = _read_all(s)
        return json.loads(data), s


def _unix_report(path: Path, kind: int = socket.SOCK_STREAM) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, kind) as s:
        s.settimeout(10)
        s.connect(str(path))
        return json.loads(_read_all(s))  # type: ignore[no-any-return]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _refused(s: socket.socket) -> bool:
    """The daemon closed this connection without serving it (EOF or reset, no data)."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


# ---------------------------------------------------------------- what the child gets


def test_stdio_child_gets_blocking_connection_and_remote_env(sockvisor: Sockvisor, port: int) -> None:
    """pass: stdio puts the blocking connection on fds 0 and 1, sets REMOTE_ADDR/PORT and no LISTEN_* variables."""
    sockvisor.unit("rep", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: accept
        exec: [{PY}, {REPORT}]
    """)
    sockvisor.start()
    s = connect(port)
    with s:
        client_port = s.getsockname()[1]
        rep = json.loads(_read_all(s))
    env, fds = rep["env"], rep["fds"]
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["REMOTE_PORT"] == str(client_port)
    assert env["SOCKVISOR_UNIT"] == "rep"
    assert not any(k.startswith("LISTEN_") for k in env)
    assert fds["0"]["socket"] and fds["1"]["socket"]
    assert not fds["0"]["nonblock"], "the connection is blocking in the child, as inetd passes it"
    assert sorted(int(f) for f in fds if not fds[f]["cloexec"]) == [0, 1, 2]
    ev = sockvisor.wait_event("child_exited", unit="rep", pid=rep["pid"])
    assert ev["remote"] == f"127.0.0.1:{client_port}" and ev["status"] == "exit 0"
    assert isinstance(ev["duration"], float)


def test_pass_fds_child_gets_connection_as_fd3(sockvisor: Sockvisor, port: int) -> None:
    """pass: fds gives the blocking connection as fd 3, LISTEN_FDS=1, LISTEN_PID=own pid, LISTEN_FDNAMES=connection."""
    sockvisor.unit("fds", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: accept
        pass: fds
        exec: [{PY}, {REPORT}]
    """)
    sockvisor.start()
    rep, _ = _report(port)
    env, fds = rep["env"], rep["fds"]
    assert env["LISTEN_FDS"] == "1"
    assert env["LISTEN_PID"] == str(rep["pid"])
    assert env["LISTEN_FDNAMES"] == "connection"
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert fds["3"]["socket"] and not fds["3"]["nonblock"]
    assert not fds["0"]["socket"], "stdin is /dev/null with pass: fds"


def test_dual_stack_listener_prints_mapped_ipv4_as_ipv4(sockvisor: Sockvisor, port: int) -> None:
    """A bare-port listener sees 127.0.0.1 (not ::ffff:127.0.0.1) for IPv4 clients and ::1 for IPv6 ones."""
    sockvisor.unit("dual", f"""
        listen: [{{tcp: "{port}"}}]
        mode: accept
        exec: [{PY}, {REPORT}]
    """)
    sockvisor.start()
    v4, _ = _report(port, "127.0.0.1")
    v6, _ = _report(port, "::1")
    assert v4["env"]["REMOTE_ADDR"] == "127.0.0.1"
    assert v6["env"]["REMOTE_ADDR"] == "::1"


def test_unix_and_seqpacket_listeners_pass_peer_credentials(sockvisor: Sockvisor, short_tmp: Path) -> None:
    """One unit serves a unix stream and a unix-seqpacket listener; children get REMOTE_PID/UID/GID of the peer."""
    sockvisor.unit("local", f"""
        listen:
          - unix: {short_tmp}/s.sock
          - unix-seqpacket: {short_tmp}/p.sock
        mode: accept
        exec: [{PY}, {REPORT}]
    """)
    sockvisor.start()
    for path, kind in ((short_tmp / "s.sock", socket.SOCK_STREAM), (short_tmp / "p.sock", socket.SOCK_SEQPACKET)):
        env = _unix_report(path, kind)["env"]
        assert env["REMOTE_PID"] == str(os.getpid())
        assert env["REMOTE_UID"] == str(os.getuid())
        assert env["REMOTE_GID"] == str(os.getgid())
        assert "REMOTE_ADDR" not in env


def test_stderr_connection_sends_stderr_to_the_client(sockvisor: Sockvisor, port: int) -> None:
    """stderr: connection puts the child's fd 2 on the connection too."""
    sockvisor.unit("err", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: accept
        stderr: connection
        exec: [/bin/sh, -c, "echo to-stderr >&2"]
    """)
    sockvisor.start()
    assert roundtrip(port) == b"to-stderr\n"


# ---------------------------------------------------------------- limits


def test_max_connections_keeps_clients_in_the_backlog(sockvisor: Sockvisor, port: int) -> None:
    """At max_connections the daemon stops accepting; the waiting client is served when a child exits, never refused."""
    sockvisor.unit("cap", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: accept
        max_connections: 2
        exec: [/bin/cat]
    """)
    sockvisor.start()
    a, b = connect(port), connect(port)
    for s in (a, b):
        s.sendall(b"x")
        assert s.recv(1) == b"x"
    c = connect(port)  # completes in the kernel's backlog
    c.sendall(b"third\n")
    c.shutdown(socket.SHUT_WR)
    wait_for(lambda: sockvisor.unit_status("cap")["connections"]["active"] == 2, what="2 active")
    assert len(sockvisor.find("connection_accepted", unit="cap")) == 2
    a.close()
    assert _read_all(c) == b"third\n"
    st = sockvisor.unit_status("cap")["connections"]
    assert st["refused"] == 0 and st["accepted"] == 3
    b.close()
    c.close()


def test_per_source_limit_closes_over_limit_connections(sockvisor: Sockvisor, port: int) -> None:
    """An over-limit connection from one source is closed at once and logged with reason per_source."""
    sockvisor.unit("ps", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: accept
        max_connections_per_source: 1
        exec: [/bin/cat]
    """)
    sockvisor.start()
    a = connect(port)
    a.sendall(b"x")
    assert a.recv(1) == b"x"
    b = connect(port)
    assert _refused(b)
    ev = sockvisor.wait_event("connection_refused", unit="ps")
    assert ev["reason"] == "per_source" and ev["remote"].startswith("127.0.0.1")
    assert sockvisor.unit_status("ps")["connections"]["refused"] == 1
    a.close()
    b.close()
    sockvisor.wait_event("child_exited", unit="ps")
    assert roundtrip(port, b"again") == b"again", "the source's place is free again after its child exited"


def test_rate_pauses_accepting_without_refusing(sockvisor: Sockvisor, port: int) -> None:
    """Over the rate the daemon delays connections (token bucket) but serves every one and refuses none."""
    sockvisor.unit("slow", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: accept
        rate: {{per_second: 10, burst: 1}}
        exec: [/bin/echo, hi]
    """)
    sockvisor.start()
    clients = [connect(port) for _ in range(6)]
    t0 = time.monotonic()
    assert all(_read_all(s) == b"hi\n" for s in clients)
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.35, f"6 connections at 10/s with burst 1 took only {elapsed:.3f}s"
    st = sockvisor.unit_status("slow")
    assert st["connections"]["refused"] == 0 and st["connections"]["accepted"] == 6
    assert st["state"] != "failed"
    for s in clients:
        s.close()


def test_allow_deny_ipv4(sockvisor: Sockvisor, port: int) -> None:
    """deny wins over allow for IPv4 CIDRs; a denied peer is closed and logged with reason denied."""
    sockvisor.unit("acl", f"""
        listen: [{{tcp: "0.0.0.0:{port}"}}]
        mode: accept
        allow: [127.0.0.0/8]
        deny: [127.0.0.2/32]
        exec: [/bin/echo, ok]
    """)
    sockvisor.start()
    assert roundtrip(port, host="127.0.0.1") == b"ok\n"
    with socket.socket() as s:
        s.settimeout(10)
        s.bind(("127.0.0.2", 0))
        s.connect(("127.0.0.1", port))
        assert _refused(s)
    ev = sockvisor.wait_event("connection_refused", unit="acl")
    assert ev["reason"] == "deny" and ev["remote"].startswith("127.0.0.2")
    assert sockvisor.unit_status("acl")["connections"]["refused"] == 1


def test_allow_ipv6_only_admits_listed_networks(sockvisor: Sockvisor, port: int) -> None:
    """An IPv6 allow list admits ::1 and refuses an IPv4 (mapped) peer on a dual-stack listener."""
    sockvisor.unit("acl6", f"""
        listen: [{{tcp: "{port}"}}]
        mode: accept
        allow: ["::1/128"]
        exec: [/bin/echo, ok]
    """)
    sockvisor.start()
    assert roundtrip(port, host="::1") == b"ok\n"
    s = connect(port, "127.0.0.1")
    with s:
        assert _refused(s)
    assert sockvisor.wait_event("connection_refused", unit="acl6")["reason"] == "deny"


def test_deny_unix_uid(sockvisor: Sockvisor, short_tmp: Path) -> None:
    """deny: [uid:N] refuses a unix peer running as that uid (nobody) and serves root."""
    sock = short_tmp / "u.sock"
    sockvisor.unit("uids", f"""
        listen: [{{unix: {sock}, mode: "0666"}}]
        mode: accept
        deny: ["uid:65534"]
        exec: [/bin/echo, ok]
    """)
    sockvisor.start()
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as nobody")
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        assert _read_all(s) == b"ok\n"
    pid = os.fork()
    if pid == 0:  # the client, as nobody
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(str(sock))
                code = 0 if _refused(s) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "nobody's connection was served"
    ev = sockvisor.wait_event("connection_refused", unit="uids")
    assert ev["reason"] == "deny" and "65534" in ev["remote"]


def test_log_connections_false_logs_only_refusals(sockvisor: Sockvisor, port: int) -> None:
    """log_connections: false silences connection_accepted/child_exited but still counts connections."""
    sockvisor.unit("quiet", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: accept
        log_connections: false
        exec: [/bin/echo, ok]
    """)
    sockvisor.start()
    for _ in range(3):
        assert roundtrip(port) == b"ok\n"
    wait_for(lambda: sockvisor.unit_status("quiet")["connections"]["active"] == 0, what="children reaped")
    assert sockvisor.unit_status("quiet")["connections"]["accepted"] == 3
    assert not sockvisor.find("connection_accepted", unit="quiet")
    assert not sockvisor.find("child_exited", unit="quiet")


# ---------------------------------------------------------------- robustness


@pytest.mark.parametrize("problem", ["binary", "user"])
def test_unexecutable_child_is_logged_and_unit_keeps_serving(sockvisor: Sockvisor, port: int, short_tmp: Path,
                                                             problem: str) -> None:
    """A missing binary or unknown user is logged as spawn_failed, the connection closed, and the unit keeps serving."""
    prog = short_tmp / "later.sh"
    process = f"exec: [{prog}]" if problem == "binary" else "exec: [/bin/echo, ok]\n        user: no-such-user-sv"
    sockvisor.unit("broken", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: accept
        {process}
    """)
    sockvisor.start()
    for _ in range(3):
        s = connect(port)
        with s:
            assert _refused(s)
    ev = sockvisor.wait_event("spawn_failed", unit="broken")
    assert ev["remote"].startswith("127.0.0.1")
    # one line per second per reason, the rest counted: never one line per connection
    summary = sockvisor.wait_event("spawn_failed_summary", unit="broken")
    assert summary["suppressed"] >= 1
    status = sockvisor.unit_status("broken")
    assert status["connections"]["refused_by_reason"]["spawn_failed"] == 3
    assert status["state"] != "failed"
    if problem == "binary":
        prog.write_text("#!/bin/sh\necho ok\n")
        prog.chmod(0o755)
        assert roundtrip(port) == b"ok\n", "the unit picks the binary up once it exists"


def test_fd_exhaustion_backs_off_and_recovers(sockvisor: Sockvisor, port: int) -> None:
    """On EMFILE the daemon pauses with low CPU (no busy loop) and serves the queued clients once fds are back."""
    sockvisor.unit("fdx", f"""
        listen: [{{tcp: "127.0.0.1:{port}", backlog: 256}}]
        mode: accept
        exec: [/bin/echo, ok]
    """)
    sockvisor.start()
    assert sockvisor.proc is not None
    pid = sockvisor.proc.pid
    assert roundtrip(port) == b"ok\n"
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    used = {int(f) for f in os.listdir(f"/proc/{pid}/fd")}
    lowest_free = next(n for n in range(len(used) + 1) if n not in used)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, hard))  # no fd number left below the limit
    flood = []
    try:
        cpu0 = _cpu_seconds(pid)
        for _ in range(100):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            flood.append(s)
        t0 = time.monotonic()
        sockvisor.wait_event("accept_paused", unit="fdx", count=4, timeout=20)
        window = time.monotonic() - t0
        cpu = _cpu_seconds(pid) - cpu0
        assert cpu < 0.25 * window + 0.1, f"daemon used {cpu:.2f}s CPU in {window:.2f}s while short of fds"
        assert "Too many open files" in sockvisor.find("accept_paused", unit="fdx")[0]["error"]
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    for s in flood:
        s.setblocking(True)
        s.settimeout(15)
        assert _read_all(s) == b"ok\n", "a connection queued during the shortage is served after it"
        s.close()
    assert roundtrip(port) == b"ok\n"


def test_thousand_concurrent_children(sockvisor: Sockvisor, port: int) -> None:
    """1,000 children run at once (status shows 1000 active) and all are reaped once their clients close."""
    sockvisor.unit("many", f"""
        listen: [{{tcp: "127.0.0.1:{port}", backlog: 1024}}]
        mode: accept
        max_connections: 1100
        log_connections: false
        exec: [/bin/cat]
    """)
    sockvisor.start()
    clients = []
    try:
        for _ in range(1000):
            clients.append(connect(port, timeout=30))
        wait_for(lambda: sockvisor.unit_status("many")["connections"]["active"] == 1000, timeout=60,
                 what="1000 active children")
        status = sockvisor.unit_status("many")
        assert len(status["pids"]) == 1000 and status["state"] == "running"
        probe = clients[-1]
        probe.sendall(b"alive")
        assert probe.recv(5) == b"alive"
    finally:
        for s in clients:
            s.close()
    wait_for(lambda: sockvisor.unit_status("many")["connections"]["active"] == 0, timeout=60,
             what="every child reaped")
    st = sockvisor.unit_status("many")
    assert st["connections"]["accepted"] == 1000 and st["pids"] == []


def test_several_accept_ports_are_independent_units(sockvisor: Sockvisor) -> None:
    """Two accept units run side by side, each with its own program and counters."""
    p1, p2 = free_port(), free_port()
    sockvisor.unit("one", f"""
        listen: [{{tcp: "127.0.0.1:{p1}"}}]
        mode: accept
        exec: [/bin/echo, one]
    """)
    sockvisor.unit("two", f"""
        listen: [{{tcp: "127.0.0.1:{p2}"}}]
        mode: accept
        exec: [/bin/echo, two]
    """)
    sockvisor.start()
    assert roundtrip(p1) == b"one\n"
    assert roundtrip(p2) == b"two\n"
    assert roundtrip(p1) == b"one\n"
    assert sockvisor.unit_status("one")["connections"]["accepted"] == 2


def _sig_masks(text: str) -> dict[str, int]:
    return {k: int(v, 16) for k, _, v in (line.partition(":\t") for line in text.splitlines())
            if k in ("SigBlk", "SigIgn", "SigCgt")}


def test_children_start_with_every_signal_at_default(sockvisor: Sockvisor) -> None:
    """The daemon catches signals, ignores SIGPIPE (Python) and what it inherited as ignored:
    every child, from the hub's bulk path and from the per-connection path, has none of that."""
    import signal

    bulk, each = free_port(), free_port()
    status = "exec: [/bin/cat, /proc/self/status]\nmode: accept\npass: stdio\nlog_connections: false\n"
    sockvisor.unit("bulk", f"listen: [{{tcp: 127.0.0.1:{bulk}}}]\n{status}")
    sockvisor.unit("each", f"listen: [{{tcp: 127.0.0.1:{each}}}]\nallow: [127.0.0.0/8]\n{status}")
    inherited = (signal.SIGUSR1, signal.SIGTTIN)
    old = [signal.signal(sig, signal.SIG_IGN) for sig in inherited]
    try:
        sockvisor.start()
    finally:
        for sig, handler in zip(inherited, old, strict=True):
            signal.signal(sig, handler)
    assert sockvisor.proc is not None
    with open(f"/proc/{sockvisor.proc.pid}/status") as f:
        daemon = _sig_masks(f.read())
    for sig in (*inherited, signal.SIGPIPE):
        assert daemon["SigIgn"] & (1 << (sig - 1)), f"the daemon does not ignore {sig!r}: the test proves nothing"
    assert daemon["SigCgt"] & (1 << (signal.SIGTERM - 1))
    for port in (bulk, each):
        for _ in range(3):
            assert _sig_masks(roundtrip(port).decode()) == {"SigBlk": 0, "SigIgn": 0, "SigCgt": 0}, port
    assert sockvisor.stop() == 0

