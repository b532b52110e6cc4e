"""``sockvisor activate`` and ``sockvisor fds`` against the real ``systemd-socket-activate``.

Every comparison runs the same invocation under both tools (sequentially, on the same
addresses), lets a child program record what it was given (fds, flags, addresses, environment)
into a JSON file, and compares the two records after removing what legitimately differs (pids,
socket inode numbers, the client's ephemeral port).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
REAL = shutil.which("systemd-socket-activate")
DEADLINE = 20.0

# The child: describes every open fd and the LISTEN_* protocol into argv[1] as JSON, then says
# "done" on the connection it was given (inetd: stdout; --accept: fd 3) so the client can wait.
VIEW = r"""
import fcntl, json, os, socket, stat, sys
from supervisor import activation

def describe(fd):
    st = os.fstat(fd)
    d = {"cloexec": bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
         "nonblock": bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK),
         "mode": "sock" if stat.S_ISSOCK(st.st_mode) else "other"}
    if d["mode"] == "sock":
        s = socket.socket(fileno=fd)
        try:
            d.update(family=int(s.family), type=int(s.type), addr=repr(s.getsockname()),
                     listening=s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
            if s.family == socket.AF_INET6:
                d["v6only"] = s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        finally:
            s.detach()
    return d

fds = {}
for n in os.listdir("/proc/self/fd"):
    try:
        fds[int(n)] = describe(int(n))
    except OSError:
        pass  # the fd listdir() itself used, closed by now
env = dict(os.environ)
env.pop("LC_CTYPE", None)  # set by Python's own C-locale coercion, not by the tools
view = {"pid": os.getpid(), "env": env, "fds": fds}
try:
    items = activation.listen_sockets()
    view["sockets"] = [[i.fd, i.name, i.kind, i.family, i.type, i.listening, repr(i.address)] for i in items]
    view["cloexec_after"] = [bool(fcntl.fcntl(i.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for i in items]
except ValueError as exc:
    view["sockets"] = "ValueError: " + str(exc)
view["env_after"] = sorted(k for k in os.environ if k.startswith("LISTEN_"))
with open(sys.argv[1], "w") as f:
    json.dump(view, f)
if fds[0]["mode"] == "sock" and fds[0].get("listening") == 0:
    os.write(1, b"done\n")
elif 3 in fds and fds[3]["mode"] == "sock" and fds[3].get("listening") == 0 and fds[3]["type"] != socket.SOCK_DGRAM:
    os.write(3, b"done\n")
"""


@pytest.fixture
def free_port() -> Iterator[Any]:
    """A function returning a currently free loopback TCP (and UDP) port."""

    def pick(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port: int = s.getsockname()[1]
            return port

    yield pick



@pytest.fixture
def view_script(tmp_path: Path) -> Path:
    """The child program that records its view of the fds."""
    script = tmp_path / "view.py"
    script.write_text(VIEW)
    return script


def tool_command(tool: str) -> list[str]:
    if tool == "real":
        assert REAL is not None
        return [REAL]
    return [sys.executable, "-m", "supervisor.activate"]


def tool_env() -> dict[str, str]:
    """A small, fixed environment: exact TERM/PATH/USER/HOME plus one variable that must not leak."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": "/root",
        "TERM": "dumb",
        "USER": "tester",
        "LEAKY": "must-not-pass",
        "OTHER": "copied-by-E",
        "PYTHONPATH": str(REPO),  # only for `python3 -m supervisor.activate` itself
    }


class Tool:
    """A running activation tool whose stderr can be awaited line by line."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stderr = b""

    def wait_for(self, needle: str, count: int = 1) -> str:
        """Read stderr until ``needle`` appeared ``count`` times (or fail at the deadline)."""
        assert self.proc.stderr is not None
        deadline = time.monotonic() + DEADLINE
        while self.stderr.decode(errors="replace").count(needle) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out waiting for {needle!r}; stderr so far: {self.stderr!r}"
            ready, _, _ = select.select([self.proc.stderr], [], [], remaining)
            if ready:
                chunk = os.read(self.proc.stderr.fileno(), 65536)
                assert chunk, f"tool exited early (rc={self.proc.wait()}); stderr: {self.stderr!r}"
                self.stderr += chunk
        return self.stderr.decode(errors="replace")

    def finish(self) -> tuple[int, str]:
        """Wait for the tool to exit by itself; returns (status, all of stderr)."""
        _, err = self.proc.communicate(timeout=DEADLINE)
        self.stderr += err
        return self.proc.returncode, self.stderr.decode(errors="replace")

    def stop(self) -> str:
        """Terminate a tool that serves forever (--accept)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        _, err = self.proc.communicate(timeout=DEADLINE)
        self.stderr += err
        return self.stderr.decode(errors="replace")


def connect_and_read(family: int, type_: int, address: Any, payload: bytes = b"") -> bytes:
    """Connect (retrying until the deadline), send ``payload``, read until EOF or b"done\\n"."""
    deadline = time.monotonic() + DEADLINE
    while True:
        sock = socket.socket(family, type_)
        try:
            sock.settimeout(DEADLINE)
            sock.connect(address)
            break
        except OSError:
            sock.close()
            assert time.monotonic() < deadline, f"cannot connect to {address!r}"
            select.select([], [], [], 0.05)  # back off briefly; readiness is what the loop waits on
    with sock:
        if payload:
            sock.sendall(payload)
        data = b""
        while not data.endswith(b"done\n"):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break  # a service that never accepted it exited: the listener's queue was reset
            if not chunk:
                break
            data += chunk
        return data


def normalise(view: dict[str, Any]) -> dict[str, Any]:
    """Drop what differs between two runs of the same invocation (pids, inodes, peer ports)."""
    pid = view.pop("pid")
    env = view["env"]
    if "LISTEN_PID" in env:
        assert env["LISTEN_PID"] == str(pid), "LISTEN_PID must be the child's own pid"
        env["LISTEN_PID"] = "<pid>"
    return view


CASES = {
    # name: (extra flags, listen spec builder, trigger kind)
    "stream-service": (["--fdname", "web:api:local:any"], "stream", "connect"),
    "datagram-service": (["-d", "--fdname", "dns"], "dgram", "datagram"),
    "seqpacket-service": (["--seqpacket"], "seqpacket", "seqpacket"),
    "accept": (["-a"], "accept", "connect"),
    "accept-inetd": (["-a", "--inetd"], "accept", "connect"),
    "inetd-service": (["--inetd"], "single", "connect"),
}


@pytest.mark.skipif(REAL is None, reason="systemd-socket-activate is not installed")
@pytest.mark.parametrize("case", sorted(CASES))
def test_activate_matches_systemd_socket_activate(
    case: str, free_port: Any, short_tmp: Path, view_script: Path, tmp_path: Path
) -> None:
    """The child of `sockvisor activate` sees exactly what systemd-socket-activate's child sees."""
    flags, layout, trigger = CASES[case]
    tcp = free_port()
    tcp6 = free_port(socket.AF_INET6, "::1")
    path = str(short_tmp / "s.sock")
    abstract = f"@sv-test-{uuid.uuid4().hex[:8]}"
    listens = {
        "stream": [f"127.0.0.1:{tcp}", f"[::1]:{tcp6}", path, abstract],
        "dgram": [f"127.0.0.1:{tcp}", path],
        "seqpacket": [path, abstract],
        "accept": [f"127.0.0.1:{tcp}"],
        "single": [f"127.0.0.1:{tcp}"],
    }[layout]
    views: dict[str, dict[str, Any]] = {}
    logs: dict[str, str] = {}
    modes: dict[str, int] = {}
    for tool in ("real", "ours"):
        out = tmp_path / f"{tool}.json"
        argv = [*tool_command(tool)]
        for address in listens:
            argv += ["-l", address]
        argv += [*flags, "-E", f"PYTHONPATH={REPO}", "-E", "OTHER", "-E", "SET=1", "-E", "MISSING"]
        argv += ["--", sys.executable, str(view_script), str(out)]
        if tool == "real":
            argv.remove("--")  # systemd's getopt also accepts it, but keep the canonical form
        runner = Tool(argv, tool_env())
        try:
            runner.wait_for("Listening on ", len(listens))
            if trigger == "connect":
                reply = connect_and_read(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", tcp))
                if layout == "accept":
                    assert reply == b"done\n"
            elif trigger == "seqpacket":
                with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
                    client.connect(path)
            else:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                    client.sendto(b"query", ("127.0.0.1", tcp))
            if layout == "accept":
                runner.wait_for("died with code")
                logs[tool] = runner.stop()
            else:
                status, logs[tool] = runner.finish()
                assert status == 0, logs[tool]
        finally:
            if runner.proc.poll() is None:
                runner.stop()
        if layout in ("stream", "dgram", "seqpacket"):
            modes[tool] = os.stat(path).st_mode
        views[tool] = normalise(json.loads(out.read_text()))
    assert views["ours"] == views["real"]
    if modes:
        assert modes["ours"] == modes["real"]
    # The log lines users (and scripts) wait for are the same too.
    for needle in ("Listening on", "Communication attempt on fd"):
        assert [line for line in logs["ours"].splitlines() if line.startswith(needle)] == [
            line for line in logs["real"].splitlines() if line.startswith(needle)
        ]


@pytest.mark.skipif(REAL is None, reason="systemd-socket-activate is not installed")
def test_inherited_fds_are_passed_through_in_place(free_port: Any, view_script: Path, tmp_path: Path) -> None:
    """Fds inherited with LISTEN_FDS keep their numbers and our own listeners follow them, as in systemd."""
    outer, inner = free_port(), free_port()
    out = tmp_path / "view.json"
    argv = [*tool_command("real"), "-l", f"127.0.0.1:{outer}", "--fdname", "outer", "-E", f"PYTHONPATH={REPO}"]
    argv += [
        sys.executable,
        "-m",
        "supervisor.activate",
        "--now",
        "-l",
        f"127.0.0.1:{inner}",
        "-E",
        f"PYTHONPATH={REPO}",
    ]
    argv += ["--", sys.executable, str(view_script), str(out)]
    runner = Tool(argv, tool_env())
    runner.wait_for("Listening on ")
    connect_and_read(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", outer))
    status, log = runner.finish()
    assert status == 0, log
    assert "Received 1 descriptors via the environment." in log
    view = json.loads(out.read_text())
    assert [s[0] for s in view["sockets"]] == [3, 4]
    assert [s[6] for s in view["sockets"]] == [repr(("127.0.0.1", outer)), repr(("127.0.0.1", inner))]


def test_accept_inetd_serves_each_connection(free_port: Any) -> None:
    """`activate -a --inetd cat` is an echo server: one child per connection, on stdin/stdout."""
    port = free_port()
    runner = Tool(
        [sys.executable, "-m", "supervisor.activate", "-a", "--inetd", "-l", f"127.0.0.1:{port}", "cat"], tool_env()
    )
    try:
        runner.wait_for("Listening on 127.0.0.1:")
        for word in (b"first\n", b"second\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as client:
                client.sendall(word)
                client.shutdown(socket.SHUT_WR)
                assert client.makefile("rb").read() == word
        runner.wait_for("died with code 0", 2)
    finally:
        log = runner.stop()
    assert log.count("Spawned cat (cat) as PID") == 2


def test_now_execs_without_waiting(view_script: Path, tmp_path: Path, short_tmp: Path) -> None:
    """With --now the command starts at once, with the fds already listening."""
    out = tmp_path / "view.json"
    path = str(short_tmp / "now.sock")
    argv = [sys.executable, "-m", "supervisor.activate", "--now", "-l", path, "--fdname", "ctl"]
    argv += ["-E", f"PYTHONPATH={REPO}", "--", sys.executable, str(view_script), str(out)]
    runner = Tool(argv, tool_env())
    status, log = runner.finish()
    assert status == 0, log
    assert "Communication attempt" not in log
    assert json.loads(out.read_text())["sockets"] == [[3, "ctl", "socket", socket.AF_UNIX, 1, True, repr(path)]]


def test_live_unix_socket_is_not_stolen(short_tmp: Path) -> None:
    """A unix path something still listens on is a bind failure (exit 1), never unlinked."""
    path = str(short_tmp / "busy.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as owner:
        owner.bind(path)
        owner.listen()
        result = subprocess.run(
            [sys.executable, "-m", "supervisor.activate", "--now", "-l", path, "true"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            env=tool_env(),
        )
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [
            f"sockvisor activate: cannot listen on {path}: {path} is in use by a running process;"
            " refusing to take it over"
        ]
        assert os.path.exists(path)


def test_stale_unix_socket_is_replaced(short_tmp: Path) -> None:
    """A unix socket node nobody listens on any more is replaced, as systemd does."""
    path = str(short_tmp / "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as old:
        old.bind(path)
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.activate", "--now", "-l", path, "true"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=tool_env(),
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["-l", "localhost:80", "true"], 2, "invalid listen address 'localhost:80'"),
        (["-l", "70000", "true"], 2, "port 70000 is out of range"),
        (["-l", "8080"], 2, "command to execute is missing"),
        (["true"], 2, "no sockets to listen on"),
        (["-d", "-a", "-l", "8080", "true"], 2, "--datagram and --accept may not be combined"),
        (["-d", "--seqpacket", "-l", "8080", "true"], 2, "not allowed with argument"),
        (["--inetd", "-l", "127.0.0.1:1", "-l", "127.0.0.1:2", "true"], 2, "--inetd only supported"),
        (["-E", "1BAD=x", "-l", "8080", "true"], 2, "cannot assign environment variable"),
        (["--bogus", "-l", "8080", "true"], 2, "unrecognized arguments"),
        (["--now", "-l", "192.0.2.1:80", "true"], 1, "cannot listen on 192.0.2.1:80: Cannot assign requested address"),
    ],
)
def test_activate_errors_are_one_line(args: list[str], status: int, message: str) -> None:
    """Usage errors exit 2 and bind failures exit 1, each with one line on stderr and no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.activate", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=tool_env(),
    )
    assert result.returncode == status
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sockvisor activate: ")
    assert message in lines[0]


@pytest.mark.skipif(REAL is None, reason="systemd-socket-activate is not installed")
def test_fds_describes_fds_from_systemd_socket_activate(free_port: Any, short_tmp: Path) -> None:
    """`sockvisor fds` prints one line per fd: number, name, family, type, address, state."""
    port = free_port()
    path = str(short_tmp / "f.sock")
    argv = [
        *tool_command("real"),
        "-l",
        f"127.0.0.1:{port}",
        "-l",
        path,
        "-l",
        "@sv-fds-test",
        "--fdname",
        "http:ctl:abs",
    ]
    argv += ["-E", f"PYTHONPATH={REPO}", sys.executable, "-m", "supervisor.fdsinfo"]
    runner = Tool(argv, tool_env())
    runner.wait_for("Listening on ", 3)
    connect_and_read(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", port))
    assert runner.proc.stdout is not None
    out = runner.proc.stdout.read().decode()
    status, log = runner.finish()
    assert status == 0, log
    assert out.splitlines() == [
        f"3 http inet stream 127.0.0.1:{port} listening",
        f"4 ctl unix stream {path} listening",
        "5 abs unix stream @sv-fds-test listening",
    ]


def test_fds_exits_1_when_nothing_was_passed() -> None:
    """`sockvisor fds` outside socket activation fails with one line and status 1."""
    env = {k: v for k, v in tool_env().items() if not k.startswith("LISTEN_")}
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.fdsinfo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=env,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "no file descriptors were passed" in result.stderr


def test_fds_exits_1_for_another_process(tmp_path: Path) -> None:
    """fds meant for another pid (LISTEN_PID mismatch) count as none passed."""
    env = {**tool_env(), "LISTEN_PID": "1", "LISTEN_FDS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.fdsinfo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=env,
    )
    assert result.returncode == 1
    assert "no file descriptors were passed" in result.stderr
