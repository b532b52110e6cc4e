"""Stopping accept mode with children alive: the operator's stop, a re-exec, and SIGTERM under load.

Every child is signalled and reaped (no zombie is left, ``/proc/PID`` is gone), status counts
a connection as soon as its child runs, a re-exec's new image reaps the children it inherited,
and a daemon told to stop while connections are being spawned exits (a daemon once hung in
shutdown under a benchmark; this is the test that would catch it).
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

from tests.conftest import Sockvisor, alive, connect, roundtrip, wait_for


def gone(pid: int) -> bool:
    """Exited and reaped: no /proc entry at all (a zombie still has one)."""
    try:
        with open(f"/proc/{pid}/stat", "rb"):
            return False
    except FileNotFoundError:
        return True


def accept_unit(sockvisor: Sockvisor, port: int, extra: str = "", argv: tuple[str, ...] = ("/bin/cat",)) -> None:
    """The accept unit ``eng`` on ``port``, running ``argv`` per connection (cat: until the client closes)."""
    sockvisor.unit("eng", f"""
        listen: [{{tcp: "127.0.0.1:{port}", backlog: 128}}]
        mode: accept
        exec: {json.dumps(list(argv))}
        {extra}
    """)


def live_children(sockvisor: Sockvisor, n: int) -> list[int]:
    def pids() -> list[int] | None:
        found: list[int] = sockvisor.unit_status("eng")["pids"]
        return found if len(found) == n else None

    return wait_for(pids, timeout=20, what=f"{n} children")


def test_operator_stop_signals_the_live_children_and_start_serves_again(sockvisor: Sockvisor, port: int) -> None:
    accept_unit(sockvisor, port)
    sockvisor.start()
    clients = [connect(port) for _ in range(2)]
    pids = live_children(sockvisor, 2)
    sockvisor.cli("stop", "eng", check=True)
    for pid in pids:
        ev = sockvisor.wait_event("child_exited", unit="eng", pid=pid)
        assert ev["status"] == "SIGTERM"
    wait_for(lambda: all(gone(pid) for pid in pids), what="children reaped")
    assert sockvisor.unit_status("eng")["state"] == "stopped"
    sockvisor.cli("start", "eng", check=True)
    assert roundtrip(port, b"again") == b"again"
    for c in clients:
        c.close()


def test_status_right_after_a_connection_counts_it(sockvisor: Sockvisor, port: int) -> None:
    """A connection whose child runs is in status at once (accepted, and its pid listed)."""
    accept_unit(sockvisor, port, "log_connections: false")
    sockvisor.start()
    with connect(port) as c:
        c.sendall(b"y")
        assert c.recv(1) == b"y"  # the child runs
        status = sockvisor.unit_status("eng")
        assert status["connections"]["accepted"] == 1 and len(status["pids"]) == 1


def test_reexec_hands_live_children_to_the_new_image(sockvisor: Sockvisor, port: int) -> None:
    """The new image inherits the connections' children, reaps them when they end, and serves on."""
    accept_unit(sockvisor, port)
    sockvisor.start()
    clients = [connect(port) for _ in range(3)]
    pids = live_children(sockvisor, 3)
    res = sockvisor.cli("reexec", timeout=120)
    assert res.returncode == 0, res.stderr
    sockvisor.wait_event("daemon_ready", count=2, timeout=30)
    assert all(alive(pid) for pid in pids), "the connections' children outlive the old image"
    for c in clients:
        c.sendall(b"z")
        assert c.recv(1) == b"z"
        c.close()
    wait_for(lambda: all(gone(pid) for pid in pids), what="inherited children reaped, no zombie")
    assert roundtrip(port, b"new") == b"new"  # the new image serves


def test_sigterm_while_connections_are_being_spawned_exits(sockvisor: Sockvisor, port: int) -> None:
    """Shutdown under a spawn load: the daemon stops accepting, reaps every child and exits."""
    accept_unit(sockvisor, port, argv=("/bin/echo", "hi"))
    sockvisor.start()
    stop = threading.Event()
    served = [0]

    def load() -> None:
        while not stop.is_set() and served[0] < 50_000:
            try:
                roundtrip(port, timeout=5)
                served[0] += 1
            except OSError:
                if stop.is_set():
                    return
                time.sleep(0.01)  # wait-ok: pacing a load generator, not synchronising

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: served[0] >= 200, timeout=30, what="the load to be under way")
        assert sockvisor.proc is not None
        pid = sockvisor.proc.pid
        sockvisor.proc.send_signal(signal.SIGTERM)
        assert sockvisor.proc.wait(30) == 0, "the daemon exited cleanly"
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not alive(pid)
    sockvisor.wait_event("daemon_stopped")
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the listener is closed"
