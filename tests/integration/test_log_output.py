"""The daemon's stderr is shared with its children: nothing they or a slow reader do blocks it or loses its lines.

Attacks from issue 9 item 4: (a) a chatty child fills the pipe and the reader
stops reading: the daemon must keep answering status and serving other units;
(b) a child sets ``O_NONBLOCK`` on the shared description and exits: every
later daemon line must still arrive.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import connect, free_port, wait_for

PY = sys.executable
CONNECTIONS = 200


def _start(config: Path, stderr_fd: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config", str(config)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr_fd, env=env)


def _config(root: Path, units: dict[str, str]) -> Path:
    conf = root / "conf"
    (conf / "sockets.d").mkdir(parents=True)
    (conf / "sockvisor.yaml").write_text(
        f"control:\n  socket: {root}/control.sock\nlog:\n  format: json\n  level: debug\n")
    for name, text in units.items():
        (conf / "sockets.d" / f"{name}.yaml").write_text(text)
    return conf


def _status(root: Path) -> tuple[float, dict]:
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "supervisor", "status", "--json", "--control",
                          f"{root}/control.sock"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return time.monotonic() - t0, json.loads(res.stdout)


def _serve(port: int) -> None:
    with connect(port) as c:
        c.settimeout(10)
        assert c.recv(16) == b"hi\n"


def _read_all(fd: int, until: bytes, timeout: float = 30.0) -> bytes:
    """Read the pipe until ``until`` has been seen and the writer is gone (bounded by ``timeout``)."""
    out = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([fd], [], [], 0.5)[0]:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        out += chunk
    assert until in out, out[-2000:]
    return bytes(out)


def _events(raw: bytes) -> list[dict]:
    """The daemon's JSON lines. Each is one atomic write (< PIPE_BUF), but a child's larger writes
    may be split around it, so a line can start in the middle of the child's text."""
    out = []
    for line in raw.decode(errors="replace").splitlines():
        at = line.find('{"')
        if at >= 0:
            out.append(json.loads(line[at:]))
    return out


def test_slow_reader_and_chatty_child_never_block_the_daemon(tmp_path: Path) -> None:
    """Pipe full and unread: status stays fast, another unit serves, drops are counted once the reader returns."""
    port = free_port()
    conf = _config(tmp_path, {
        # Inherits the daemon's stderr and writes to it until the pipe is full (then it blocks, not us).
        "chatty": f"listen: [{{tcp: '127.0.0.1:{free_port()}'}}]\nstart: eager\n"
                  "exec: [/bin/sh, -c, 'yes chatty-child-output-line >&2']\n",
        "other": f"listen: [{{tcp: '127.0.0.1:{port}'}}]\nmode: accept\nexec: [/bin/echo, hi]\n",
    })
    rfd, wfd = os.pipe()
    proc = _start(conf, wfd)
    os.close(wfd)
    try:
        wait_for(lambda: (tmp_path / "control.sock").exists(), timeout=30, what="the control socket")
        # Nobody reads the pipe: the child fills it; the daemon's lines queue (and then drop).
        slowest = 0.0
        for i in range(CONNECTIONS):
            _serve(port)
            if i % 20 == 0:
                took, st = _status(tmp_path)
                slowest = max(slowest, took)
        took, st = _status(tmp_path)
        slowest = max(slowest, took)
        other = next(u for u in st["units"] if u["name"] == "other")
        assert other["connections"]["accepted"] == CONNECTIONS
        assert slowest < 2.0, f"status took {slowest:.2f}s while the log pipe was full"
        # Make the daemon's own log exceed its queue, then let the reader catch up.
        for _ in range(8):
            _status(tmp_path)
        subprocess.run(["pkill", "-f", "chatty-child-output-line"], check=False)
        proc.terminate()
        raw = _read_all(rfd, b'"daemon_stopped"')
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(rfd)
    events = _events(raw)
    names = [e["event"] for e in events]
    assert "daemon_ready" in names and names[-1] == "daemon_stopped", names[-5:]
    exited = sum(1 for e in events if e["event"] == "child_exited" and e.get("unit") == "other")
    dropped = sum(e["count"] for e in events if e["event"] == "log_lines_dropped")
    # Every line is either delivered or counted: nothing vanishes silently.
    accepted = sum(1 for e in events if e["event"] == "connection_accepted" and e.get("unit") == "other")
    print(f"slow reader: status max {slowest:.3f}s, child_exited delivered {exited}/{CONNECTIONS}, "
          f"connection_accepted {accepted}, dropped {dropped}")
    assert exited + accepted + dropped >= 2 * CONNECTIONS


def test_child_setting_o_nonblock_on_shared_stderr_loses_no_daemon_line(tmp_path: Path) -> None:
    """A child sets O_NONBLOCK on fd 2 and exits; the reader pauses; every later daemon line still arrives."""
    port = free_port()
    conf = _config(tmp_path, {
        "nb": f"listen: [{{tcp: '127.0.0.1:{free_port()}'}}]\nstart: eager\nrestart: never\n"
              f"exec: [{PY}, -c, 'import os; os.set_blocking(2, False)']\n",
        "other": f"listen: [{{tcp: '127.0.0.1:{port}'}}]\nmode: accept\nexec: [/bin/echo, hi]\n",
    })
    rfd, wfd = os.pipe()
    proc = _start(conf, wfd)
    os.close(wfd)
    got = bytearray()
    reading = threading.Event()
    reading.set()
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            if not reading.wait(0.2):
                continue
            if select.select([rfd], [], [], 0.2)[0]:
                chunk = os.read(rfd, 1 << 16)
                if not chunk:
                    return
                got.extend(chunk)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        wait_for(lambda: b'"child_exited"' in got and b'"nb"' in got, timeout=30, what="the O_NONBLOCK child's exit")
        assert os.get_blocking(rfd)  # the read end is ours; the write end's flag is what the child changed
        reading.clear()  # the pipe fills: with a shared non-blocking description the daemon's writes would fail
        for _ in range(CONNECTIONS):
            _serve(port)
        reading.set()
        proc.terminate()
        assert proc.wait(30) == 0
        wait_for(lambda: b'"daemon_stopped"' in got, timeout=30, what="the last line")
    finally:
        done.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        t.join(5)
        os.close(rfd)
    events = _events(bytes(got))
    other = [e for e in events if e.get("unit") == "other"]
    assert sum(1 for e in other if e["event"] == "connection_accepted") == CONNECTIONS
    assert sum(1 for e in other if e["event"] == "child_exited") == CONNECTIONS
    assert not [e for e in events if e["event"] == "log_lines_dropped"]


def test_daemon_lines_survive_a_socket_stderr(tmp_path: Path) -> None:
    """stderr a stream socket (journald's case): lines arrive through send(MSG_DONTWAIT)."""
    port = free_port()
    conf = _config(tmp_path, {"other": f"listen: [{{tcp: '127.0.0.1:{port}'}}]\nmode: accept\nexec: [/bin/echo, hi]\n"})
    ours, theirs = socket.socketpair()
    proc = _start(conf, theirs.fileno())
    theirs.close()
    try:
        wait_for(lambda: (tmp_path / "control.sock").exists(), timeout=30, what="the control socket")
        _serve(port)
        proc.terminate()
        raw = _read_all(ours.fileno(), b'"daemon_stopped"')
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ours.close()
    names = [e["event"] for e in _events(raw)]
    assert "connection_accepted" in names and names[-1] == "daemon_stopped"
