"""mode: pool, end to end: long-lived workers on shared (or per-slot SO_REUSEPORT) listeners, rolling restarts."""

from __future__ import annotations

import os
import sys
import textwrap
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import PROGRAMS, Sockvisor, connect, wait_for

PY = sys.executable
WORKER = PROGRAMS / "pool_worker.py"


def _hello(port: int) -> tuple[int, str]:
    """One connection: the worker's (pid, SOCKVISOR_WORKER)."""
    with connect(port, timeout=10) as s:
        chunks = []
        while True:
            chunk = s.recv(100)
            if not chunk:
                break
            chunks.append(chunk)
    pid, worker = b"".join(chunks).decode().split()
    return int(pid), worker


@dataclass
class Load:
    """Client threads making sequential connections until stopped or ``per_thread`` each, counting outcomes."""

    port: int
    threads: int = 4
    per_thread: int = 100_000
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    workers: Counter[str] = field(default_factory=Counter)
    pids: Counter[int] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]
        for t in self._threads:
            t.start()
        return self

    def _run(self) -> None:
        for _ in range(self.per_thread):
            if self._stop.is_set():
                return
            try:
                pid, worker = _hello(self.port)
            except (OSError, ValueError) as exc:
                with self._lock:
                    self.failed.append(repr(exc))
                continue
            with self._lock:
                self.ok += 1
                self.workers[worker] += 1
                self.pids[pid] += 1

    def stop(self) -> Load:
        self._stop.set()
        return self.join()

    def join(self) -> Load:
        for t in self._threads:
            t.join(60)
        return self


def _pool(sockvisor: Sockvisor, port: int, *, workers: int = 4, extra: str = "", args: str = "notify",
          listen_extra: str = "") -> None:
    ready = "ready: notify" if "notify" in args else ""
    sockvisor.unit("pool", textwrap.dedent(f"""
        listen: [{{tcp: "127.0.0.1:{port}"{listen_extra}}}]
        mode: pool
        workers: {workers}
        start: eager
        {ready}
        stop_timeout: 5s
        exec: [{PY}, {WORKER}, {args}]
    """) + textwrap.dedent(extra))


def _running(sockvisor: Sockvisor, n: int) -> list[dict[str, object]]:
    """Wait until the pool's n slots all run; their status entries by slot."""
    def ready() -> list[dict[str, object]] | None:
        st = sockvisor.unit_status("pool")
        ws = [w for w in st["workers"] if w["role"] == "worker"]
        return ws if len(ws) == n and all(w["state"] == "running" for w in ws) else None
    return wait_for(ready, what=f"{n} workers running")  # type: ignore[no-any-return]


def _polled_listeners(daemon: int, port: int) -> int:
    """How many of the daemon's fds listening on ``port`` are registered in one of its epoll instances."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[1].endswith(f":{port:04X}") and cols[3] == "0A":
            inodes.add(cols[9])
    listening, epolls = set(), []
    for fd in os.listdir(f"/proc/{daemon}/fd"):
        try:
            target = os.readlink(f"/proc/{daemon}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            listening.add(int(fd))
        elif target == "anon_inode:[eventpoll]":
            epolls.append(fd)
    polled = set()
    for fd in epolls:
        for line in Path(f"/proc/{daemon}/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("tfd:"):
                polled.add(int(line.split()[1]))
    return len(listening & polled)


def test_workers_get_the_fds_a_stable_index_and_the_daemon_stops_polling(sockvisor: Sockvisor, port: int) -> None:
    """An on-demand pool polls until the first connection, then runs N workers (SOCKVISOR_WORKER 0..N-1) unpolled."""
    sockvisor.unit("pool", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: pool
        workers: 3
        exec: [{PY}, {WORKER}]
    """)
    sockvisor.start()
    assert sockvisor.proc is not None
    assert sockvisor.unit_status("pool")["state"] == "listening"
    assert _polled_listeners(sockvisor.proc.pid, port) == 1
    _hello(port)
    ws = _running(sockvisor, 3)
    assert [w["slot"] for w in ws] == [0, 1, 2]
    assert all(isinstance(w["age"], float) and w["restarts"] == 0 for w in ws)
    assert _polled_listeners(sockvisor.proc.pid, port) == 0
    seen = Load(port, threads=4, per_thread=50).start().join()
    assert not seen.failed
    assert set(seen.workers) <= {"0", "1", "2"}
    assert set(seen.pids) <= {w["pid"] for w in ws}


def test_on_demand_reuse_port_pool_polls_every_slot_socket_until_started(sockvisor: Sockvisor, port: int) -> None:
    """An on-demand pool with reuse_port polls all its per-slot sockets while idle, and none once workers run."""
    sockvisor.unit("pool", f"""
        listen: [{{tcp: "127.0.0.1:{port}", reuse_port: true}}]
        mode: pool
        workers: 3
        exec: [{PY}, {WORKER}]
    """)
    sockvisor.start()
    assert sockvisor.proc is not None
    assert _polled_listeners(sockvisor.proc.pid, port) == 3
    _hello(port)
    _running(sockvisor, 3)
    assert _polled_listeners(sockvisor.proc.pid, port) == 0
    load = Load(port, threads=2, per_thread=200).start().join()
    assert not load.failed and set(load.workers) == {"0", "1", "2"}


def test_dead_worker_is_replaced_in_its_slot(sockvisor: Sockvisor, port: int) -> None:
    """A killed worker comes back in the same slot (same SOCKVISOR_WORKER) after the restart delay."""
    _pool(sockvisor, port, workers=2, extra="restart_delay: 50ms\n")
    sockvisor.start()
    before = _running(sockvisor, 2)
    victim = before[1]["pid"]
    assert isinstance(victim, int)
    os.kill(victim, 9)
    sockvisor.wait_event("restart_scheduled", unit="pool", slot=1)
    after = wait_for(lambda: [w for w in _running(sockvisor, 2) if w["pid"] != victim and w["slot"] == 1],
                     what="slot 1 replaced")
    assert after[0]["restarts"] == 1
    assert _running(sockvisor, 2)[0]["pid"] == before[0]["pid"], "the healthy worker was left alone"
    load = Load(port, threads=2, per_thread=100).start().join()
    assert not load.failed and set(load.workers) <= {"0", "1"}


def test_crash_looping_slot_backs_off_while_healthy_workers_serve(sockvisor: Sockvisor, port: int) -> None:
    """One worker that crashes on start backs off with doubling delays; the others keep their pids and serve."""
    _pool(sockvisor, port, workers=3, args="", extra="""
        restart_delay: 50ms
        restart_delay_max: 200ms
        environment: {POOL_CRASH_WORKER: "1"}
    """)
    sockvisor.start()
    delays = [sockvisor.wait_event("restart_scheduled", unit="pool", slot=1, count=n)["delay"] for n in (1, 2, 3, 4)]
    assert delays == [0.05, 0.1, 0.2, 0.2]
    assert not sockvisor.find("restart_scheduled", unit="pool", slot=0)
    assert not sockvisor.find("restart_scheduled", unit="pool", slot=2)
    load = Load(port, threads=2, per_thread=200).start().join()
    assert not load.failed
    assert set(load.workers) == {"0", "2"}
    ws = sockvisor.unit_status("pool")["workers"]
    assert ws[1]["restarts"] >= 3 and ws[0]["restarts"] == ws[2]["restarts"] == 0


def test_rolling_restarts_refuse_nothing_under_load(sockvisor: Sockvisor, port: int) -> None:
    """Three rolling restarts of a 4-worker pool under load: every slot replaced each time, zero failed connections."""
    _pool(sockvisor, port)
    sockvisor.start()
    first = {w["pid"] for w in _running(sockvisor, 4)}
    load = Load(port, threads=4).start()
    try:
        wait_for(lambda: load.ok > 200, what="load running")
        for n in (1, 2, 3):
            sockvisor.cli("restart", "pool", check=True)
            done = sockvisor.wait_event("roll_finished", unit="pool", count=n, timeout=30)
            assert done["replaced"] == 4
        served = load.ok
        wait_for(lambda: load.ok > served + 200, what="load after the rolls")
    finally:
        load.stop()
    assert load.failed == []
    steps = sockvisor.find("roll_step", unit="pool")
    assert [s["slot"] for s in steps] == [0, 1, 2, 3] * 3
    assert {s["old_pid"] for s in steps[:4]} == first
    now = {w["pid"] for w in _running(sockvisor, 4)}
    assert now == {s["new_pid"] for s in steps[8:]}
    assert len(set(load.pids)) > 4, "connections were served by old and new workers"
    # The old worker of a slot is stopped only after its replacement is ready.
    for s in steps:
        ready = sockvisor.find("child_ready", unit="pool", pid=s["new_pid"])
        assert ready and ready[0]["surge"] is True


def test_failed_new_worker_aborts_the_roll_and_keeps_the_old_ones(sockvisor: Sockvisor, port: int,
                                                                  short_tmp: Path) -> None:
    """A new worker that exits before READY=1 aborts the roll (roll_aborted, status), the old workers keep serving."""
    broken = short_tmp / "broken"
    _pool(sockvisor, port, workers=3, extra=f"environment: {{POOL_FAIL_FILE: {broken}}}\n")
    sockvisor.start()
    before = [w["pid"] for w in _running(sockvisor, 3)]
    broken.write_text("new version does not start\n")
    sockvisor.cli("restart", "pool", check=True)
    aborted = sockvisor.wait_event("roll_aborted", unit="pool")
    assert aborted["slot"] == 0 and aborted["replaced"] == 0 and "exit 4" in aborted["reason"]
    st = sockvisor.unit_status("pool")
    assert st["roll"]["state"] == "aborted" and st["roll"]["slot"] == 0
    wait_for(lambda: [w["pid"] for w in _running(sockvisor, 3)] == before and
             len(sockvisor.unit_status("pool")["workers"]) == 3, what="only the old workers")
    assert not sockvisor.find("roll_step", unit="pool")
    load = Load(port, threads=2, per_thread=100).start().join()
    assert not load.failed and set(load.pids) <= set(before)
    # Fixed: the next restart rolls through.
    broken.unlink()
    sockvisor.cli("restart", "pool", check=True)
    assert sockvisor.wait_event("roll_finished", unit="pool")["replaced"] == 3


def test_start_timeout_of_a_new_worker_aborts_the_roll(sockvisor: Sockvisor, port: int, short_tmp: Path) -> None:
    """A new worker that never sends READY=1 is killed at start_timeout and the roll is aborted."""
    hang = short_tmp / "hang"
    _pool(sockvisor, port, workers=2, extra=f"start_timeout: 1s\nenvironment: {{POOL_HANG_FILE: {hang}}}\n")
    sockvisor.start()
    before = [w["pid"] for w in _running(sockvisor, 2)]
    hang.write_text("")
    sockvisor.cli("restart", "pool", check=True)
    aborted = sockvisor.wait_event("roll_aborted", unit="pool")
    assert aborted["reason"] == "start timeout" and aborted["slot"] == 0
    surge = sockvisor.find("start_timeout", unit="pool", slot=0, surge=True)
    assert surge
    wait_for(lambda: len(sockvisor.unit_status("pool")["workers"]) == 2, what="surge gone")
    assert [w["pid"] for w in _running(sockvisor, 2)] == before


def test_stubborn_old_worker_is_killed_and_the_roll_goes_on(sockvisor: Sockvisor, port: int) -> None:
    """An old worker that ignores SIGTERM is SIGKILLed after stop_timeout and the roll goes on (ready: exec, settle)."""
    sockvisor.unit("pool", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: pool
        workers: 2
        start: eager
        settle: 200ms
        stop_timeout: 300ms
        exec: [{PY}, {WORKER}, stubborn]
    """)
    sockvisor.start()
    old = [w["pid"] for w in _running(sockvisor, 2)]
    for _ in range(20):  # both serve, so both have set their signal disposition
        _hello(port)
    wait_for(lambda: len(Load(port, threads=1, per_thread=40).start().join().pids) == 2, what="both serving")
    sockvisor.cli("restart", "pool", check=True)
    done = sockvisor.wait_event("roll_finished", unit="pool", timeout=30)
    assert done["replaced"] == 2
    killed = {e["pid"] for e in sockvisor.find("child_killed", unit="pool")}
    assert killed == set(old)
    assert done["duration"] >= 2 * (0.2 + 0.3)


def test_reuse_port_spreads_connections_evenly_and_keeps_slot_sockets_across_rolls(sockvisor: Sockvisor,
                                                                                   port: int) -> None:
    """With reuse_port each slot has its own socket: per-worker counts within 25%, and a roll refuses nothing."""
    _pool(sockvisor, port, listen_extra=", reuse_port: true")
    sockvisor.start()
    assert sockvisor.proc is not None
    _running(sockvisor, 4)
    load = Load(port, threads=4, per_thread=500).start().join()
    assert not load.failed
    counts = [load.workers[str(i)] for i in range(4)]
    assert min(counts) > 0 and max(counts) <= 1.25 * min(counts), counts
    listening = [ln for ln in Path("/proc/net/tcp").read_text().splitlines()[1:]
                 if ln.split()[1].endswith(f":{port:04X}") and ln.split()[3] == "0A"]
    assert len(listening) == 4
    load = Load(port, threads=4).start()
    try:
        sockvisor.cli("restart", "pool", check=True)
        sockvisor.wait_event("roll_finished", unit="pool", timeout=30)
        served = load.ok
        wait_for(lambda: load.ok > served + 200, what="load after the roll")
    finally:
        load.stop()
    assert load.failed == []
    assert set(load.workers) == {"0", "1", "2", "3"}


def test_reload_adds_and_retires_slots(sockvisor: Sockvisor, port: int) -> None:
    """A reload that changes workers starts new slots or stops the highest ones, with their per-slot sockets."""
    _pool(sockvisor, port, workers=2, listen_extra=", reuse_port: true")
    sockvisor.start()
    kept = [w["pid"] for w in _running(sockvisor, 2)]

    def listeners() -> int:
        return sum(1 for ln in Path("/proc/net/tcp").read_text().splitlines()[1:]
                   if ln.split()[1].endswith(f":{port:04X}") and ln.split()[3] == "0A")

    assert listeners() == 2
    _pool(sockvisor, port, workers=4, listen_extra=", reuse_port: true")
    sockvisor.cli("reload", check=True)
    ws = _running(sockvisor, 4)
    assert [w["pid"] for w in ws[:2]] == kept
    assert listeners() == 4
    load = Load(port, threads=2, per_thread=200).start().join()
    assert not load.failed and set(load.workers) == {"0", "1", "2", "3"}
    _pool(sockvisor, port, workers=1, listen_extra=", reuse_port: true")
    sockvisor.cli("reload", check=True)
    wait_for(lambda: len(sockvisor.unit_status("pool")["workers"]) == 1, what="slots retired")
    assert [w["pid"] for w in _running(sockvisor, 1)] == kept[:1]
    wait_for(lambda: listeners() == 1, what="per-slot sockets closed")
    load = Load(port, threads=2, per_thread=100).start().join()
    assert not load.failed and set(load.workers) == {"0"}


def test_status_lists_surges_during_a_roll(sockvisor: Sockvisor, port: int) -> None:
    """While a roll waits out settle, status shows the surge beside the slot's worker, and the roll's progress."""
    _pool(sockvisor, port, workers=2, args="", extra="settle: 5s\n")
    sockvisor.start()
    _running(sockvisor, 2)
    sockvisor.cli("restart", "pool", check=True)
    sockvisor.wait_event("child_started", unit="pool", surge=True)
    st = sockvisor.unit_status("pool")
    roles = sorted((w["role"], w["slot"]) for w in st["workers"])
    assert roles == [("surge", 0), ("worker", 0), ("worker", 1)]
    assert st["roll"]["state"] == "running" and st["roll"]["total"] == 2
    assert len(st["pids"]) == 3
    sockvisor.cli("stop", "pool", check=True)
    assert sockvisor.wait_event("roll_aborted", unit="pool")["reason"] == "stopped"
    wait_for(lambda: not sockvisor.unit_status("pool")["pids"], what="everything stopped")
