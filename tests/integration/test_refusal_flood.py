"""A hostile client's flood of refused connections costs bounded CPU and log, and is counted exactly."""

from __future__ import annotations

import os
import socket
import time
import urllib.request

from tests.conftest import Sockvisor, connect, free_port, wait_for


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        rest = f.read().rsplit(b")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def _log_bytes(sv: Sockvisor) -> int:
    return sum(len(line) + 1 for line in list(sv.raw))


def test_deny_flood_is_counted_exactly_with_bounded_log(sockvisor: Sockvisor) -> None:
    """100,000 denied connects (or 20 s): counted exactly (status, metrics); a few log lines a second; < 100 us each."""
    port, mport = free_port(), free_port()
    sockvisor.write_main(f"metrics:\n  listen: 127.0.0.1:{mport}\n")
    sockvisor.unit("acl", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: accept
        deny: [127.0.0.2/32]
        exec: [/bin/echo, ok]
    """)
    sockvisor.start()
    assert sockvisor.proc is not None
    daemon = sockvisor.proc.pid
    cpu0, log0, t0 = _cpu(daemon), _log_bytes(sockvisor), time.monotonic()
    attempts = 0
    while attempts < 100_000 and time.monotonic() - t0 < 20.0:  # bounded in count and time
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", port))
        attempts += 1
    st = wait_for(lambda: (s := sockvisor.unit_status("acl"))["connections"]["refused"] >= attempts and s,
                  timeout=30, what="every refusal counted")
    elapsed = time.monotonic() - t0
    cpu = _cpu(daemon) - cpu0
    log = _log_bytes(sockvisor) - log0
    print(f"refusal flood: {attempts} attempts in {elapsed:.2f}s, daemon CPU {cpu:.2f}s "
          f"({cpu / elapsed:.2f}/s), log {log} bytes")
    assert st["connections"]["refused"] == attempts
    assert st["connections"]["refused_by_reason"] == {"deny": attempts}
    assert st["connections"]["accepted"] == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as res:
        scraped = res.read().decode()
    assert f'sockvisor_connections_refused_total{{reason="deny",unit="acl"}} {float(attempts)}' in scraped
    assert log < 400 * (elapsed + 2), log  # one line and one summary a second, not one per refusal
    # CPU per refusal, not per second: a fast client saturates any server, a slow one never does.
    assert cpu / attempts < 100e-6, f"{cpu / attempts * 1e6:.0f} us per refused connection"
    summaries = sockvisor.find("connection_refused_summary", unit="acl")
    assert len(sockvisor.find("connection_refused", unit="acl")) + sum(e["suppressed"] for e in summaries) \
        <= attempts


def test_missing_binary_logs_one_spawn_failure_a_second(sockvisor: Sockvisor) -> None:
    """A missing program in accept mode: every connection is refused as spawn_failed, logged once a second."""
    port = free_port()
    sockvisor.unit("gone", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: accept
        exec: [/nonexistent/program]
    """)
    sockvisor.start()
    for _ in range(50):
        with connect(port) as c:
            assert c.recv(16) == b""
    st = wait_for(lambda: (s := sockvisor.unit_status("gone"))["connections"]["refused"] >= 50 and s,
                  what="50 refusals")
    assert st["connections"]["refused_by_reason"] == {"spawn_failed": 50}
    assert 1 <= len(sockvisor.find("spawn_failed", unit="gone")) <= 3
