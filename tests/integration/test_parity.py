"""xinetd/systemd parity keys, each on its own: builtin services, banners, access_times, environment_files."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from pathlib import Path

from tests.conftest import Sockvisor, connect, free_port, wait_for


def _read_all(s: socket.socket) -> bytes:
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            out += chunk
    return out


# ---------------------------------------------------------------- builtin


def test_builtin_stream_services_answer_without_spawning(sockvisor: Sockvisor) -> None:
    """echo, discard, daytime, chargen and time over TCP are answered by the daemon: right bytes, no child."""
    ports = {name: free_port() for name in ("echo", "discard", "daytime", "chargen", "time")}
    for name, port in ports.items():
        sockvisor.unit(f"b-{name}", f"mode: accept\nlisten: [{{tcp: 127.0.0.1:{port}}}]\nbuiltin: {name}\n")
    sockvisor.start()
    with connect(ports["echo"]) as s:
        s.sendall(b"echo me\n")
        s.shutdown(socket.SHUT_WR)
        assert _read_all(s) == b"echo me\n"
    with connect(ports["discard"]) as s:
        s.sendall(b"x" * 100_000)
        s.shutdown(socket.SHUT_WR)
        assert _read_all(s) == b""
    with connect(ports["daytime"]) as s:
        line = _read_all(s)
        assert line.endswith(b"\r\n") and str(time.localtime().tm_year).encode() in line
    with connect(ports["time"]) as s:
        data = _read_all(s)
        assert len(data) == 4 and abs(struct.unpack("!I", data)[0] - 2208988800 - time.time()) < 5
    with connect(ports["chargen"]) as s:
        got = b""
        while len(got) < 10_000:
            got += s.recv(65536)
    lines = got.split(b"\r\n")[:-1]
    assert all(len(line) == 72 for line in lines) and lines[1][:71] == lines[0][1:]
    for name in ports:
        st = sockvisor.unit_status(f"b-{name}")
        assert st["spawns"] == 0 and st["connections"]["accepted"] == 1, (name, st)
    wait_for(lambda: sockvisor.unit_status("b-chargen")["connections"]["active"] == 0, what="chargen ended")


def test_builtin_connections_count_toward_max_connections(sockvisor: Sockvisor, port: int) -> None:
    """A builtin discard at max_connections: 1 keeps the second client in the backlog until the first leaves."""
    sockvisor.unit("held", f"mode: accept\nlisten: [{{tcp: 127.0.0.1:{port}}}]\nbuiltin: echo\nmax_connections: 1\n")
    sockvisor.start()
    first = connect(port)
    first.sendall(b"1")
    assert first.recv(1) == b"1"
    second = connect(port)  # queued in the backlog, not refused
    second.sendall(b"2")
    second.settimeout(0.5)
    try:
        second.recv(1)
        raise AssertionError("served while the limit was held")
    except TimeoutError:
        pass
    first.close()
    second.settimeout(10)
    assert second.recv(1) == b"2"
    second.close()
    assert sockvisor.unit_status("held")["connections"]["refused"] == 0


def test_builtin_datagram_services_in_service_mode(sockvisor: Sockvisor) -> None:
    """mode: service with builtin on udp: echo returns the datagram, daytime and time reply, chargen sends at
    most 512 characters, discard answers nothing."""
    ports = {name: free_port(socket.SOCK_DGRAM) for name in ("echo", "discard", "daytime", "chargen", "time")}
    for name, port in ports.items():
        sockvisor.unit(f"u-{name}", f"listen: [{{udp: 127.0.0.1:{port}}}]\nbuiltin: {name}\n")
    sockvisor.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.settimeout(5)

        def ask(name: str, data: bytes = b"q") -> bytes:
            c.sendto(data, ("127.0.0.1", ports[name]))
            return c.recvfrom(65535)[0]

        assert ask("echo", b"ping") == b"ping"
        assert ask("daytime").endswith(b"\r\n")
        assert len(ask("time")) == 4
        assert len(ask("chargen")) <= 512
        c.sendto(b"q", ("127.0.0.1", ports["discard"]))
        c.settimeout(0.3)
        try:
            c.recvfrom(10)
            raise AssertionError("discard answered")
        except TimeoutError:
            pass
    assert sockvisor.unit_status("u-echo")["spawns"] == 0


# ---------------------------------------------------------------- banners, access_times


def test_banners_before_the_service_and_before_a_refusal(sockvisor: Sockvisor, short_tmp: Path) -> None:
    """banner comes first, banner_success next, then the service; a refused client gets banner then
    banner_fail, then the end."""
    (short_tmp / "b").write_text("welcome\n")
    (short_tmp / "ok").write_text("you are in\n")
    (short_tmp / "no").write_text("go away\n")
    ok_port, deny_port = free_port(), free_port()
    common = f"banner: {short_tmp}/b\nbanner_success: {short_tmp}/ok\nbanner_fail: {short_tmp}/no\n"
    sockvisor.unit("ok", f"mode: accept\nlisten: [{{tcp: 127.0.0.1:{ok_port}}}]\nexec: [/bin/echo, service]\n"
                         + common)
    sockvisor.unit("no", f"mode: accept\nlisten: [{{tcp: 127.0.0.1:{deny_port}}}]\nexec: [/bin/echo, service]\n"
                         "deny: [127.0.0.0/8]\n" + common)
    sockvisor.start()
    with connect(ok_port) as s:
        assert _read_all(s) == b"welcome\nyou are in\nservice\n"
    with connect(deny_port) as s:
        assert _read_all(s) == b"welcome\ngo away\n"
    assert sockvisor.unit_status("no")["connections"]["refused_by_reason"] == {"deny": 1}


def _window(start_min: int, length: int) -> str:
    s, e = start_min % 1440, (start_min + length) % 1440
    return f'"{s // 60:02d}:{s % 60:02d}-{e // 60:02d}:{e % 60:02d}"'


def test_access_times_admit_inside_and_refuse_outside(sockvisor: Sockvisor) -> None:
    """A window around now admits; a window hours away refuses with reason access_times (local time)."""
    t = time.localtime()
    now = t.tm_hour * 60 + t.tm_min
    inside, outside = free_port(), free_port()
    sockvisor.unit("in", f"mode: accept\nlisten: [{{tcp: 127.0.0.1:{inside}}}]\nbuiltin: daytime\n"
                         f"access_times: [{_window(now - 60, 120)}]\n")
    sockvisor.unit("out", f"mode: accept\nlisten: [{{tcp: 127.0.0.1:{outside}}}]\nbuiltin: daytime\n"
                          f"access_times: [{_window(now + 120, 60)}, {_window(now + 300, 30)}]\n")
    sockvisor.start()
    with connect(inside) as s:
        assert _read_all(s).endswith(b"\r\n")
    with connect(outside) as s:
        assert _read_all(s) == b""
    assert sockvisor.unit_status("out")["connections"]["refused_by_reason"] == {"access_times": 1}
    assert sockvisor.wait_event("connection_refused", unit="out")["reason"] == "access_times"


# ---------------------------------------------------------------- environment_files


def test_environment_files_in_order_with_systemd_syntax(sockvisor: Sockvisor, port: int, short_tmp: Path) -> None:
    """Files are read with systemd's syntax, after pass_environment and before environment; a -file may be
    missing; a reload reads them again."""
    env = short_tmp / "app.env"
    env.write_text('# comment\n; also a comment\nA=plain  \nB="two words \\"quoted\\""\nC=\'single $x\'\n'
                   'D=con\\\ntinued\nHOME=/from/file\nLAST=file\n')
    sockvisor.unit("env", f"""
        mode: accept
        listen: [{{tcp: 127.0.0.1:{port}}}]
        exec: [/usr/bin/env]
        pass_environment: [HOME]
        environment_files: ["{env}", "-{short_tmp}/missing.env"]
        environment: {{LAST: unit}}
    """)
    sockvisor.start(env={"HOME": "/from/daemon"})
    with connect(port) as s:
        lines = dict(line.split("=", 1) for line in _read_all(s).decode().splitlines())
    assert lines["A"] == "plain" and lines["B"] == 'two words "quoted"' and lines["C"] == "single $x"
    assert lines["D"] == "continued" and lines["HOME"] == "/from/file" and lines["LAST"] == "unit"
    env.write_text("A=reloaded\n")
    sockvisor.cli("reload", "--config", str(sockvisor.config), check=True)
    with connect(port) as s:
        assert "A=reloaded" in _read_all(s).decode().splitlines()


def test_environment_file_errors_are_located(sockvisor: Sockvisor, port: int, short_tmp: Path) -> None:
    """A missing file (without -) and a bad line are each one located error; check exits 2."""
    bad = short_tmp / "bad.env"
    bad.write_text("GOOD=1\nnot an assignment\n")
    sockvisor.unit("env", f'mode: accept\nlisten: [{{tcp: 127.0.0.1:{port}}}]\nexec: [/bin/true]\n'
                          f'environment_files: ["{short_tmp}/nope.env", "{bad}"]\n')
    res = sockvisor.cli("check", "--config", str(sockvisor.config))
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        f"sockets.d/env.yaml:4:21: environment_files[0]: {short_tmp}/nope.env: no such file (prefix it with - to "
        "make it optional)",
        f"{bad}:2:1: environment_files[1]: expected NAME=value, got 'not an assignment'",
    ]
