"""Shared fixtures: free loopback ports, short unix paths, the real daemon as a subprocess, and
in-process scenarios on uvloop (``run_on_uvloop``, with ``sigchld_restored``).

``sockvisor`` runs the real daemon (``python -m supervisor run``) on a
temporary config directory and collects its JSON log lines on a thread, so
tests wait on events (``wait_event("child_exited", unit="web")``) instead of
sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import uvloop

REPO = Path(__file__).resolve().parent.parent
PROGRAMS = REPO / "tests" / "programs"


@pytest.fixture
def sigchld_restored() -> Iterator[None]:
    """An in-process Reaper blocks SIGCHLD in this thread (for its signalfd): give pytest its mask
    back, and structlog its defaults (capture_logs reconfigures it)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    structlog.reset_defaults()
    yield
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    structlog.reset_defaults()


def run_on_uvloop(coro: Any) -> Any:
    """Run an in-process scenario on a fresh uvloop, bounded at 20 s."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(coro, 20))


def free_port(kind: int = socket.SOCK_STREAM, family: int = socket.AF_INET) -> int:
    """A port that was free a moment ago on loopback."""
    with socket.socket(family, kind) as s:
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory (unix socket paths must fit in 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="sv-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)  # wait-ok: bounded back-off inside a readiness wait
        delay = min(delay * 2, 0.05)


def connect(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s


def read_to_eof(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def roundtrip(port: int, data: bytes = b"", host: str = "127.0.0.1", timeout: float = 10.0) -> bytes:
    """Connect, send ``data``, half-close, read until EOF."""
    with connect(port, host, timeout) as s:
        if data:
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return read_to_eof(s)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def first_line(port: int) -> str:
    """Connect and read the first line the server sends."""
    with connect(port) as s, s.makefile("r") as reader:
        return reader.readline().strip()


class Sockvisor:
    """A running daemon on a temporary config; ``events`` are its parsed log lines."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "conf"
        (self.config / "sockets.d").mkdir(parents=True, exist_ok=True)
        self.control = root / "control.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self.leaked: list[str] = []  # processes stop() found holding the daemon's stderr after it exited
        self.write_main()

    def write_main(self, extra: str = "") -> None:
        (self.config / "sockvisor.yaml").write_text(
            f"control:\n  socket: {self.control}\nlog:\n  format: json\n  level: debug\n{extra}"
        )

    def unit(self, name: str, text: str) -> Path:
        path = self.config / "sockets.d" / f"{name}.yaml"
        path.write_text(textwrap.dedent(text))
        return path

    def remove_unit(self, name: str) -> None:
        (self.config / "sockets.d" / f"{name}.yaml").unlink()

    def cli(self, *args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "supervisor", *args]
        if args and args[0] in ("status", "start", "stop", "restart", "reload", "reexec"):
            cmd += ["--control", str(self.control)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"{cmd} exited {res.returncode}: {res.stderr}")
        return res

    def start(self, *extra: str, env: dict[str, str] | None = None, wait: bool = True,
              pass_fds: tuple[int, ...] = (), argv: list[str] | None = None) -> Sockvisor:
        cmd = argv or [sys.executable, "-m", "supervisor", "run", "--config", str(self.config), *extra]
        full_env = dict(os.environ)
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=full_env, pass_fds=pass_fds)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait:
            self.wait_event("daemon_ready", timeout=30)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "_raw", "line": line}
            with self._cond:
                self.raw.append(line)
                if isinstance(event, dict):
                    self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def find(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e.get("event") == name
                    and all(e.get(k) == v for k, v in fields.items())]

    def wait_event(self, name: str, timeout: float = 15.0, count: int = 1, **fields: Any) -> dict[str, Any]:
        """Block until the ``count``-th log event ``name`` with ``fields`` appears."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self.events if e.get("event") == name
                         and all(e.get(k) == v for k, v in fields.items())]
                if len(found) >= count:
                    return found[count - 1]
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self.proc.poll() is not None and not found):
                    tail = "\n".join(self.raw[-30:])
                    raise AssertionError(f"no event {name} {fields} (x{count}) within {timeout}s; log tail:\n{tail}")
                self._cond.wait(min(left, 0.5))

    def status(self, name: str | None = None) -> dict[str, Any]:
        args = ["status", "--json"] + ([name] if name else [])
        res = self.cli(*args, check=True)
        return json.loads(res.stdout)  # type: ignore[no-any-return]

    def unit_status(self, name: str) -> dict[str, Any]:
        return self.status(name)["units"][0]  # type: ignore[no-any-return]

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(10)  # the last lines; children the daemon killed may still be exiting
        if self._reader.is_alive() and self.proc.stderr is not None:
            # Something the daemon started outlived it and holds its stderr (a grandchild that
            # escaped its unit, say): the reader would wait for it, and closing the pipe under
            # the reader blocks for as long (uninterruptibly: no test timeout ends that). Kill it
            # and let the fixture fail the test with who it was.
            holders = pipe_holders(self.proc.stderr.fileno())
            self.leaked += [f"{pid} ({_comm(pid)})" for pid in holders]
            for pid in holders:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._reader.join(10)
        if self.proc.stderr is not None and not self._reader.is_alive():
            self.proc.stderr.close()
        return code


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def pipe_holders(fd: int) -> list[int]:
    """The processes other than this one that have the pipe of ``fd`` open (its write end, here)."""
    target = os.readlink(f"/proc/self/fd/{fd}")
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        with contextlib.suppress(OSError):
            for n in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{n}") == target:
                        found.append(int(entry))
                        break
    return found


@pytest.fixture
def sockvisor(short_tmp: Path) -> Iterator[Sockvisor]:
    sv = Sockvisor(short_tmp)
    try:
        yield sv
    finally:
        with contextlib.suppress(Exception):
            sv.stop()
    if sv.leaked:
        pytest.fail(f"processes outlived the daemon holding its stderr (killed): {', '.join(sv.leaked)}")
