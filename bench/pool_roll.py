#!/usr/bin/env python3
"""Pool benchmark: a 4-worker pool under load, with and without back-to-back rolling restarts.

    python3 bench/pool_roll.py                       # shared socket and reuse_port, 5 s per phase
    python3 bench/pool_roll.py --seconds 10 --clients 4 --modes reuse_port

For each listener mode (``shared``: one socket all workers accept on; ``reuse_port``: one
SO_REUSEPORT socket per worker slot) it runs the real daemon on a temporary config with a
pool of 4 Python workers (``tests/programs/pool_worker.py``: answers "<pid> <worker>\\n" per
connection, ``ready: notify``, graceful on SIGTERM), then two phases of the same length:

  steady  the load alone;
  rolling the same load while ``restart`` is sent over the control socket again as soon as
          the previous roll logged ``roll_finished`` (so a roll is in flight the whole time).

The load is ``--clients`` processes, each making sequential connections (connect, read to
EOF) until the phase ends or ``--max-per-client`` connections are made. It prints, per
phase: connections served, failed (refused, reset, timed out, short reply), the rate, the
number of rolls completed and aborted, and the per-worker (SOCKVISOR_WORKER) split of the
steady phase. The daemon is stopped by pid (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "programs" / "pool_worker.py"


# ---------------------------------------------------------------- the daemon


class Daemon:
    """The real daemon as a subprocess; its JSON log events are collected on a thread."""

    def __init__(self, root: Path, unit: str) -> None:
        self.control = root / "control.sock"
        conf = root / "conf"
        (conf / "sockets.d").mkdir(parents=True)
        (conf / "sockvisor.yaml").write_text(f"control:\n  socket: {self.control}\nlog:\n  format: json\n")
        (conf / "sockets.d" / "pool.yaml").write_text(unit)
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config", str(conf)],
                                     cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def count(self, name: str) -> int:
        with self._cond:
            return sum(1 for e in self.events if e.get("event") == name)

    def wait(self, names: tuple[str, ...], count: int, timeout: float = 60) -> None:
        """Until ``count`` events with one of ``names`` were logged in all."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(1 for e in self.events if e.get("event") in names) < count:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(f"no {names} x{count}; daemon exit {self.proc.poll()}")
                self._cond.wait(min(left, 1.0))

    def command(self, cmd: str, unit: str | None = None) -> dict[str, Any]:
        """One control request, over the control socket (no CLI process in the measurement)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(self.control))
            s.sendall(json.dumps({"cmd": cmd, "unit": unit}).encode() + b"\n")
            reply = s.makefile("rb").readline()
        return json.loads(reply)  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------- the load


def _client(port: int, seconds: float, limit: int, out: mp.Queue[Any]) -> None:
    ok = failed = 0
    errors: Counter[str] = Counter()
    workers: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    for _ in range(limit):
        if time.monotonic() >= deadline:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                data = b""
                while chunk := s.recv(100):
                    data += chunk
            _, worker = data.decode().split()
        except (OSError, ValueError) as exc:
            failed += 1
            errors[type(exc).__name__] += 1
            continue
        ok += 1
        workers[worker] += 1
    out.put((ok, failed, errors, workers))


@dataclass
class Phase:
    seconds: float = 0.0
    ok: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    workers: Counter[str] = field(default_factory=Counter)
    rolls: int = 0
    aborted: int = 0

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


def load(port: int, clients: int, seconds: float, limit: int) -> Phase:
    ctx = mp.get_context("fork")
    out: mp.Queue[Any] = ctx.Queue()
    procs = [ctx.Process(target=_client, args=(port, seconds, limit, out)) for _ in range(clients)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    phase = Phase()
    for _ in procs:
        ok, failed, errors, workers = out.get(timeout=seconds + 120)
        phase.ok += ok
        phase.failed += failed
        phase.errors.update(errors)
        phase.workers.update(workers)
    for p in procs:
        p.join()
    phase.seconds = time.monotonic() - t0
    return phase


def rolling(daemon: Daemon, stop: threading.Event, phase: Phase) -> None:
    """Restart again as soon as the previous roll ended, until ``stop``."""
    ends = ("roll_finished", "roll_aborted")
    done = daemon.count("roll_finished") + daemon.count("roll_aborted")
    base_ok, base_aborted = daemon.count("roll_finished"), daemon.count("roll_aborted")
    while not stop.is_set():
        reply = daemon.command("restart", "pool")
        if not reply.get("ok"):
            raise RuntimeError(reply)
        done += 1
        daemon.wait(ends, done)
    phase.rolls = daemon.count("roll_finished") - base_ok
    phase.aborted = daemon.count("roll_aborted") - base_aborted


# ---------------------------------------------------------------- main


def run_mode(mode: str, args: argparse.Namespace) -> tuple[Phase, Phase]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = ", reuse_port: true" if mode == "reuse_port" else ""
    unit = textwrap.dedent(f"""
        listen: [{{tcp: "127.0.0.1:{port}"{extra}}}]
        mode: pool
        workers: {args.workers}
        start: eager
        ready: notify
        max_surge: {args.max_surge}
        stderr: "null"
        exec: [{sys.executable}, {WORKER}, notify]
    """)
    root = Path(tempfile.mkdtemp(prefix="sv-bench-", dir="/tmp"))
    daemon = Daemon(root, unit)
    try:
        daemon.wait(("child_ready",), args.workers)
        load(port, 1, 0.5, 1000)  # warm up
        steady = load(port, args.clients, args.seconds, args.max_per_client)
        stop = threading.Event()
        during = Phase()
        roller = threading.Thread(target=rolling, args=(daemon, stop, during))
        roller.start()
        measured = load(port, args.clients, args.seconds, args.max_per_client)
        stop.set()
        roller.join()
        measured.rolls, measured.aborted = during.rolls, during.aborted
        return steady, measured
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each phase")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--max-per-client", type=int, default=200_000, help="connection cap per client per phase")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--max-surge", type=int, default=1)
    parser.add_argument("--modes", default="shared,reuse_port")
    args = parser.parse_args()
    print(f"pool of {args.workers} Python workers, {args.clients} client processes, {args.seconds:g} s per phase, "
          f"{os.cpu_count()} CPUs")
    for mode in args.modes.split(","):
        steady, during = run_mode(mode, args)
        print(f"\n[{mode}]")
        for name, phase in (("steady", steady), ("rolling", during)):
            rolls = f"  rolls {phase.rolls} finished, {phase.aborted} aborted" if name == "rolling" else ""
            errors = f"  ({dict(phase.errors)})" if phase.errors else ""
            print(f"  {name:<8} served {phase.ok:7d}  failed {phase.failed:4d}{errors}  "
                  f"{phase.rate:8.0f} conn/s{rolls}")
        split = [steady.workers.get(str(i), 0) for i in range(args.workers)]
        spread = (max(split) / min(split) - 1) * 100 if min(split) else float("inf")
        print(f"  per worker (steady): {split}  max/min - 1 = {spread:.1f}%")
        split = [during.workers.get(str(i), 0) for i in range(args.workers)]
        print(f"  per worker (rolling): {split}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
