#!/usr/bin/env python3
"""Per-connection ("inetd nowait") benchmark: sockvisor side by side with xinetd and tcpserver.

    python3 bench/accept.py                 # 3 repetitions, c=1 and c=32, table on stdout
    python3 bench/accept.py --reps 5 --contenders sockvisor,tcpserver
    python3 bench/accept.py --sockvisor-cmd "/path/to/venv/bin/sockvisor"
    python3 bench/accept.py --contenders sockvisor,tcpserver --baseline-cmd "/old/checkout/.venv/bin/sockvisor"
    (or "env PYTHONPATH=/old/checkout python -P -m supervisor": without -P the working directory,
    this checkout, comes first; the report names the _spawn each sockvisor loaded)

What it does, per repetition, for every contender in turn (the order rotates each
repetition so that the contenders are interleaved in time on a noisy machine):

  start the supervisor on a fresh loopback port, wait until a connect succeeds, read its
  idle VmRSS, check one connection returns "hello\\n", warm up, then for each concurrency
  (1 and 32) run ``bench/build/loadgen`` (a bounded single-thread epoll client: N
  connections, at most C at a time, each one: connect, read to EOF, verify) and read the
  supervisor's CPU time (utime+stime of every thread, /proc/PID/stat; and the
  nanosecond-exact sum of /proc/PID/task/*/schedstat) before and after; then stop it
  (SIGTERM, then SIGKILL), by pid only.

The service is ``bench/src/hello.c`` (static, writes "hello\\n" and exits), the cheapest
real program, so the supervisor's own cost shows. Everything is loopback; every load run
is bounded by a connection count and a time cap. Needs gcc; xinetd (package xinetd) and
tcpserver (package ucspi-tcp) are measured when installed and skipped otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SRC = HERE / "src"
BUILD = HERE / "build"
BACKLOG = 128
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# The physical limit (a C accept4 + posix_spawn loop, nothing else) lives with the shared peer
# benchmark; measured when that source is found, skipped otherwise.
MINISUP_SOURCES = (SRC / "minisup.c", REPO.parent / "shared" / "bench" / "src" / "minisup.c")


def build() -> None:
    BUILD.mkdir(exist_ok=True)
    jobs = [
        (["-static"], SRC / "hello.c", "hello"),
        ([], SRC / "loadgen.c", "loadgen"),
    ]
    if platform.machine() == "x86_64":  # its child's raw system calls are x86-64's
        jobs.append(([], SRC / "clonespawn.c", "clonespawn"))
    minisup = next((src for src in MINISUP_SOURCES if src.exists()), None)
    if minisup is not None:
        jobs.append((["-pthread"], minisup, "minisup"))
    for extra, src, name in jobs:
        out = BUILD / name
        if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
            continue
        subprocess.run(["gcc", "-O2", "-Wall", *extra, "-o", str(out), str(src)], check=True)


# ---------------------------------------------------------------- contenders
# Each starter gets (port, work dir, service argv) and returns the argv and cwd to run; the
# process it starts must be the supervisor itself (its pid is measured and signalled).

Starter = Callable[[int, Path, list[str]], list[str] | None]


def _scrape_every_second(port: int) -> None:
    """What a Prometheus server does: GET /metrics once a second, until the endpoint goes away."""
    import urllib.request

    time.sleep(1.0)  # the daemon is starting
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as res:
                res.read()
        except OSError:
            return
        time.sleep(1.0)


def sockvisor_starter(cmd: list[str], *, log_connections: bool, metrics: bool = False) -> Starter:
    def start(port: int, work: Path, service: list[str]) -> list[str]:
        conf = work / "conf"
        (conf / "sockets.d").mkdir(parents=True)
        extra = ""
        if metrics:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                mport = s.getsockname()[1]
            extra = f"metrics:\n  listen: 127.0.0.1:{mport}\n"
            threading.Thread(target=_scrape_every_second, args=(mport,), daemon=True).start()
        (conf / "sockvisor.yaml").write_text(
            f"control:\n  socket: {work}/control.sock\nlog:\n  format: json\n  level: info\n{extra}")
        (conf / "sockets.d" / "bench.yaml").write_text(
            f"listen:\n  - tcp: 127.0.0.1:{port}\n    backlog: {BACKLOG}\n"
            f"mode: accept\npass: stdio\nmax_connections: 10000\n"
            f"log_connections: {'true' if log_connections else 'false'}\n"
            f"exec: [{', '.join(service)}]\n")
        return [*cmd, "run", "--config", str(conf)]
    return start


def xinetd_starter(port: int, work: Path, service: list[str]) -> list[str] | None:
    binary = shutil.which("xinetd")
    if binary is None:
        return None
    (work / "xinetd.conf").write_text(
        "defaults\n{\n}\n"
        f"service bench{port}\n{{\n"
        f"    type = UNLISTED\n    id = bench{port}\n    socket_type = stream\n    protocol = tcp\n"
        f"    wait = no\n    user = root\n    bind = 127.0.0.1\n    port = {port}\n"
        f"    server = {service[0]}\n    instances = UNLIMITED\n    per_source = UNLIMITED\n"
        "    cps = 1000000 1\n    flags = NOLIBWRAP\n    log_on_success =\n    log_on_failure =\n}\n")
    return [binary, "-dontfork", "-f", str(work / "xinetd.conf"), "-filelog", str(work / "xinetd.log")]


def tcpserver_starter(port: int, work: Path, service: list[str]) -> list[str] | None:
    binary = shutil.which("tcpserver")
    if binary is None:
        return None
    return [binary, "-HRl0", "-c", "10000", "-b", str(BACKLOG), "127.0.0.1", str(port), *service]


def limit_starter(port: int, work: Path, service: list[str]) -> list[str] | None:
    binary = BUILD / "minisup"
    if not binary.exists():
        return None
    return [str(binary), "-p", str(port), "-b", str(BACKLOG), "-m", "spawn", "--", *service]


def clonespawn_starter(mode: str) -> Starter:
    def start(port: int, work: Path, service: list[str]) -> list[str] | None:
        if not (BUILD / "clonespawn").exists():
            return None
        return [str(BUILD / "clonespawn"), "-p", str(port), "-b", str(BACKLOG), "-m", mode, "--", *service]
    return start


DESCRIPTIONS = {
    "sockvisor": "sockvisor, mode: accept, pass: stdio, log_connections: false, max_connections: 10000",
    "sockvisor-log": "as sockvisor, with log_connections: true (2 JSON log lines per connection, to a file)",
    "sockvisor-metrics": "as sockvisor, with metrics.listen on and GET /metrics scraped once a second",
    "sockvisor-baseline": "as sockvisor, run by --baseline-cmd (another checkout: the before of a before/after)",
    "xinetd": "xinetd -dontfork; wait = no, instances/per_source UNLIMITED, cps 1000000, NOLIBWRAP, no logging",
    "tcpserver": "ucspi-tcp tcpserver -HRl0 -c 10000 -b 128 (no DNS, no ident)",
    "limit": "the physical limit: shared/bench/src/minisup.c -m spawn (accept4 + posix_spawn + waitpid, 1 thread)",
    "clone": "bench/src/clonespawn.c -m clone: accept4 + clone(CLONE_VM) without waiting for the exec (x86-64)",
    "clone-batch": "bench/src/clonespawn.c -m batch: every queued connection cloned at once, then waited for",
}


# ---------------------------------------------------------------- measuring

def cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (all threads), in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def cpu_ns(pid: int) -> int:
    """Run time of every thread of ``pid`` in nanoseconds (schedstat: exact, not tick-sampled)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine from /proc/stat (busy: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(fields) - fields[3] - fields[4], sum(fields)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def loaded_spawn_module(pid: int) -> str:
    """The path of the supervisor._spawn extension `pid` has mapped ('' if none): which checkout runs."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            path = line.split(maxsplit=5)[-1]
            if "/supervisor/_spawn" in path:
                return path
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def probe(port: int) -> bytes | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            data = b""
            while chunk := s.recv(64):
                data += chunk
            return data
    except OSError:
        return None


def loadgen(port: int, conc: int, n: int, tmax: float) -> dict[str, float]:
    res = subprocess.run([str(BUILD / "loadgen"), "-p", str(port), "-c", str(conc), "-n", str(n),
                          "-t", str(tmax), "-T", "5000", "-e", "hello\\n"],
                         capture_output=True, text=True, timeout=tmax + 20)
    out: dict[str, float] = {}
    for item in res.stdout.split():
        key, _, value = item.partition("=")
        with contextlib.suppress(ValueError):
            out[key] = float(value)
    return out


@dataclass
class Result:
    rss: list[int] = field(default_factory=list)
    cps: dict[int, list[float]] = field(default_factory=dict)
    p50: dict[int, list[float]] = field(default_factory=dict)
    p99: dict[int, list[float]] = field(default_factory=dict)
    cpu_stat: dict[int, list[float]] = field(default_factory=dict)  # us/conn from /proc/PID/stat
    cpu_exact: dict[int, list[float]] = field(default_factory=dict)  # us/conn from schedstat
    busy: dict[int, list[float]] = field(default_factory=dict)  # % of the whole machine busy during the run
    failed: int = 0
    skipped: str = ""
    spawn_module: str = ""  # the supervisor._spawn a sockvisor contender loaded (/proc/PID/maps)


class NotServing(Exception):
    """A contender that could not be measured: not installed, or it did not serve."""


@contextlib.contextmanager
def serving(name: str, starter: Starter) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Start a contender on a fresh loopback port with the `hello` service, wait until it serves,
    and yield (process, port); stop it after (SIGTERM, then SIGKILL), by pid only."""
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    keep = False  # a contender that did not serve leaves its out.log to read
    try:
        argv = starter(port, work, [str(BUILD / "hello")])
        if argv is None:
            raise NotServing("not installed")
        with open(work / "out.log", "wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=REPO,
                                    start_new_session=True)
        try:
            deadline = time.monotonic() + 15
            while probe(port) != b"hello\n":
                if proc.poll() is not None or time.monotonic() > deadline:
                    keep = True
                    raise NotServing(f"did not serve (see {work}/out.log)")
                time.sleep(0.05)
            yield proc, port
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def run_one(name: str, starter: Starter, args: argparse.Namespace, result: Result) -> None:
    try:
        with serving(name, starter) as (proc, port):
            measure(name, proc, port, args, result)
    except NotServing as why:
        result.skipped = str(why)


def measure(name: str, proc: subprocess.Popen[bytes], port: int, args: argparse.Namespace, result: Result) -> None:
    time.sleep(0.3)  # let start-up work (imports, first GC) settle before the idle RSS
    result.spawn_module = result.spawn_module or loaded_spawn_module(proc.pid)
    result.rss.append(rss_kib(proc.pid))
    loadgen(port, 8, args.warmup, 5)
    for conc in args.concurrency:
        n = args.n1 if conc == 1 else args.n
        t0, e0, m0 = cpu_ticks(proc.pid), cpu_ns(proc.pid), machine_ticks()
        line = loadgen(port, conc, n, args.tmax)
        t1, e1, m1 = cpu_ticks(proc.pid), cpu_ns(proc.pid), machine_ticks()
        done = max(int(line.get("completed", 0)), 1)
        result.cps.setdefault(conc, []).append(line.get("cps", 0.0))
        result.p50.setdefault(conc, []).append(line.get("p50_us", 0.0))
        result.p99.setdefault(conc, []).append(line.get("p99_us", 0.0))
        result.cpu_stat.setdefault(conc, []).append((t1 - t0) * 1e6 / CLK_TCK / done)
        result.cpu_exact.setdefault(conc, []).append((e1 - e0) / 1e3 / done)
        result.busy.setdefault(conc, []).append(100 * (m1[0] - m0[0]) / max(m1[1] - m0[1], 1))
        result.failed += int(line.get("failed", 0)) + max(n - int(line.get("completed", 0)), 0)
        log(f"{name} c={conc}: {line.get('cps', 0):.0f} conn/s, p50 {line.get('p50_us', 0) / 1000:.2f} ms, "
            f"supervisor CPU {(e1 - e0) / 1e3 / done:.1f} us/conn, busy {result.busy[conc][-1]:.0f} %, "
            f"failed {int(line.get('failed', 0))}")


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(results: dict[str, Result], args: argparse.Namespace) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    lines = [
        f"Machine: {os.cpu_count()} CPUs ({cpu}), kernel {os.uname().release}. "
        f"Service: bench/src/hello.c (static). Medians of {args.reps} interleaved repetitions; "
        f"{args.n1} connections at c=1, {args.n} at c>1, capped at {args.tmax:g} s per run; "
        "client: bench/build/loadgen on the same machine.",
        "",
    ]
    head = "| contender | idle RSS MiB |"
    sep = "|---|---:|"
    for c in args.concurrency:
        head += (f" c={c} conn/s | c={c} p50 ms | c={c} p99 ms | c={c} CPU us/conn (stat) |"
                 f" c={c} CPU us/conn (exact) | c={c} busy % |")
        sep += "---:|---:|---:|---:|---:|---:|"
    lines += [head + " failed |", sep + "---:|"]
    for name, r in results.items():
        if r.skipped and not r.rss:
            lines.append(f"| {name} | skipped: {r.skipped} |")
            continue
        row = f"| {name} | {med([x / 1024 for x in r.rss]):.1f} |"
        for c in args.concurrency:
            row += (f" {med(r.cps.get(c, [])):.0f} | {med(r.p50.get(c, [])) / 1000:.2f} |"
                    f" {med(r.p99.get(c, [])) / 1000:.2f} | {med(r.cpu_stat.get(c, [])):.0f} |"
                    f" {med(r.cpu_exact.get(c, [])):.0f} | {med(r.busy.get(c, [])):.0f} |")
        lines.append(row + f" {r.failed} |")
    ours = results.get("sockvisor")
    if ours is not None and ours.cps:
        lines += ["", "Ratios, sockvisor / peer (conn/s, same run; > 1 means sockvisor is faster):", ""]
        on = results.get("sockvisor-metrics")
        if on is not None and on.cps:
            parts = [f"c={c}: {med(on.cps[c]) / med(ours.cps[c]):.2f}x" for c in args.concurrency
                     if on.cps.get(c) and ours.cps.get(c)]
            lines.append("- metrics on / off (sockvisor-metrics / sockvisor): " + ", ".join(parts))
        for peer in ("sockvisor-baseline", "tcpserver", "xinetd", "limit", "clone", "clone-batch"):
            other = results.get(peer)
            if other is None or not other.cps:
                continue
            parts = [f"c={c}: {med(ours.cps[c]) / med(other.cps[c]):.2f}x" for c in args.concurrency
                     if other.cps.get(c) and ours.cps.get(c)]
            lines.append(f"- vs {peer}: " + ", ".join(parts))
    lines += ["", "Contenders:", ""]
    lines += [f"- **{name}**: {DESCRIPTIONS[name]}" + (f" (loaded {r.spawn_module})" if r.spawn_module else "")
              for name, r in results.items()]
    base = results.get("sockvisor-baseline")
    if ours is not None and base is not None and ours.spawn_module and ours.spawn_module == base.spawn_module:
        lines += ["", f"WARNING: sockvisor and sockvisor-baseline both loaded {ours.spawn_module}: the "
                      "baseline ran this checkout, not another one (python -m puts the working directory "
                      "first: use python -P, or the other checkout's own venv)."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    parser.add_argument("--n1", type=int, default=2000, help="connections per run at c=1")
    parser.add_argument("--n", type=int, default=3000, help="connections per run at c>1")
    parser.add_argument("--tmax", type=float, default=8.0, help="seconds: no new connection after this, per run")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--contenders", default="sockvisor,sockvisor-log,xinetd,tcpserver,limit")
    parser.add_argument("--sockvisor-cmd", default=f"{shlex.quote(sys.executable)} -m supervisor",
                        help="how to run the daemon (default: this Python, from the repo)")
    parser.add_argument("--baseline-cmd", default=None,
                        help="another sockvisor (e.g. an older checkout's venv) measured in the same run as "
                             "contender sockvisor-baseline, for a before/after ratio")
    args = parser.parse_args()
    if args.reps < 1 or args.reps > 20 or args.n > 20000 or args.n1 > 20000 or args.tmax > 30:
        parser.error("keep it bounded: reps 1-20, n/n1 <= 20000, tmax <= 30")

    build()
    cmd = shlex.split(args.sockvisor_cmd)
    starters: dict[str, Starter] = {
        "sockvisor": sockvisor_starter(cmd, log_connections=False),
        "sockvisor-log": sockvisor_starter(cmd, log_connections=True),
        "sockvisor-metrics": sockvisor_starter(cmd, log_connections=False, metrics=True),
        "xinetd": xinetd_starter,
        "tcpserver": tcpserver_starter,
        "limit": limit_starter,
        "clone": clonespawn_starter("clone"),
        "clone-batch": clonespawn_starter("batch"),
    }
    names = [n for n in args.contenders.split(",") if n]
    if args.baseline_cmd:
        starters["sockvisor-baseline"] = sockvisor_starter(shlex.split(args.baseline_cmd), log_connections=False)
        if "sockvisor-baseline" not in names:
            names.append("sockvisor-baseline")
    for n in names:
        if n not in starters:
            parser.error(f"unknown contender {n!r} (known: {', '.join(starters)})")
    results = {n: Result() for n in names}
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            if results[name].skipped:
                continue
            log(f"rep {rep + 1}/{args.reps}: {name}")
            run_one(name, starters[name], args, results[name])
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
