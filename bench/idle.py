#!/usr/bin/env python3
"""Where a per-connection spawner leaves the machine idle: a scheduler trace, attributed.

    python3 bench/idle.py                                  # sockvisor and tcpserver, c=32
    python3 bench/idle.py --contenders sockvisor,tcpserver,limit --n 6000 --concurrency 32

For each contender (started as ``bench/accept.py`` starts it, on the same ``hello`` service),
one load run of ``bench/build/loadgen`` is recorded with ``perf sched record``, and the
``perf sched timehist`` of it is read back. In the steady part of the run (the first and last
10 % cut off) every stretch of idle time on a CPU is put in one of two kinds:

- *idle while work waited elsewhere*: some task was runnable on another CPU, queued behind
  what ran there, and the idle CPU did not take it. Split by what waited: the spawner's
  threads, a spawned child before its exec, the program (after its exec), the load generator,
  kernel threads.
- *nothing runnable*: every task was either running or asleep. Split by whether a thread of
  the spawner was held in ``vfork()`` (asleep in state D until its child has exec'ed) or all of
  them were asleep otherwise (waiting for connections or for work).

It also reports, per thread of the spawner, its CPU time and the time it spent runnable but
not running (the scheduling delay). Needs ``perf`` (package ``linux-perf``) with the sched
tracepoints; runs as root. Loopback only, one bounded run per contender.
"""

from __future__ import annotations

import argparse
import itertools
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accept  # the starters, the build, the probe

ROW = re.compile(r"^\s*(\d+\.\d+)\s+\[(\d+)\]\s+(.+?)\[(\d+)(?:/(\d+))?\]\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)"
                 r"\s+(\S+)\s*$")
IDLE = re.compile(r"^\s*(\d+\.\d+)\s+\[(\d+)\]\s+<idle>\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+\S+\s*$")


@dataclass
class Slice:
    """One stretch of a task on a CPU: waiting (runnable, not running) from ``wait`` to ``start``,
    then running until ``end``."""
    cpu: int
    comm: str
    tid: int
    pid: int
    wait: float
    start: float
    end: float
    state: str  # how it left the CPU: R (preempted), S (sleep), D (uninterruptible: vfork), ...


def parse_timehist(text: str) -> tuple[list[Slice], dict[int, list[tuple[float, float]]]]:
    slices: list[Slice] = []
    idle: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for line in text.splitlines():
        if m := IDLE.match(line):
            end, cpu, run = float(m[1]), int(m[2]), float(m[5]) / 1e3
            idle[cpu].append((end - run, end))
        elif m := ROW.match(line):
            end, cpu, comm = float(m[1]), int(m[2]), m[3].strip()
            tid = int(m[4])
            pid = int(m[5]) if m[5] else tid
            delay, run = float(m[7]) / 1e3, float(m[8]) / 1e3
            start = end - run
            slices.append(Slice(cpu, comm, tid, pid, start - delay, start, end, m[9]))
    return slices, idle


def kind(s: Slice, spawner_pid: int, spawner_comm: str, program: str) -> str:
    if s.pid == spawner_pid:
        return "spawner thread"
    if s.comm == spawner_comm:
        return "child before exec"
    if s.comm == program:
        return "program"
    if s.comm == "loadgen":
        return "load generator"
    return "kernel and other"


def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def attribute(slices: list[Slice], idle: dict[int, list[tuple[float, float]]], spawner_pid: int,
              spawner_comm: str, program: str) -> dict[str, float]:
    """Percent of the machine's time in the steady window, by kind of idle."""
    times = [s.end for s in slices] + [b for v in idle.values() for _, b in v]
    t0, t1 = min(times), max(times)
    lo, hi = t0 + 0.1 * (t1 - t0), t1 - 0.1 * (t1 - t0)
    cpus = sorted({s.cpu for s in slices} | set(idle))
    total = (hi - lo) * len(cpus)
    waits = defaultdict(list)  # cpu -> [(from, to, kind)], sorted
    for s in slices:
        if s.start > s.wait and s.start > lo and s.wait < hi:
            waits[s.cpu].append((s.wait, s.start, kind(s, spawner_pid, spawner_comm, program)))
    for v in waits.values():
        v.sort()
    # a spawner thread's uninterruptible sleeps (in vfork(), until its child has exec'ed): from
    # leaving the CPU in state D to becoming runnable again
    held: list[tuple[float, float]] = []
    by_tid: dict[int, list[Slice]] = defaultdict(list)
    for s in slices:
        if s.pid == spawner_pid:
            by_tid[s.tid].append(s)
    for v in by_tid.values():
        v.sort(key=lambda s: s.start)
        held += [(a.end, b.wait) for a, b in itertools.pairwise(v) if a.state.startswith("D") and b.wait > a.end]
    held.sort()
    out: dict[str, float] = defaultdict(float)
    step = 5e-6  # sample each idle stretch every 5 us: exact enough, and simple
    for cpu in cpus:
        others = [w for c in cpus if c != cpu for w in waits[c]]
        others.sort()
        for a, b in idle[cpu]:
            a, b = max(a, lo), min(b, hi)
            if b <= a:
                continue
            out["idle"] += b - a
            near = [w for w in others if w[1] > a and w[0] < b]
            vfork = [h for h in held if h[1] > a and h[0] < b]
            t = a
            while t < b:
                dt = min(step, b - t)
                who = {k for f, e, k in near if f <= t < e}
                if who:
                    # one instant counted once, under the kind nearest to the spawner's work
                    for k in ("child before exec", "spawner thread", "program", "load generator",
                              "kernel and other"):
                        if k in who:
                            out["waited: " + k] += dt
                            break
                elif any(f <= t < e for f, e in vfork):
                    out["nothing runnable: a spawner held in vfork"] += dt
                else:
                    out["nothing runnable: spawners asleep"] += dt
                t += dt
    return {k: 100 * v / total for k, v in out.items()}


def per_thread(slices: list[Slice], spawner_pid: int) -> list[tuple[int, float, float, int]]:
    acc: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for s in slices:
        if s.pid == spawner_pid:
            a = acc[s.tid]
            a[0] += s.end - s.start
            a[1] += s.start - s.wait
            a[2] += 1
    return sorted((tid, v[0], v[1], int(v[2])) for tid, v in acc.items())


def run(name: str, starter: accept.Starter, args: argparse.Namespace) -> str:
    try:
        with accept.serving(name, starter) as (proc, port):
            return traced(name, proc, port, args)
    except accept.NotServing as why:
        return f"### {name}\n\nskipped: {why}\n"


def traced(name: str, proc: subprocess.Popen[bytes], port: int, args: argparse.Namespace) -> str:
    program = str(accept.BUILD / "hello")
    with tempfile.TemporaryDirectory(prefix=f"idle-{name}-") as work:
        accept.loadgen(port, 8, 500, 5)
        data = Path(work) / "perf.data"
        rec = subprocess.run(
            ["perf", "sched", "record", "-o", str(data), "--", str(accept.BUILD / "loadgen"),
             "-p", str(port), "-c", str(args.concurrency), "-n", str(args.n), "-t", "10", "-T", "5000",
             "-e", "hello\\n"], capture_output=True, text=True, timeout=60)
        line = dict(item.partition("=")[::2] for item in rec.stdout.split())
        hist = subprocess.run(["perf", "sched", "timehist", "--state", "-i", str(data)], capture_output=True,
                              text=True, timeout=120)
        slices, idle = parse_timehist(hist.stdout)
        if not slices:
            return f"### {name}\n\nskipped: perf sched gave nothing ({hist.stderr.strip()[:200]})\n"
        comm = Path(f"/proc/{proc.pid}/comm").read_text().strip()
        parts = attribute(slices, idle, proc.pid, comm, Path(program).name)
        lines = [f"### {name}", "",
                 f"{line.get('cps', '?')} conn/s, {line.get('completed', '?')} connections, "
                 f"{line.get('failed', '?')} failed.", "",
                 "| idle, % of the machine (steady part) | % |", "|---|---:|"]
        lines.append(f"| all idle | {parts.get('idle', 0):.2f} |")
        for k in ("child before exec", "spawner thread", "program", "load generator", "kernel and other"):
            lines.append(f"| while work waited elsewhere: {k} | {parts.get('waited: ' + k, 0):.2f} |")
        for k in ("a spawner held in vfork", "spawners asleep"):
            lines.append(f"| nothing runnable: {k} | {parts.get('nothing runnable: ' + k, 0):.2f} |")
        lines += ["", "| spawner thread | CPU ms | runnable, not running, ms | switches |", "|---|---:|---:|---:|"]
        for tid, cpu, delay, n in per_thread(slices, proc.pid):
            lines.append(f"| {tid}{' (main)' if tid == proc.pid else ''} | {cpu * 1e3:.1f} | {delay * 1e3:.1f} | {n} |")
        return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--contenders", default="sockvisor,tcpserver")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--n", type=int, default=6000)
    parser.add_argument("--sockvisor-cmd", default=f"{shlex.quote(sys.executable)} -m supervisor")
    args = parser.parse_args()
    if args.n > 20000 or not 1 <= args.concurrency <= 256:
        parser.error("keep it bounded: n <= 20000, concurrency 1-256")
    if shutil.which("perf") is None:
        print("perf is not installed (apt-get install linux-perf)", file=sys.stderr)
        return 1
    accept.build()
    cmd = shlex.split(args.sockvisor_cmd)
    starters = {"sockvisor": accept.sockvisor_starter(cmd, log_connections=False),
                "xinetd": accept.xinetd_starter, "tcpserver": accept.tcpserver_starter,
                "limit": accept.limit_starter}
    names = [n for n in args.contenders.split(",") if n]
    for n in names:
        if n not in starters:
            parser.error(f"unknown contender {n!r} (known: {', '.join(starters)})")
    for n in names:
        print(run(n, starters[n], args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
