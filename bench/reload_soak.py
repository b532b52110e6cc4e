#!/usr/bin/env python3
"""Reload soak: many reloads while a client hammers an unchanged accept-mode unit; no connection may fail.

Runs the real daemon (``python -m supervisor run``) on a temporary config with
an accept-mode ``hello`` unit (``/bin/echo hello`` per connection). A client
thread makes sequential connections to it (connect, half-close, read "hello")
for the whole run, while the main thread performs ``--reloads`` reloads
through the control socket, cycling through:

  add a unit (new listener) | add a listener to it | retune that listener
  (backlog, buffer) | remove it | invalid config (must be refused) | fix it
  | change the process settings of a second unit | remove the second unit

Before each reload it waits until the client has completed a few more
exchanges (``--between``, default 10), so every reload overlaps real traffic. At the end it prints the
counts and checks that ``hello``'s listening socket is the very same inode it
started with (never closed, never re-bound).

Usage (from the repository root)::

    python3 bench/reload_soak.py             # 50 reloads
    python3 bench/reload_soak.py --reloads 200 --json

Exit status: 0 when no connection failed and every reload answered as
expected, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from supervisor import control  # noqa: E402  (after the path tweak: runnable without installing)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listen_inode(port: int) -> int | None:
    """The inode of the TCP socket listening on ``port`` (/proc/net/tcp)."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            cols = line.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                return int(cols[9])
    return None


def held_by(pid: int, inode: int) -> bool:
    """Whether ``pid`` holds the socket ``inode`` in one of its fds."""
    want = f"socket:[{inode}]"
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == want:
                return True
        except FileNotFoundError:
            continue
    return False


class Load:
    """Sequential connections on a thread until stopped; counts ok and failed exchanges."""

    def __init__(self, port: int, expect: bytes) -> None:
        self.port, self.expect = port, expect
        self.ok = self.failed = 0
        self.failures: list[str] = []
        self.latency_max = 0.0
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                    s.shutdown(socket.SHUT_WR)
                    data = b""
                    while chunk := s.recv(4096):
                        data += chunk
                good = data == self.expect
                why = f"reply {data!r}"
            except OSError as exc:
                good, why = False, repr(exc)
            with self._progress:
                if good:
                    self.ok += 1
                    self.latency_max = max(self.latency_max, time.monotonic() - t0)
                else:
                    self.failed += 1
                    self.failures.append(why)
                self._progress.notify_all()

    def wait_more(self, n: int, timeout: float = 15.0) -> bool:
        with self._progress:
            target = self.ok + self.failed + n
            return self._progress.wait_for(lambda: self.ok + self.failed >= target, timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


class Daemon:
    def __init__(self, root: Path) -> None:
        self.conf = root / "conf"
        (self.conf / "sockets.d").mkdir(parents=True)
        self.control = str(root / "control.sock")
        (self.conf / "sockvisor.yaml").write_text(
            f"control:\n  socket: {self.control}\nlog:\n  format: json\n  level: warning\n")
        self.log = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def unit(self, name: str, text: str) -> None:
        (self.conf / "sockets.d" / f"{name}.yaml").write_text(textwrap.dedent(text))

    def drop(self, name: str) -> None:
        (self.conf / "sockets.d" / f"{name}.yaml").unlink(missing_ok=True)

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config", str(self.conf)],
                                         cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=log)
        deadline = time.monotonic() + 30
        while True:  # ready when the control socket answers
            try:
                control.request(self.control, {"cmd": "status"}, timeout=5)
                return
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.02)  # wait-ok: start-up readiness probe with a deadline

    def reload(self) -> dict[str, Any]:
        return control.request(self.control, {"cmd": "reload"})

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def accept_unit(port: int, text: str, extra_listen: str = "") -> str:
    return f"""
        listen:
          - tcp: "127.0.0.1:{port}"{extra_listen}
        mode: accept
        exec: [/bin/echo, {text}]
    """


def soak(reloads: int, between: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="sv-soak-", dir="/tmp"))
    daemon = Daemon(root)
    port = free_port()
    daemon.unit("hello", accept_unit(port, "hello"))
    daemon.unit("second", accept_unit(free_port(), "one"))
    daemon.start()
    assert daemon.proc is not None
    inode = listen_inode(port)
    assert inode is not None and held_by(daemon.proc.pid, inode)

    extra_port = free_port()
    two = f"""
        listen:
          - tcp: "127.0.0.1:{extra_port}"
          - tcp: "127.0.0.1:{{p2}}"{{opts}}
        mode: accept
        exec: [/bin/echo, extra]
    """
    p2 = free_port()
    steps: list[tuple[str, Any, bool]] = [
        ("add unit", lambda: daemon.unit("extra", accept_unit(extra_port, "extra")), True),
        ("add listener", lambda: daemon.unit("extra", two.format(p2=p2, opts="")), True),
        ("retune listener", lambda: daemon.unit(
            "extra", two.format(p2=p2, opts="\n            backlog: 64\n            receive_buffer: 128K")), True),
        ("remove unit", lambda: daemon.drop("extra"), True),
        ("invalid config", lambda: daemon.unit("broken", "listen: [{tcp: '127.0.0.1:99999'}]\nexec: [x]\n"), False),
        ("fix config", lambda: daemon.drop("broken"), True),
        ("change process", lambda: daemon.unit("second", accept_unit(free_port(), f"t{time.monotonic_ns()}")),
         True),
        ("remove second", lambda: daemon.drop("second"), True),
        ("re-add second", lambda: daemon.unit("second", accept_unit(free_port(), "one")), True),
    ]
    load = Load(port, b"hello\n").start()
    unexpected: list[str] = []
    durations: list[float] = []
    kinds: dict[str, int] = {}
    started = time.monotonic()
    try:
        for i in range(reloads):
            if not load.wait_more(between):
                unexpected.append(f"reload {i}: the load made no progress")
            name, change, want_ok = steps[i % len(steps)]
            change()
            t0 = time.monotonic()
            reply = daemon.reload()
            durations.append(time.monotonic() - t0)
            kinds[name] = kinds.get(name, 0) + 1
            if bool(reply.get("ok")) is not want_ok:
                unexpected.append(f"reload {i} ({name}): {reply}")
        load.wait_more(between)
    finally:
        load.stop()
        elapsed = time.monotonic() - started
        same_socket = listen_inode(port) == inode and held_by(daemon.proc.pid, inode)
        daemon.stop()
        errors = [line for line in daemon.log.read_text().splitlines()
                  if '"level": "error"' in line and '"reload_failed"' not in line]
        shutil.rmtree(root, ignore_errors=True)
    return {
        "reloads": reloads,
        "reloads_by_kind": kinds,
        "invalid_reloads_refused": kinds.get("invalid config", 0) - sum("invalid" in u for u in unexpected),
        "unexpected_reload_replies": unexpected,
        "connections_ok": load.ok,
        "connections_failed": load.failed,
        "failures": load.failures[:10],
        "listener_inode_unchanged": same_socket,
        "daemon_errors": errors[:10],
        "seconds": round(elapsed, 2),
        "reload_ms_median": round(sorted(durations)[len(durations) // 2] * 1000, 1) if durations else None,
        "reload_ms_max": round(max(durations) * 1000, 1) if durations else None,
        "connection_ms_max": round(load.latency_max * 1000, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--reloads", type=int, default=50)
    ap.add_argument("--between", type=int, default=10, metavar="N",
                    help="client exchanges to complete before each reload (default 10)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = ap.parse_args()
    result = soak(args.reloads, args.between)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"reloads: {result['reloads']} ({', '.join(f'{k} x{v}' for k, v in result['reloads_by_kind'].items())})")
        print(f"unexpected reload replies: {len(result['unexpected_reload_replies'])}")
        for line in result["unexpected_reload_replies"]:
            print(f"  {line}")
        print(f"connections: {result['connections_ok']} ok, {result['connections_failed']} failed")
        for line in result["failures"]:
            print(f"  {line}")
        print(f"listener inode unchanged: {result['listener_inode_unchanged']}")
        print(f"daemon errors (besides the expected reload_failed): {len(result['daemon_errors'])}")
        for line in result["daemon_errors"]:
            print(f"  {line}")
        print(f"reload latency: median {result['reload_ms_median']} ms, max {result['reload_ms_max']} ms; "
              f"slowest connection {result['connection_ms_max']} ms; {result['seconds']} s in all")
    good = (result["connections_failed"] == 0 and not result["unexpected_reload_replies"]
            and result["listener_inode_unchanged"] and not result["daemon_errors"])
    return 0 if good else 1


if __name__ == "__main__":
    raise SystemExit(main())
