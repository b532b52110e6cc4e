#!/usr/bin/env python3
"""Proxy benchmark: sockvisor's mode: proxy side by side with a direct connection, systemd-socket-proxyd and socat.

    python3 bench/proxy.py                   # 5 interleaved repetitions, table on stdout
    python3 bench/proxy.py --reps 5 --bytes 1073741824 --seconds 3
    python3 bench/proxy.py --sockvisor-cmd "/path/to/venv/bin/sockvisor"
    python3 bench/proxy.py --baseline-cmd "env PYTHONPATH=/tmp/old /path/to/python -m supervisor"
                                             # also an older sockvisor (contender "baseline"), same run

What it measures, per repetition, for every contender in turn (the order rotates each
repetition, so the contenders are interleaved in time on a noisy machine):

- bulk: one connection carries ``--bytes`` (1 GiB) to a backend that counts them and
  answers (``bench/src/benchsrv.c count``; no half-close needed, systemd-socket-proxyd
  passes none on); MiB/s, and the proxy's CPU seconds per GiB (utime+stime of the proxy
  process and its reaped children, /proc/PID/stat);
- request rate: 64-byte request/response over 1 and 64 connections for ``--seconds``
  (``benchsrv echo``); requests/s and the proxy's CPU per request;
- cold start (sockvisor only, with ``exec`` and the backend down: connect to first byte,
  backend started on demand); and, for comparison, the backend's own start (spawn, first
  connect that succeeds, first byte) and what the others do with the backend down.

Clients and backends are C (``bench/src/proxyload.c``, ``benchsrv.c``), single-threaded,
bounded by bytes, requests and time. Everything is loopback. systemd-socket-proxyd runs
under systemd-socket-activate (it needs a passed socket); socat forks per connection.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SRC = HERE / "src"
BUILD = HERE / "build"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXYD = next((p for p in ("/lib/systemd/systemd-socket-proxyd", "/usr/lib/systemd/systemd-socket-proxyd")
               if os.path.exists(p)), None)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def build() -> None:
    BUILD.mkdir(exist_ok=True)
    for name in ("benchsrv", "proxyload"):
        out, src = BUILD / name, SRC / f"{name}.c"
        if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
            continue
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(src)], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def wait_control(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX) as s:
            if s.connect_ex(str(path)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"the daemon's control socket {path} does not answer")


def cpu_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime: the process, its threads and its reaped children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15])


def _children(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return any((t / "children").read_text().strip() for t in Path(f"/proc/{pid}/task").iterdir())
    return False


def load(*args: str, timeout: float = 120) -> list[str]:
    out = subprocess.run([str(BUILD / "proxyload"), *args], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"proxyload {' '.join(args)}: {out.stdout.strip()} {out.stderr.strip()}")
    return out.stdout.split()


@dataclass
class Contender:
    name: str
    description: str
    bulk_port: int = 0
    rr_port: int = 0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)  # whose CPU is the proxy's
    mib_s: list[float] = field(default_factory=list)
    cpu_gib: list[float] = field(default_factory=list)
    rr: dict[int, list[float]] = field(default_factory=lambda: {1: [], 64: []})
    rr_cpu: dict[int, list[float]] = field(default_factory=lambda: {1: [], 64: []})
    skipped: str = ""

    def cpu(self) -> int:
        """The proxy's CPU ticks so far; waits (2 s at most) until per-connection children are reaped (socat)."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(_children(p) for p in self.pids):
            time.sleep(0.01)
        return sum(cpu_ticks(p) for p in self.pids)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def start_sockvisor(c: Contender, cmd: list[str], work: Path, back_bulk: int, back_rr: int) -> None:
    conf = work / c.name
    (conf / "sockets.d").mkdir(parents=True)
    (conf / "sockvisor.yaml").write_text(f"control:\n  socket: {conf}/control.sock\nlog:\n  level: warning\n")
    c.bulk_port, c.rr_port = free_port(), free_port()
    for name, port, back in (("bulk", c.bulk_port, back_bulk), ("rr", c.rr_port, back_rr)):
        (conf / "sockets.d" / f"{name}.yaml").write_text(
            f"mode: proxy\nlisten: [{{tcp: 127.0.0.1:{port}}}]\nbackend: 127.0.0.1:{back}\n"
            "log_connections: false\nmax_connections: 10000\n")
    with open(work / f"{c.name}.log", "wb") as err:  # Popen keeps its own copy
        p = subprocess.Popen([*cmd, "run", "--config", str(conf)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=err)
    c.procs, c.pids = [p], [p.pid]


def start_proxyd(c: Contender, work: Path, back_bulk: int, back_rr: int) -> None:
    activate = shutil.which("systemd-socket-activate")
    if PROXYD is None or activate is None:
        c.skipped = "systemd-socket-proxyd or systemd-socket-activate not installed (package systemd)"
        return
    c.bulk_port, c.rr_port = free_port(), free_port()
    for port, back in ((c.bulk_port, back_bulk), (c.rr_port, back_rr)):
        p = subprocess.Popen([activate, "-l", f"127.0.0.1:{port}", PROXYD, f"127.0.0.1:{back}"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        c.procs.append(p)
        c.pids.append(p.pid)  # systemd-socket-activate execs the proxy in place: same pid


def start_socat(c: Contender, work: Path, back_bulk: int, back_rr: int) -> None:
    socat = shutil.which("socat")
    if socat is None:
        c.skipped = "socat not installed (package socat)"
        return
    c.bulk_port, c.rr_port = free_port(), free_port()
    for port, back in ((c.bulk_port, back_bulk), (c.rr_port, back_rr)):
        p = subprocess.Popen([socat, f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=1024",
                              f"TCP:127.0.0.1:{back},nodelay"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        c.procs.append(p)
        c.pids.append(p.pid)


def measure(c: Contender, args: argparse.Namespace) -> None:
    seconds, nbytes = float(args.seconds), int(args.bytes)
    before = c.cpu()
    took, confirmed = load("bulk", str(c.bulk_port), str(nbytes))
    if int(confirmed) != nbytes:
        raise RuntimeError(f"{c.name}: bulk confirmed {confirmed} of {nbytes} bytes")
    used = (c.cpu() - before) / CLK_TCK
    c.mib_s.append(nbytes / float(took) / (1 << 20))
    c.cpu_gib.append(used / (nbytes / (1 << 30)))
    for conc in (1, 64):
        before = c.cpu()
        requests, took, errors = load("rr", str(c.rr_port), str(conc), "64", str(seconds))
        if int(errors):
            raise RuntimeError(f"{c.name}: {errors} errors at {conc} clients")
        used = (c.cpu() - before) / CLK_TCK
        c.rr[conc].append(int(requests) / float(took))
        c.rr_cpu[conc].append(used / int(requests) * 1e6)


def cold_starts(cmd: list[str], work: Path, reps: int) -> tuple[list[float], list[float], str]:
    """sockvisor with exec and the backend down: connect to first byte; the backend's own start; proxyd's answer."""
    sv: list[float] = []
    own: list[float] = []
    for i in range(reps):
        back = free_port()
        t0 = time.monotonic()
        p = subprocess.Popen([str(BUILD / "benchsrv"), str(back), "echo"])
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", back)) == 0:
                    s.sendall(b"x")
                    s.recv(1)
                    break
            time.sleep(0.0005)
        own.append(time.monotonic() - t0)
        p.kill()
        p.wait()
        conf = work / f"cold{i}"
        (conf / "sockets.d").mkdir(parents=True)
        (conf / "sockvisor.yaml").write_text(f"control:\n  socket: {conf}/control.sock\nlog:\n  level: warning\n")
        port = free_port()
        (conf / "sockets.d" / "cold.yaml").write_text(
            f"mode: proxy\nlisten: [{{tcp: 127.0.0.1:{port}}}]\nbackend: 127.0.0.1:{back}\n"
            f"exec: [{BUILD / 'benchsrv'}, '{back}', echo]\nlog_connections: false\n")
        with open(conf / "log", "wb") as err:
            d = subprocess.Popen([*cmd, "run", "--config", str(conf)], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_control(conf / "control.sock")  # ready (a connect to the port would start the backend)
            sv.append(float(load("first", str(port), "20")[0]))
        finally:
            d.send_signal(signal.SIGTERM)
            d.wait(30)
    answer = "not measured (systemd-socket-proxyd not installed)"
    activate = shutil.which("systemd-socket-activate")
    if PROXYD is not None and activate is not None:
        port, back = free_port(), free_port()
        p = subprocess.Popen([activate, "-l", f"127.0.0.1:{port}", PROXYD, f"127.0.0.1:{back}"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port)
            time.sleep(0.3)
            out = subprocess.run([str(BUILD / "proxyload"), "first", str(port), "5"], capture_output=True, text=True)
            answer = out.stdout.strip() or out.stderr.strip()
        finally:
            p.kill()
            p.wait()
    return sv, own, answer


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--bytes", type=int, default=1 << 30)
    parser.add_argument("--seconds", type=float, default=3.0, help="per request-rate run")
    parser.add_argument("--contenders", default="direct,sockvisor,systemd-socket-proxyd,socat")
    venv = REPO / ".venv" / "bin" / "python"
    python = str(venv) if venv.exists() else sys.executable  # the checkout's own venv (scripts/test.sh makes it)
    parser.add_argument("--sockvisor-cmd", default=f"{shlex.quote(python)} -m supervisor")
    parser.add_argument("--baseline-cmd", help="another sockvisor (an older checkout) to run as contender 'baseline'")
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args()
    build()
    cmd = shlex.split(args.sockvisor_cmd)
    work = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    back_bulk, back_rr = free_port(), free_port()
    backends = [subprocess.Popen([str(BUILD / "benchsrv"), str(back_bulk), "count"]),
                subprocess.Popen([str(BUILD / "benchsrv"), str(back_rr), "echo"])]
    descriptions = {
        "direct": "the client connects to the backend itself",
        "sockvisor": "sockvisor mode: proxy, no exec (a forwarder), log_connections: false",
        "baseline": f"the same, run by --baseline-cmd {args.baseline_cmd}",
        "systemd-socket-proxyd": "systemd-socket-proxyd under systemd-socket-activate (C, splice)",
        "socat": "socat TCP-LISTEN:...,fork TCP:... (a process per connection)",
    }
    names = [n for n in args.contenders.split(",") if n]
    if args.baseline_cmd:
        names.insert(names.index("sockvisor") + 1 if "sockvisor" in names else len(names), "baseline")
    contenders = [Contender(n, descriptions.get(n, n)) for n in names]
    try:
        wait_port(back_bulk)
        wait_port(back_rr)
        for c in contenders:
            if c.name == "direct":
                c.bulk_port, c.rr_port = back_bulk, back_rr
            elif c.name == "sockvisor":
                start_sockvisor(c, cmd, work, back_bulk, back_rr)
            elif c.name == "baseline":
                start_sockvisor(c, shlex.split(args.baseline_cmd), work, back_bulk, back_rr)
            elif c.name == "systemd-socket-proxyd":
                start_proxyd(c, work, back_bulk, back_rr)
            elif c.name == "socat":
                start_socat(c, work, back_bulk, back_rr)
            if not c.skipped and c.name != "direct":
                wait_port(c.bulk_port)
                wait_port(c.rr_port)
                load("rr", str(c.rr_port), "4", "64", "0.3")  # warm up (proxyd starts on the first connection)
        live = [c for c in contenders if not c.skipped]
        for rep in range(args.reps):
            order = live[rep % len(live):] + live[:rep % len(live)]
            for c in order:
                log(f"rep {rep + 1}/{args.reps}: {c.name}")
                measure(c, args)
        cold = cold_starts(cmd, work, args.reps) if "sockvisor" in names else None
    finally:
        for c in contenders:
            c.stop()
        for p in backends:
            p.kill()
            p.wait()
    print(report(contenders, args, cold))
    if args.json:
        Path(args.json).write_text(json.dumps({c.name: {"mib_s": c.mib_s, "cpu_s_per_gib": c.cpu_gib,
                                                        "rr": c.rr, "rr_cpu_us": c.rr_cpu} for c in contenders}))
    return 0


def ratios(ours: list[float], theirs: list[float]) -> str:
    """The ratio of the medians, and the median of the per-repetition ratios."""
    paired = [a / b for a, b in zip(ours, theirs, strict=True) if b]
    return f"{med(ours) / med(theirs):.2f}x ({med(paired):.2f}x)"


def report(contenders: list[Contender], args: argparse.Namespace,
           cold: tuple[list[float], list[float], str] | None) -> str:
    cpus = os.cpu_count()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    lines = [f"Machine: {cpus} CPUs ({model}), kernel {os.uname().release}. Medians of {args.reps} interleaved "
             f"repetitions; bulk {args.bytes / (1 << 30):g} GiB through one connection; 64-byte request/response "
             f"for {args.seconds:g} s per run. Clients and backends: bench/src/proxyload.c, benchsrv.c.", "",
             "| contender | bulk MiB/s | CPU s/GiB | req/s c=1 | CPU us/req c=1 | req/s c=64 | CPU us/req c=64 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for c in contenders:
        if c.skipped:
            lines.append(f"| {c.name} | skipped: {c.skipped} |")
            continue
        cpu = (lambda v: "-") if c.name == "direct" else (lambda v: f"{v:.2f}")
        us = (lambda v: "-") if c.name == "direct" else (lambda v: f"{v:.1f}")
        lines.append(f"| {c.name} | {med(c.mib_s):.0f} | {cpu(med(c.cpu_gib))} | {med(c.rr[1]):.0f} | "
                     f"{us(med(c.rr_cpu[1]))} | {med(c.rr[64]):.0f} | {us(med(c.rr_cpu[64]))} |")
    by = {c.name: c for c in contenders if not c.skipped}
    sv = by.get("sockvisor")
    if sv is not None:
        lines += ["", "Ratios, sockvisor / peer (same run; > 1 means sockvisor is faster): of the medians, and in "
                  "brackets the median of the ratios within each repetition (the contenders ran next to each "
                  "other then, so load from elsewhere on the machine cancels out better):", ""]
        for peer in ("systemd-socket-proxyd", "socat", "direct", "baseline"):
            p = by.get(peer)
            if p is None:
                continue
            lines.append(f"- vs {peer}: bulk {ratios(sv.mib_s, p.mib_s)}, c=1 {ratios(sv.rr[1], p.rr[1])}, "
                         f"c=64 {ratios(sv.rr[64], p.rr[64])}")
    if cold is not None:
        sv_cold, own, answer = cold
        lines += ["", "Cold start (backend down; connect to first byte):", "",
                  f"- sockvisor, backend started on demand: median {med(sv_cold) * 1000:.1f} ms "
                  f"(runs: {', '.join(f'{v * 1000:.1f}' for v in sv_cold)} ms)",
                  f"- the backend's own start (spawn to first byte, no proxy): median {med(own) * 1000:.1f} ms",
                  f"- systemd-socket-proxyd with the backend down: {answer}"]
    lines += ["", "Contenders:", ""] + [f"- **{c.name}**: {c.description}" for c in contenders]
    return "\n".join(lines)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
