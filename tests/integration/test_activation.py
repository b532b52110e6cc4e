"""``supervisor.activation`` with real processes, real sockets and the real systemd tools.

The reference for every edge case is systemd itself: the library runs under the real
``systemd-socket-activate``, and its parsing of ``LISTEN_*``/``WATCHDOG_*`` is compared, case by
case, with ``sd_listen_fds_with_names()``/``sd_watchdog_enabled()`` from the real libsystemd
through a tiny C probe (skipped when no C compiler or ``libsystemd-dev`` is installed).
"""

from __future__ import annotations

import asyncio
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

from supervisor import activation

REPO = Path(__file__).resolve().parents[2]
REAL = shutil.which("systemd-socket-activate")
DEADLINE = 20.0

# Prints what the library reports, in the process the fds were passed to.
CHILD = r"""
import fcntl, json, os, sys
from supervisor import activation
before = {k: v for k, v in os.environ.items() if k.startswith("LISTEN_")}
items = activation.listen_sockets()
print(json.dumps({
    "pid": os.getpid(),
    "before": before,
    "after": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    "sockets": [[i.fd, i.name, i.kind, i.family, i.type, i.listening, i.address] for i in items],
    "cloexec": [bool(fcntl.fcntl(i.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for i in items],
    "is_unix": [activation.is_socket_unix(i.fd) for i in items],
    "is_inet": [activation.is_socket_inet(i.fd, listening=1) for i in items],
}))
"""

# The same questions asked of libsystemd 252 (the probe) and of this library (the twin).
C_PROBE = r"""
#include <systemd/sd-daemon.h>
#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
int main(void) {
    char **names = NULL;
    int n = sd_listen_fds_with_names(1, &names);
    printf("n=%d", n);
    for (int i = 0; n > 0 && i < n; i++)
        printf(" [%s]%s", names[i], (fcntl(3 + i, F_GETFD) & FD_CLOEXEC) ? "c" : "-");
    uint64_t us = 0;
    int w = sd_watchdog_enabled(0, &us);
    printf(" wd=%d/%llu env=%s,%s,%s\n", w < 0 ? -1 : w, (unsigned long long) (w > 0 ? us : 0),
           getenv("LISTEN_PID") ? "set" : "-", getenv("LISTEN_FDS") ? "set" : "-",
           getenv("LISTEN_FDNAMES") ? "set" : "-");
    return 0;
}
"""
PY_TWIN = r"""
import fcntl, os
from supervisor import activation
try:
    items = activation.listen_fds_with_names(True)
    out = f"n={len(items)}" + "".join(
        f" [{name}]" + ("c" if fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC else "-") for fd, name in items)
except ValueError:
    out = "n=error"
except OSError:
    out = "n=error"
try:
    wd = activation.watchdog_enabled()
    out += " wd=0/0" if wd is None else f" wd=1/{round(wd * 1_000_000)}"
except ValueError:
    out += " wd=-1/0"
out += " env=" + ",".join("set" if os.environ.get(v) is not None else "-"
                          for v in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))
print(out)
"""


@pytest.fixture
def free_port() -> Iterator[Any]:
    """A function returning a currently free loopback TCP port."""

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
            return port

    yield pick



def _wait_stderr(proc: subprocess.Popen[bytes], needle: bytes, count: int) -> bytes:
    """Read the tool's stderr until ``needle`` appeared ``count`` times."""
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + DEADLINE
    while seen.count(needle) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, seen
        if select.select([proc.stderr], [], [], remaining)[0]:
            chunk = os.read(proc.stderr.fileno(), 65536)
            assert chunk, seen
            seen += chunk
    return seen


@pytest.mark.skipif(REAL is None, reason="systemd-socket-activate is not installed")
def test_listen_sockets_under_real_systemd_socket_activate(free_port: Any, short_tmp: Path, tmp_path: Path) -> None:
    """Under systemd-socket-activate the library reports each fd's number, name, family and address."""
    port = free_port()
    path = str(short_tmp / "lib.sock")
    abstract = f"sv-lib-{uuid.uuid4().hex[:8]}"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    assert REAL is not None
    argv = [REAL, "-l", f"127.0.0.1:{port}", "-l", path, "-l", f"@{abstract}", "--fdname", "web:ctl:abs"]
    argv += ["-E", f"PYTHONPATH={REPO}", sys.executable, str(script)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_stderr(proc, b"Listening on ", 3)
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE):
            out, err = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    view = json.loads(out)
    assert view["before"] == {
        "LISTEN_FDS": "3",
        "LISTEN_PID": str(view["pid"]),
        "LISTEN_FDNAMES": "web:ctl:abs",
    }
    stream = int(socket.SOCK_STREAM)
    assert view["sockets"] == [
        [3, "web", "socket", int(socket.AF_INET), stream, True, ["127.0.0.1", port]],
        [4, "ctl", "socket", int(socket.AF_UNIX), stream, True, path],
        [5, "abs", "socket", int(socket.AF_UNIX), stream, True, f"@{abstract}"],
    ]
    assert view["after"] == [], "listen_sockets() must unset LISTEN_* by default"
    assert view["cloexec"] == [True, True, True], "FD_CLOEXEC must be set on the passed fds"
    assert view["is_unix"] == [False, True, True]
    assert view["is_inet"] == [True, False, False]


def _probe_cases() -> list[str]:
    return [
        "LISTEN_PID=$$ LISTEN_FDS=1",
        "LISTEN_PID=' $$' LISTEN_FDS=2",
        "LISTEN_PID='$$ ' LISTEN_FDS=1",
        "LISTEN_PID=+$$ LISTEN_FDS=1",
        "LISTEN_PID=$$ LISTEN_FDS=0x2",
        "LISTEN_PID=$$ LISTEN_FDS=03",
        "LISTEN_PID=$$ LISTEN_FDS=010",
        "LISTEN_PID=$$ LISTEN_FDS=0",
        "LISTEN_PID=$$ LISTEN_FDS=-1",
        "LISTEN_PID=$$ LISTEN_FDS=x",
        "LISTEN_PID=$$",
        "LISTEN_PID=1 LISTEN_FDS=1",
        "LISTEN_PID=1 LISTEN_FDS=x",
        "LISTEN_PID=x LISTEN_FDS=1",
        "LISTEN_PID=0 LISTEN_FDS=1",
        "LISTEN_PID=-5 LISTEN_FDS=1",
        "LISTEN_PID= LISTEN_FDS=1",
        "LISTEN_FDS=1",
        "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=",
        "LISTEN_PID=$$ LISTEN_FDS=3 LISTEN_FDNAMES=a::b",
        "LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=a::b",
        "LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=:",
        "LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=a",
        r"LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES='a\:b'",
        r"LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES='a\\b'",
        r"LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES='a\'",
        "LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=\"'a:b'\"",
        "WATCHDOG_USEC=5000",
        "WATCHDOG_USEC=0",
        "WATCHDOG_USEC=x",
        "WATCHDOG_USEC=18446744073709551615",
        "WATCHDOG_USEC=' 7'",
        "WATCHDOG_USEC=5000 WATCHDOG_PID=1",
        "WATCHDOG_USEC=5000 WATCHDOG_PID=$$",
        "WATCHDOG_USEC=5000 WATCHDOG_PID=x",
    ]


@pytest.fixture(scope="module")
def c_probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The C probe linked against the real libsystemd, built once."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not Path("/usr/include/systemd/sd-daemon.h").exists():
        pytest.skip("needs a C compiler and libsystemd-dev")
    directory = tmp_path_factory.mktemp("probe")
    (directory / "probe.c").write_text(C_PROBE)
    subprocess.run([compiler, "-o", str(directory / "probe"), str(directory / "probe.c"), "-lsystemd"], check=True)
    return directory / "probe"


@pytest.mark.parametrize("assignments", _probe_cases())
def test_parsing_matches_libsystemd(assignments: str, c_probe: Path, tmp_path: Path) -> None:
    """listen_fds_with_names() and watchdog_enabled() accept, refuse and unset exactly as libsystemd."""
    twin = tmp_path / "twin.py"
    twin.write_text(PY_TWIN)
    results = []
    # `exec` keeps the shell's pid, so $$ is the pid the program runs as; fds 3-5 are open.
    script = f'exec 3</dev/null 4</dev/null 5</dev/null; export {assignments}; exec "$@"'
    for program in ([str(c_probe)], [sys.executable, str(twin)]):
        result = subprocess.run(
            ["bash", "-c", script, "_", *program],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=True,
            cwd=REPO,
            env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)},
        )
        results.append(result.stdout.strip())
    c_line, py_line = results
    # libsystemd returns -errno; the library raises. Compare "error" with "error".
    c_line = " ".join("n=error" if part.startswith("n=-") else part for part in c_line.split())
    assert py_line == c_line


def _recv_notification(server: socket.socket) -> tuple[bytes, list[int]]:
    """Receive one datagram and the fds attached to it."""
    server.settimeout(DEADLINE)
    data, ancdata, _flags, _addr = server.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(int.from_bytes(payload[i : i + 4], sys.byteorder) for i in range(0, len(payload), 4))
    return data, fds


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_sends_one_datagram_with_fds(
    abstract: bool, short_tmp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """notify() sends the assignments as one datagram to NOTIFY_SOCKET, with fds via SCM_RIGHTS."""
    name = f"sv-notify-{uuid.uuid4().hex[:8]}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        if abstract:
            server.bind(b"\0" + name.encode())
            monkeypatch.setenv("NOTIFY_SOCKET", f"@{name}")
        else:
            server.bind(str(short_tmp / "notify"))
            monkeypatch.setenv("NOTIFY_SOCKET", str(short_tmp / "notify"))
        stored = tmp_path / "stored"
        stored.write_text("x")
        with open(stored) as handle:
            assert activation.store_fds([handle.fileno()], "cache")
            data, fds = _recv_notification(server)
            try:
                assert data == b"FDSTORE=1\nFDNAME=cache"
                assert len(fds) == 1
                assert os.path.samestat(os.fstat(fds[0]), os.fstat(handle.fileno()))
            finally:
                for fd in fds:
                    os.close(fd)
        assert activation.notify_ready("Serving")
        assert _recv_notification(server) == (b"READY=1\nSTATUS=Serving", [])
        assert activation.notify("WATCHDOG=1", unset_environment=True)
        assert _recv_notification(server) == (b"WATCHDOG=1", [])
        assert "NOTIFY_SOCKET" not in os.environ


def test_notify_reloading_carries_monotonic_usec(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """notify_reloading() sends RELOADING=1 with the current CLOCK_MONOTONIC in microseconds."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(short_tmp / "n"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(short_tmp / "n"))
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert activation.notify_reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        data, _ = _recv_notification(server)
    first, second = data.decode().split("\n")
    assert first == "RELOADING=1"
    assert second.startswith("MONOTONIC_USEC=")
    assert before <= int(second.removeprefix("MONOTONIC_USEC=")) <= after


def test_notify_without_supervisor_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without NOTIFY_SOCKET, notify() is a no-op that returns False."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert activation.notify("READY=1") is False


def test_notify_to_nobody_raises(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A NOTIFY_SOCKET nobody listens on is an OSError, not a silent success."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_tmp / "missing"))
    with pytest.raises(OSError):
        activation.notify("READY=1")


def test_listen_fds_for_another_pid_is_zero_and_unsets(monkeypatch: pytest.MonkeyPatch) -> None:
    """fds announced for another pid are not ours: 0, and LISTEN_* are removed all the same."""
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_FDNAMES", "a:b")
    assert activation.listen_fds() == 0
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)


def test_listen_fds_zero_with_our_pid_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """LISTEN_FDS=0 for our own pid is malformed (libsystemd: -EINVAL) and still unsets."""
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "0")
    with pytest.raises(ValueError):
        activation.listen_fds()
    assert "LISTEN_PID" not in os.environ


def test_is_helpers_on_real_fds(short_tmp: Path) -> None:
    """The sd_is_* twins distinguish family, type, listening state, port, path and FIFOs."""
    fifo = short_tmp / "fifo"
    os.mkfifo(fifo)
    with (
        socket.socket() as tcp,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unnamed,
    ):
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        port = tcp.getsockname()[1]
        dgram.bind(str(short_tmp / "d"))
        fd = os.open(fifo, os.O_RDWR)
        try:
            assert activation.is_socket(tcp.fileno(), socket.AF_INET, socket.SOCK_STREAM, 1)
            assert not activation.is_socket(tcp.fileno(), socket.AF_INET6)
            assert not activation.is_socket(tcp.fileno(), listening=0)
            assert activation.is_socket_inet(tcp.fileno(), port=port)
            assert not activation.is_socket_inet(tcp.fileno(), port=port + 1 if port < 65535 else 1)
            assert activation.is_socket_unix(dgram.fileno(), socket.SOCK_DGRAM, 0, str(short_tmp / "d"))
            assert not activation.is_socket_unix(dgram.fileno(), socket.SOCK_STREAM)
            assert activation.is_socket_unix(unnamed.fileno(), path="")
            assert not activation.is_socket(fd)
            assert activation.is_fifo(fd, str(fifo))
            assert not activation.is_fifo(fd, str(short_tmp / "nope"))
            assert not activation.is_fifo(tcp.fileno())
            item = activation.InheritedSocket.from_fd(fd, "events")
            assert (item.kind, item.family, item.address) == ("fifo", 0, str(fifo))
            with pytest.raises(ValueError):
                item.socket()
        finally:
            os.close(fd)


def test_start_servers_serves_inherited_tcp_and_unix(short_tmp: Path) -> None:
    """start_servers() turns each listening stream socket into an asyncio server and skips the rest."""
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(short_tmp / "u"))
    unix.listen()
    dgram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dgram.bind(("127.0.0.1", 0))
    items = [
        activation.InheritedSocket.from_fd(tcp.detach(), "web"),
        activation.InheritedSocket.from_fd(unix.detach(), "ctl"),
        activation.InheritedSocket.from_fd(dgram.fileno(), "dns"),
    ]
    port = items[0].address[1]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello " + await reader.readline())
        await writer.drain()
        writer.close()

    async def scenario() -> list[bytes]:
        servers = await activation.start_servers(handle, sockets=items)
        try:
            assert len(servers) == 2
            replies = []
            connections = (
                asyncio.open_connection("127.0.0.1", port),
                asyncio.open_unix_connection(str(short_tmp / "u")),
            )
            for connecting in connections:
                reader, writer = await connecting
                writer.write(b"there\n")
                replies.append(await reader.read())
                writer.close()
                await writer.wait_closed()
            with pytest.raises(LookupError):
                await activation.start_servers(handle, sockets=items, names=["dns"])
            return replies
        finally:
            for server in servers:
                server.close()
                await server.wait_closed()

    try:
        assert asyncio.run(scenario()) == [b"hello there\n", b"hello there\n"]
    finally:
        dgram.close()
