"""``sockvisor reexec`` (and SIGUSR2): the daemon replaces its own image, same pid, losing nothing.

Under per-connection load, with a service, a pool and an fd store running: every connection
succeeds, every child keeps its pid and stays supervised (killing one afterwards restarts it),
the counters go on, the listening sockets are the same kernel objects, the fd store is intact.
A failed exec or an invalid configuration leaves the old image serving; a new image that cannot
read the handover falls back to adopting the listeners it inherited.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

from tests.conftest import PROGRAMS, REPO, Sockvisor, connect, first_line, free_port, roundtrip, wait_for


def listener_inode(port: int) -> int:
    """The inode of the socket listening on 127.0.0.1:port, from /proc/net/tcp."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
                return int(fields[9])
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")




class Load:
    """Bounded per-connection load on one port from a thread: counts successes and failures."""

    def __init__(self, port: int, expect: bytes, limit: int = 20_000) -> None:
        self.port, self.expect, self.limit = port, expect, limit
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set() and self.ok + len(self.failed) < self.limit:
            try:
                got = roundtrip(self.port, timeout=20)
                if got == self.expect:
                    self.ok += 1
                else:
                    self.failed.append(f"got {got!r}")
            except OSError as exc:
                self.failed.append(repr(exc))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def three_units(sockvisor: Sockvisor) -> dict[str, int]:
    ports = {"svc": free_port(), "pool": free_port(), "acc": free_port(), "store": free_port()}
    sockvisor.unit("svc", f"""\
        listen: [{{tcp: 127.0.0.1:{ports['svc']}}}]
        mode: service
        exec: [{sys.executable}, {PROGRAMS / 'svc_serve.py'}, notify]
        ready: notify
        """)
    sockvisor.unit("pool", f"""\
        listen: [{{tcp: 127.0.0.1:{ports['pool']}, reuse_port: true}}]
        mode: pool
        workers: 2
        start: eager
        exec: [{sys.executable}, {PROGRAMS / 'pool_worker.py'}]
        """)
    sockvisor.unit("acc", f"""\
        listen: [{{tcp: 127.0.0.1:{ports['acc']}}}]
        mode: accept
        pass: stdio
        exec: [/bin/echo, hello]
        log_connections: false
        """)
    sockvisor.unit("store", f"""\
        listen: [{{tcp: 127.0.0.1:{ports['store']}}}]
        mode: service
        exec: [{sys.executable}, {PROGRAMS / 'notify_fdstore.py'}]
        environment: {{PYTHONPATH: "{REPO}"}}
        fd_store_max: 4
        """)
    return ports


def reexec(sockvisor: Sockvisor, count: int) -> subprocess.CompletedProcess[str]:
    res = sockvisor.cli("reexec", timeout=120)
    assert res.returncode == 0, res.stderr
    assert sockvisor.proc is not None
    assert res.stdout.strip().startswith(f"re-executed: pid {sockvisor.proc.pid}, "), res.stdout
    sockvisor.wait_event("daemon_ready", count=count + 1, timeout=30)
    return res


def test_reexec_under_load_keeps_everything(sockvisor: Sockvisor) -> None:
    ports = three_units(sockvisor)
    sockvisor.start()
    svc_pid = first_line(ports["svc"]).split()[0]
    pool_pids = wait_for(lambda: sorted(sockvisor.unit_status("pool")["pids"]) if len(
        sockvisor.unit_status("pool")["pids"]) == 2 else None, what="two workers")
    store = connect(ports["store"])
    store.sendall(b"one\n")
    store_reader = store.makefile("r")
    assert store_reader.readline().startswith("first ")
    wait_for(lambda: sockvisor.unit_status("store")["fd_store"] == ["conn"], what="the connection stored")
    inodes = {name: listener_inode(port) for name, port in ports.items()}
    before = sockvisor.unit_status("acc")["connections"]["accepted"]

    with Load(ports["acc"], b"hello\n") as load:
        wait_for(lambda: load.ok >= 20, what="load running")
        for n in range(1, 6):
            reexec(sockvisor, n)
            at = load.ok
            wait_for(lambda at=at: load.ok > at + 5, what="load served by the new image")
    assert load.failed == [], load.failed[:5]

    status = sockvisor.status()
    assert sockvisor.proc is not None
    assert status["daemon"]["reexecs"] == 5 and status["daemon"]["pid"] == sockvisor.proc.pid
    units = {u["name"]: u for u in status["units"]}
    assert units["acc"]["connections"]["accepted"] >= before + load.ok  # counters continuous
    assert first_line(ports["svc"]).split()[0] == svc_pid
    assert sorted(units["pool"]["pids"]) == pool_pids
    assert units["store"]["fd_store"] == ["conn"]
    assert {name: listener_inode(port) for name, port in ports.items()} == inodes
    # Still supervised: the stored connection survives a restart of its service, a killed service restarts.
    sockvisor.cli("restart", "store", check=True)
    store.sendall(b"two\n")
    assert store_reader.readline().startswith("second ")
    store.close()
    os.kill(int(svc_pid), signal.SIGKILL)
    sockvisor.wait_event("child_exited", unit="svc", pid=int(svc_pid), timeout=15)
    wait_for(lambda: first_line(ports["svc"]).split()[0] != svc_pid, what="svc restarted")
    os.kill(pool_pids[0], signal.SIGKILL)
    wait_for(lambda: pool_pids[0] not in sockvisor.unit_status("pool")["pids"]
             and len(sockvisor.unit_status("pool")["pids"]) == 2, what="pool worker replaced")
    assert sockvisor.stop() == 0


def test_sigusr2_reexecs_too(sockvisor: Sockvisor, port: int) -> None:
    sockvisor.unit("acc", f"listen: [{{tcp: 127.0.0.1:{port}}}]\nmode: accept\npass: stdio\nexec: [/bin/echo, hi]\n")
    sockvisor.start()
    assert sockvisor.proc is not None
    sockvisor.proc.send_signal(signal.SIGUSR2)
    sockvisor.wait_event("reexec_resumed", timeout=30)
    sockvisor.wait_event("daemon_ready", count=2, timeout=30)
    assert roundtrip(port) == b"hi\n"
    assert sockvisor.status()["daemon"]["reexecs"] == 1
    assert sockvisor.stop() == 0


def test_failed_exec_keeps_the_old_image_serving(sockvisor: Sockvisor, port: int) -> None:
    sockvisor.unit("acc", f"listen: [{{tcp: 127.0.0.1:{port}}}]\nmode: accept\npass: stdio\nexec: [/bin/echo, hi]\n")
    sockvisor.start(env={"SOCKVISOR_EXEC": "/nonexistent/python"})
    res = sockvisor.cli("reexec")
    assert res.returncode == 1
    assert "re-exec failed; still running the old image: /nonexistent/python: No such file" in res.stderr
    assert roundtrip(port) == b"hi\n"
    assert sockvisor.status()["daemon"]["reexecs"] == 0
    assert sockvisor.stop() == 0


def test_invalid_configuration_refuses_the_reexec(sockvisor: Sockvisor, port: int) -> None:
    sockvisor.unit("acc", f"listen: [{{tcp: 127.0.0.1:{port}}}]\nmode: accept\npass: stdio\nexec: [/bin/echo, hi]\n")
    sockvisor.start()
    sockvisor.unit("broken", "listen: [{tcp: 127.0.0.1:1}]\nmode: nonsense\n")
    res = sockvisor.cli("reexec")
    assert res.returncode == 1 and "the configuration is invalid" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert roundtrip(port) == b"hi\n"


def test_unreadable_handover_falls_back_to_adopting_inherited_listeners(sockvisor: Sockvisor, port: int) -> None:
    """A handover fd that holds no state: the listening socket inherited anyway is adopted, not re-bound."""
    sockvisor.unit("acc", f"listen: [{{tcp: 127.0.0.1:{port}}}]\nmode: accept\npass: stdio\nexec: [/bin/echo, hi]\n")
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.bind(("127.0.0.1", port))
    held.listen(16)
    garbage = os.memfd_create("not-state", 0)
    os.write(garbage, b"{not json")
    os.lseek(garbage, 0, os.SEEK_SET)
    inode = listener_inode(port)
    sockvisor.start(env={"SOCKVISOR_HANDOVER_FD": str(garbage)}, pass_fds=(held.fileno(), garbage))
    held.close()
    os.close(garbage)
    sockvisor.wait_event("handover_unreadable")
    sockvisor.wait_event("socket_adopted", unit="acc")
    assert listener_inode(port) == inode
    assert roundtrip(port) == b"hi\n"


def test_a_handed_over_child_that_is_already_gone_does_not_hang_shutdown(sockvisor: Sockvisor, port: int) -> None:
    """The state lists pids that are no children of the new image (reaped before the exec): forgotten, not awaited."""
    from supervisor import handover

    sockvisor.unit("acc", f"listen: [{{tcp: 127.0.0.1:{port}}}]\nmode: accept\npass: stdio\nexec: [/bin/echo, hi]\n")
    gone = []
    for _ in range(2):
        child = subprocess.Popen(["/bin/true"])
        child.wait()
        gone.append(child.pid)
    state = handover.State(children=gone, units={"acc": handover.UnitHandover(name="acc", mode="accept",
                                                                               strays=[gone[1]])})
    memfd = handover.write_memfd(state)
    sockvisor.start(env={handover.ENV: str(memfd)}, pass_fds=(memfd,))
    os.close(memfd)
    sockvisor.wait_event("reexec_resumed")
    for pid in gone:
        sockvisor.wait_event("child_vanished", pid=pid)
    assert roundtrip(port) == b"hi\n"
    assert sockvisor.stop(timeout=20) == 0


def test_an_unprivileged_user_cannot_reexec(sockvisor: Sockvisor, port: int) -> None:
    """Even with a world-writable control socket, `reexec` (or any command) from uid 65534 is refused."""
    import shutil

    if shutil.which("setpriv") is None:
        import pytest

        pytest.skip("setpriv (util-linux) is not installed")
    sockvisor.unit("acc", f"listen: [{{tcp: 127.0.0.1:{port}}}]\nmode: accept\npass: stdio\nexec: [/bin/echo, hi]\n")
    (sockvisor.config / "sockvisor.yaml").write_text(
        f'control:\n  socket: {sockvisor.control}\n  mode: "0666"\nlog:\n  format: json\n  level: info\n')
    sockvisor.start()
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                          "supervisor", "reexec", "--control", str(sockvisor.control)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 1 and "permission denied: only root or the daemon's user" in res.stderr, res.stderr
    assert not sockvisor.find("reexec")
    assert sockvisor.status()["daemon"]["reexecs"] == 0
    assert roundtrip(port) == b"hi\n"


def held_unit(sockvisor: Sockvisor, port: int, limits: str) -> None:
    """An accept unit whose child holds its connection until it reads a line."""
    sockvisor.unit("held", f"""\
        listen: [{{tcp: 127.0.0.1:{port}}}]
        mode: accept
        pass: stdio
        exec: [/bin/sh, -c, 'read line; echo "got $line"']
        log_connections: true
        {limits}
        """)


def held_across_a_reexec(sockvisor: Sockvisor, port: int, limits: str) -> tuple[socket.socket, int]:
    """A held connection, its child's pid, and a re-exec of the daemon after it."""
    held_unit(sockvisor, port, limits)
    sockvisor.start()
    first = connect(port)
    pid = wait_for(lambda: (sockvisor.unit_status("held")["pids"] or [None])[0], what="the first child")
    reexec(sockvisor, 1)
    return first, pid


def exchange(s: socket.socket, word: bytes) -> bytes:
    """Send a line to a held child and read its answer."""
    s.settimeout(15)
    s.sendall(word + b"\n")
    return s.makefile("rb").readline()


def test_accept_children_stay_the_units_connections_across_a_reexec(sockvisor: Sockvisor, port: int) -> None:
    """Listed, counted against max_connections, logged when they exit: as if no re-exec had happened."""
    first, pid = held_across_a_reexec(sockvisor, port, "max_connections: 1")
    status = sockvisor.unit_status("held")
    assert status["pids"] == [pid] and status["connections"]["active"] == 1, status

    # The limit still holds: a second connection waits in the backlog while the first child lives.
    second = connect(port)
    second.settimeout(0.5)
    try:
        got = second.recv(64)
    except TimeoutError:
        got = None
    assert got is None, f"a second connection was served past max_connections: 1: {got!r}"
    assert sockvisor.unit_status("held")["pids"] == [pid]

    assert exchange(first, b"one") == b"got one\n"
    exited = sockvisor.wait_event("child_exited", unit="held", pid=pid)
    assert exited.get("remote", "").startswith("127.0.0.1:"), exited
    assert exchange(second, b"two") == b"got two\n"
    first.close()
    second.close()
    assert sockvisor.stop() == 0


def test_per_source_counts_survive_a_reexec(sockvisor: Sockvisor, port: int) -> None:
    """The previous image's connection from 127.0.0.1 still counts: a second one from there is refused at once."""
    first, pid = held_across_a_reexec(sockvisor, port, "max_connections_per_source: 1")
    second = connect(port)
    second.settimeout(15)
    assert second.recv(64) == b""  # closed at once, no child
    wait_for(lambda: sockvisor.unit_status("held")["connections"]["refused_by_reason"].get("per_source") == 1,
             what="the refusal counted as per_source")
    assert sockvisor.unit_status("held")["pids"] == [pid]
    assert exchange(first, b"one") == b"got one\n"
    sockvisor.wait_event("child_exited", unit="held", pid=pid)
    third = connect(port)  # the source is under its limit again
    assert exchange(third, b"three") == b"got three\n"
    for s in (first, second, third):
        s.close()
    assert sockvisor.stop() == 0


def test_stopping_the_unit_stops_the_connections_it_took_over(sockvisor: Sockvisor, port: int) -> None:
    first, pid = held_across_a_reexec(sockvisor, port, "")
    sockvisor.cli("stop", "held", check=True)
    sockvisor.wait_event("child_exited", unit="held", pid=pid)
    assert sockvisor.unit_status("held")["pids"] == []
    first.settimeout(15)
    assert first.recv(64) == b""  # its child is gone
    first.close()
    assert sockvisor.stop() == 0
