#!/usr/bin/env python3
"""Re-exec benchmark and chaos soak: ``sockvisor reexec`` under load, and random faults for minutes.

Runs the real daemon on a temporary config with four units: a service (``svc_serve.py``,
``ready: notify``), a pool of 2 workers, an accept-mode ``hello`` (``/bin/echo`` per
connection) and a proxy with an eager backend. One client thread makes sequential
connections to ``hello`` and another to the pool, for the whole run.

``--reexecs N`` (default 20): N re-execs in a row, each after a few more exchanges. Reports
failed connections (must be 0), whether every child pid (service, workers, proxy backend)
is unchanged, whether every listener is the same inode, whether the counters went on
(``hello``'s accepted count covers every connection the client made), and per re-exec the
time the daemon was not accepting: from the old image's ``reexec`` log line to the new
image's ``daemon_ready`` (both timestamped by the daemon), median and max.

``--chaos SECONDS``: instead, for that long, one random action every ``--every`` seconds
(seeded): SIGKILL a random service/pool/backend process, a reload, a re-exec, or SIGSTOP
of the daemon for 0.5 s then SIGCONT. At the end: failed connections to ``hello`` (its
listener never changes: must be 0) and to the pool (a worker killed with a connection in
hand resets it: reported), the daemon's open fds before and after (leaked: 0) and zombie
children (0).

Usage (from the repository root, as root for nothing in particular)::

    python3 bench/reexec_soak.py                   # 20 re-execs
    python3 bench/reexec_soak.py --chaos 180       # a 3-minute chaos soak
    python3 bench/reexec_soak.py --reexecs 50 --json

Exit status 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reload_soak import REPO, Daemon, Load, free_port, listen_inode

from supervisor import control

PROGRAMS = REPO / "tests" / "programs"


def setup(root: Path) -> tuple[Daemon, dict[str, int]]:
    daemon = Daemon(root)
    (daemon.conf / "sockvisor.yaml").write_text(
        f"control:\n  socket: {daemon.control}\nlog:\n  format: json\n  level: info\n")
    ports = {"svc": free_port(), "pool": free_port(), "hello": free_port(), "proxy": free_port(),
             "backend": free_port()}
    py = sys.executable
    daemon.unit("svc", f"""
        listen: [{{tcp: "127.0.0.1:{ports['svc']}"}}]
        mode: service
        start: eager
        ready: notify
        exec: [{py}, {PROGRAMS / 'svc_serve.py'}, notify]
    """)
    daemon.unit("pool", f"""
        listen: [{{tcp: "127.0.0.1:{ports['pool']}"}}]
        mode: pool
        workers: 2
        start: eager
        exec: [{py}, {PROGRAMS / 'pool_worker.py'}]
    """)
    daemon.unit("hello", f"""
        listen: [{{tcp: "127.0.0.1:{ports['hello']}"}}]
        mode: accept
        exec: [/bin/echo, hello]
        log_connections: false
    """)
    daemon.unit("proxy", f"""
        listen: [{{tcp: "127.0.0.1:{ports['proxy']}"}}]
        mode: proxy
        start: eager
        backend: "127.0.0.1:{ports['backend']}"
        exec: [{py}, {PROGRAMS / 'proxy_backend.py'}, "127.0.0.1:{ports['backend']}"]
    """)
    return daemon, ports


def status(daemon: Daemon) -> dict[str, Any]:
    reply = control.request(daemon.control, {"cmd": "status"})
    return {u["name"]: u for u in reply["units"]} | {"_daemon": reply.get("daemon", {})}


def wait_until(predicate: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)  # wait-ok: bounded readiness probe in a benchmark
    return True


def slot_pids(st: dict[str, Any]) -> dict[str, list[int]]:
    return {name: sorted(st[name]["pids"]) for name in ("svc", "pool", "proxy")}


def events(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    out = []
    for line in daemon.log.read_text(errors="replace").splitlines():
        if f'"{name}"' in line:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                out.append(event)
    return out


def stamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def describe_socket(target: str) -> str:
    """socket:[INODE] as what /proc/net says it is (protocol, address, state), to name a leak."""
    inode = target[len("socket:["):-1]
    for table in ("tcp", "tcp6", "udp", "udp6", "unix"):
        with contextlib.suppress(OSError), open(f"/proc/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if table == "unix" and len(fields) >= 7 and fields[6] == inode:
                    return f"unix {fields[7] if len(fields) > 7 else '(unnamed)'} type {fields[4]} state {fields[5]}"
                if table != "unix" and len(fields) > 9 and fields[9] == inode:
                    return f"{table} local {fields[1]} remote {fields[2]} state {fields[3]}"
    return target


def describe_fd(pid: int, fd: int) -> str:
    """A socket in no /proc/net table (unbound, say): a copy through pidfd_getfd, and what it says it is."""
    import ctypes
    import socket

    libc = ctypes.CDLL(None, use_errno=True)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        return f"fd {fd}: {exc}"
    try:
        copy = libc.syscall(438, pidfd, fd, 0)  # pidfd_getfd
        if copy < 0:
            return f"fd {fd}: pidfd_getfd: {os.strerror(ctypes.get_errno())}"
        sock = socket.socket(fileno=copy)
        try:
            parts = [f"fd {fd}", f"family {sock.family!r}", f"type {sock.type!r}"]
            for what in ("getsockname", "getpeername"):
                try:
                    parts.append(f"{what} {getattr(sock, what)()!r}")
                except OSError as exc:
                    parts.append(f"{what} {exc.strerror}")
            return ", ".join(parts)
        finally:
            sock.close()
    finally:
        os.close(pidfd)


def fd_targets(pid: int) -> list[str]:
    """What each of the daemon's fds is (socket:[inode], a path, anon_inode:...), to name a leak."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


def zombies(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in f.read().split():
                try:
                    with open(f"/proc/{child}/stat") as s:
                        if s.read().rsplit(")", 1)[1].split()[0] == "Z":
                            out.append(int(child))
                except OSError:
                    continue
    return out


def reexec_run(count: int, between: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="sv-reexec-", dir="/tmp"))
    daemon, ports = setup(root)
    daemon.start()
    assert daemon.proc is not None
    ok = wait_until(lambda: all(len(v) == (2 if k == "pool" else 1) for k, v in slot_pids(status(daemon)).items()))
    before = slot_pids(status(daemon))
    inodes = {k: listen_inode(p) for k, p in ports.items() if k != "backend"}
    hello_load = Load(ports["hello"], b"hello\n").start()
    problems: list[str] = [] if ok else ["the units did not all start"]
    started = time.monotonic()
    try:
        for i in range(count):
            hello_load.wait_more(between)
            reply = control.request(daemon.control, {"cmd": "reexec"}, timeout=120)
            if not reply.get("ok"):
                problems.append(f"reexec {i}: {reply}")
        hello_load.wait_more(between)
    finally:
        hello_load.stop()
    elapsed = time.monotonic() - started
    st = status(daemon)
    after = slot_pids(st)
    accepted = st["hello"]["connections"]["accepted"]
    same_inodes = {k: listen_inode(p) for k, p in ports.items() if k != "backend"} == inodes
    pid = daemon.proc.pid
    daemon.stop()
    gone = [e for e in events(daemon, "reexec")]
    ready = events(daemon, "daemon_ready")[1:]
    windows = [stamp(r) - stamp(g) for g, r in zip(gone, ready, strict=False)]
    errors = [line for line in daemon.log.read_text().splitlines() if '"level": "error"' in line]
    shutil.rmtree(root, ignore_errors=True)
    return {
        "reexecs": count, "reexecs_answered": len(windows), "problems": problems,
        "connections_ok": hello_load.ok, "connections_failed": hello_load.failed,
        "failures": hello_load.failures[:10],
        "child_pids_unchanged": before == after, "pids_before": before, "pids_after": after,
        "listener_inodes_unchanged": same_inodes,
        "counters_continuous": accepted >= hello_load.ok, "hello_accepted": accepted,
        "daemon_reexec_count": st["_daemon"].get("reexecs"), "daemon_pid_unchanged": st["_daemon"].get("pid") == pid,
        "not_accepting_ms_median": round(statistics.median(windows) * 1000, 1) if windows else None,
        "not_accepting_ms_max": round(max(windows) * 1000, 1) if windows else None,
        "slowest_connection_ms": round(hello_load.latency_max * 1000, 1),
        "daemon_errors": errors[:10], "seconds": round(elapsed, 2),
    }


def chaos_run(seconds: float, every: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="sv-chaos-", dir="/tmp"))
    daemon, ports = setup(root)
    daemon.start()
    assert daemon.proc is not None
    pid = daemon.proc.pid
    wait_until(lambda: all(len(v) == (2 if k == "pool" else 1) for k, v in slot_pids(status(daemon)).items()))
    hello = Load(ports["hello"], b"hello\n").start()
    # The baseline once every unit has served and settled: the first exchanges open fds that stay
    # (seen: one socket more a moment after start-up), which are not a leak.
    wait_until(lambda: hello.ok >= 50, timeout=30)
    fds_before = fd_count(pid)
    targets_before = fd_targets(pid)
    described_before = {t: describe_socket(t) for t in targets_before if t.startswith("socket:")}
    actions: dict[str, int] = {}
    problems: list[str] = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            time.sleep(every)  # wait-ok: the pace of the chaos, not a synchronization
            action = rng.choice(["kill", "kill", "reload", "reexec", "stop-cont"])
            actions[action] = actions.get(action, 0) + 1
            if action == "kill":
                pids = [p for v in slot_pids(status(daemon)).values() for p in v]
                if pids:
                    os.kill(rng.choice(pids), signal.SIGKILL)
            elif action == "reload":
                reply = control.request(daemon.control, {"cmd": "reload"})
                if not reply.get("ok"):
                    problems.append(f"reload: {reply}")
            elif action == "reexec":
                reply = control.request(daemon.control, {"cmd": "reexec"}, timeout=120)
                if not reply.get("ok") and reply.get("reason") != "busy":
                    problems.append(f"reexec: {reply}")
            else:
                os.kill(pid, signal.SIGSTOP)
                time.sleep(0.5)  # wait-ok: the length of the stop is the fault injected
                os.kill(pid, signal.SIGCONT)
    finally:
        hello.stop()
    settled = wait_until(lambda: all(len(v) == (2 if k == "pool" else 1)
                                     for k, v in slot_pids(status(daemon)).items()), timeout=60)
    wait_until(lambda: not zombies(pid), timeout=10)
    # An fd that is open for a moment (the control connection of the status request just made,
    # a pool connection the client has closed first) is not a leak: wait, bounded, for the count
    # to come back, and count what is still open then.
    wait_until(lambda: fd_count(pid) <= fds_before, timeout=10)
    fds_after = fd_count(pid)
    targets_after = fd_targets(pid)
    fresh = set(targets_after) - set(targets_before)
    new_sockets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target in fresh and target.startswith("socket:"):
                described = describe_socket(target)
                new_sockets.append(described if described != target else describe_fd(pid, int(fd)))
    # The same open file on more fds than before (a dup not closed), named as above.
    counts = collections.Counter(targets_after)
    counts.subtract(collections.Counter(targets_before))
    more_fds = [f"{describe_socket(t) if t.startswith('socket:') else t} +{n}"
                for t, n in counts.items() if n > 0 and t in targets_before]
    kinds = collections.Counter(t.split("[")[0] for t in targets_after)
    kinds.subtract(collections.Counter(t.split("[")[0] for t in targets_before))
    left_zombies = zombies(pid)
    daemon.stop()
    errors = [line for line in daemon.log.read_text().splitlines() if '"level": "error"' in line]
    shutil.rmtree(root, ignore_errors=True)
    return {
        "seconds": seconds, "seed": seed, "actions": actions, "problems": problems,
        "hello_ok": hello.ok, "hello_failed": hello.failed, "failures": hello.failures[:10],
        "units_back": settled, "fds_before": fds_before, "fds_after": fds_after,
        "fds_leaked": max(0, fds_after - fds_before),
        "fd_kinds_changed": {k: v for k, v in kinds.items() if v}, "new_sockets": new_sockets,
        "more_fds": more_fds,
        "gone_sockets": [d for t, d in described_before.items() if t not in targets_after],
        "zombies": left_zombies, "daemon_errors": errors[:10],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--reexecs", type=int, default=20)
    ap.add_argument("--between", type=int, default=20, metavar="N", help="exchanges before each re-exec")
    ap.add_argument("--chaos", type=float, metavar="SECONDS", help="run the chaos soak for this long instead")
    ap.add_argument("--every", type=float, default=1.0, help="chaos: seconds between actions (default 1)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.chaos:
        result = chaos_run(args.chaos, args.every, args.seed)
        good = (result["hello_failed"] == 0 and result["units_back"] and result["fds_leaked"] == 0
                and not result["zombies"] and not result["problems"])
    else:
        result = reexec_run(args.reexecs, args.between)
        good = (result["connections_failed"] == 0 and result["child_pids_unchanged"] and not result["problems"]
                and result["listener_inodes_unchanged"] and result["counters_continuous"]
                and result["reexecs_answered"] == args.reexecs)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0 if good else 1


if __name__ == "__main__":
    raise SystemExit(main())
