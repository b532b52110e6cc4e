"""Reload as a diff, end to end: kept fds, in-place retuning, re-binds, rollback, systemd notifications, and no
refused connection to an unchanged unit while reloads come and go."""

from __future__ import annotations

import os
import signal
import socket
import stat
import sys
from pathlib import Path

import pytest

from supervisor import control
from tests.conftest import PROGRAMS, Sockvisor, connect, free_port, roundtrip
from tests.integration.reload_helpers import Load, daemon_listener, listen_inode, steal_fd

PY = sys.executable


def hello(sv: Sockvisor, port: int, name: str = "hello", text: str = "hello", extra: str = "") -> None:
    sv.unit(name, f"""
        listen:
          - tcp: "127.0.0.1:{port}"{extra}
        mode: accept
        exec: [/bin/echo, {text}]
    """)


def reload(sv: Sockvisor) -> dict[str, object]:
    """Reload through the control socket (what `sockvisor reload` sends) and return the reply."""
    return control.request(str(sv.control), {"cmd": "reload"})


def pid_of(sv: Sockvisor) -> int:
    assert sv.proc is not None
    return sv.proc.pid


def test_unchanged_listener_keeps_its_socket_inode(sockvisor: Sockvisor) -> None:
    """Reloading with another unit added and removed leaves an unchanged listener's fd and inode untouched."""
    port, other = free_port(), free_port()
    hello(sockvisor, port)
    sockvisor.start()
    before = daemon_listener(pid_of(sockvisor), port)
    hello(sockvisor, other, name="other")
    res = sockvisor.cli("reload", check=True)
    assert res.stdout == "reloaded: added other, changed none, removed none\n"
    assert roundtrip(other) == b"hello\n"
    sockvisor.remove_unit("other")
    assert reload(sockvisor) == {"ok": True, "added": [], "changed": [], "removed": ["other"]}
    sockvisor.wait_event("unit_removed", unit="other")
    assert daemon_listener(pid_of(sockvisor), port) == before
    assert listen_inode(other) is None
    assert roundtrip(port) == b"hello\n"


def test_invalid_config_changes_nothing_and_reports_every_error(sockvisor: Sockvisor) -> None:
    """An invalid reload exits 2 printing every error, logs reload_failed, and the old config keeps running."""
    port = free_port()
    hello(sockvisor, port)
    sockvisor.start()
    before = daemon_listener(pid_of(sockvisor), port)
    hello(sockvisor, port, text="changed")
    sockvisor.unit("bad1", "listen: [{tcp: '127.0.0.1:70000'}]\nexec: [/bin/true]\n")
    sockvisor.unit("bad2", "listen: [{tcp: '127.0.0.1:1'}]\nexec: [/bin/true]\nmode: sideways\n")
    res = sockvisor.cli("reload")
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert any("bad1.yaml" in ln and "70000" in ln for ln in lines), lines
    assert any("bad2.yaml" in ln and "sideways" in ln for ln in lines), lines
    assert sockvisor.wait_event("reload_failed")["errors"] == lines
    assert daemon_listener(pid_of(sockvisor), port) == before
    assert roundtrip(port) == b"hello\n", "the old exec is still in force"
    assert [u["name"] for u in sockvisor.status()["units"]] == ["hello"]


def test_bind_failure_rolls_back_and_reports(sockvisor: Sockvisor) -> None:
    """A reload whose new listener cannot bind exits 1 naming it, and nothing else it planned is applied."""
    port, fresh = free_port(), free_port()
    hello(sockvisor, port)
    sockvisor.start()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        hello(sockvisor, fresh, name="a-fresh")
        hello(sockvisor, taken, name="b-taken")
        hello(sockvisor, port, text="changed")
        res = sockvisor.cli("reload")
        assert res.returncode == 1
        assert len(res.stderr.splitlines()) == 1
        assert "b-taken" in res.stderr and f"127.0.0.1:{taken}" in res.stderr
    assert listen_inode(fresh) is None, "the unit bound earlier in the failed reload was closed again"
    assert [u["name"] for u in sockvisor.status()["units"]] == ["hello"]
    assert roundtrip(port) == b"hello\n"
    sockvisor.wait_event("reload_failed")


def test_changed_exec_applies_to_the_next_spawn_on_the_same_fd(sockvisor: Sockvisor) -> None:
    """Changing a unit's process settings keeps its listener and the next connection runs the new command."""
    port = free_port()
    hello(sockvisor, port)
    sockvisor.start()
    before = daemon_listener(pid_of(sockvisor), port)
    hello(sockvisor, port, text="second")
    assert reload(sockvisor)["changed"] == ["hello"]
    assert roundtrip(port) == b"second\n"
    assert daemon_listener(pid_of(sockvisor), port) == before


def test_retunable_options_change_in_place(sockvisor: Sockvisor, short_tmp: Path) -> None:
    """A changed receive buffer, backlog and unix mode are applied to the same sockets, not re-bound."""
    port = free_port()
    path = short_tmp / "h.sock"
    sockvisor.unit("hello", f"""
        listen:
          - tcp: "127.0.0.1:{port}"
            receive_buffer: 64K
          - unix: {path}
            mode: "0600"
        mode: accept
        exec: [/bin/echo, hello]
    """)
    sockvisor.start()
    fd, inode = daemon_listener(pid_of(sockvisor), port)
    node = os.stat(path)
    assert stat.S_IMODE(node.st_mode) == 0o600
    sockvisor.unit("hello", f"""
        listen:
          - tcp: "127.0.0.1:{port}"
            receive_buffer: 256K
            backlog: 16
          - unix: {path}
            mode: "0660"
        mode: accept
        exec: [/bin/echo, hello]
    """)
    assert reload(sockvisor)["changed"] == ["hello"]
    assert daemon_listener(pid_of(sockvisor), port) == (fd, inode)
    after = os.stat(path)
    assert (after.st_ino, stat.S_IMODE(after.st_mode)) == (node.st_ino, 0o660)
    with steal_fd(pid_of(sockvisor), fd) as dup:
        assert dup.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 256 * 1024
    assert roundtrip(port) == b"hello\n"


def test_bind_time_option_change_rebinds_the_listener(sockvisor: Sockvisor) -> None:
    """Changing reuse_port (settable only before bind) replaces the socket, which then serves."""
    port = free_port()
    hello(sockvisor, port)
    sockvisor.start()
    _, inode = daemon_listener(pid_of(sockvisor), port)
    hello(sockvisor, port, extra="\n            reuse_port: true")
    assert reload(sockvisor)["changed"] == ["hello"]
    _, new_inode = daemon_listener(pid_of(sockvisor), port)
    assert new_inode != inode
    assert roundtrip(port) == b"hello\n"


def test_failed_reload_rebinds_a_released_listener_as_it_was(sockvisor: Sockvisor) -> None:
    """When a later unit fails to bind, a listener already re-bound for a bind-time change is restored as before."""
    port = free_port()
    hello(sockvisor, port, name="a-hello")
    sockvisor.start()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        hello(sockvisor, port, name="a-hello", extra="\n            reuse_port: true")
        hello(sockvisor, squatter.getsockname()[1], name="b-taken")
        assert sockvisor.cli("reload").returncode == 1
    fd, _ = daemon_listener(pid_of(sockvisor), port)
    with steal_fd(pid_of(sockvisor), fd) as dup:
        assert dup.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0, "the old options are back"
    assert roundtrip(port) == b"hello\n"
    assert [u["name"] for u in sockvisor.status()["units"]] == ["a-hello"]


def test_bind_time_change_is_refused_while_a_service_holds_the_socket(sockvisor: Sockvisor) -> None:
    """A bind-time option change on a running service's listener fails the reload with a hint, changing nothing."""
    port = free_port()
    unit = f"""
        listen:
          - tcp: "127.0.0.1:{port}"{{extra}}
        start: eager
        exec: [{PY}, {PROGRAMS}/svc_serve.py]
    """
    sockvisor.unit("svc", unit.format(extra=""))
    sockvisor.start()
    pid = sockvisor.wait_event("child_started", unit="svc")["pid"]
    before = daemon_listener(pid_of(sockvisor), port)
    sockvisor.unit("svc", unit.format(extra="\n            reuse_port: true"))
    res = sockvisor.cli("reload")
    assert res.returncode == 1
    assert "stop the unit first (sockvisor stop svc)" in res.stderr
    assert daemon_listener(pid_of(sockvisor), port) == before
    assert sockvisor.unit_status("svc")["pids"] == [pid]


def test_added_listener_is_bound_and_removed_one_closed(sockvisor: Sockvisor) -> None:
    """Adding a listen entry binds it next to the kept one; removing it again closes only that one."""
    port, extra = free_port(), free_port()
    hello(sockvisor, port)
    sockvisor.start()
    before = daemon_listener(pid_of(sockvisor), port)
    sockvisor.unit("hello", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}, {{tcp: "127.0.0.1:{extra}"}}]
        mode: accept
        exec: [/bin/echo, hello]
    """)
    assert reload(sockvisor)["changed"] == ["hello"]
    assert roundtrip(extra) == b"hello\n"
    hello(sockvisor, port)
    assert reload(sockvisor)["changed"] == ["hello"]
    assert listen_inode(extra) is None
    assert daemon_listener(pid_of(sockvisor), port) == before


def test_removed_accept_unit_lets_its_connection_finish(sockvisor: Sockvisor) -> None:
    """A removed accept unit stops accepting, its live child finishes its connection, then its socket closes."""
    port = free_port()
    sockvisor.unit("cat", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: accept
        exec: [/bin/cat]
    """)
    sockvisor.start()
    with connect(port) as conn:
        conn.sendall(b"one\n")
        assert conn.recv(16) == b"one\n"
        sockvisor.remove_unit("cat")
        assert reload(sockvisor)["removed"] == ["cat"]
        conn.sendall(b"two\n")
        assert conn.recv(16) == b"two\n", "the child of a removed unit keeps its connection"
        assert listen_inode(port) is not None, "closed only after the last child"
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(16) == b""
    sockvisor.wait_event("unit_removed", unit="cat")
    assert listen_inode(port) is None
    assert sockvisor.status()["units"] == []


def test_removed_service_unit_is_stopped_then_closed(sockvisor: Sockvisor) -> None:
    """A removed service unit's process is stopped and its socket closed once it has exited."""
    port = free_port()
    sockvisor.unit("svc", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        start: eager
        exec: [{PY}, {PROGRAMS}/svc_serve.py]
    """)
    sockvisor.start()
    pid = sockvisor.wait_event("child_started", unit="svc")["pid"]
    sockvisor.remove_unit("svc")
    assert reload(sockvisor)["removed"] == ["svc"]
    sockvisor.wait_event("child_exited", unit="svc", pid=pid)
    sockvisor.wait_event("unit_removed", unit="svc")
    assert listen_inode(port) is None


def test_mode_change_keeps_the_listener(sockvisor: Sockvisor) -> None:
    """Switching a unit from service to accept mode hands its socket to the new runtime and stops the old process."""
    port = free_port()
    sockvisor.unit("flip", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        start: eager
        exec: [{PY}, {PROGRAMS}/svc_serve.py]
    """)
    sockvisor.start()
    pid = sockvisor.wait_event("child_started", unit="flip")["pid"]
    before = daemon_listener(pid_of(sockvisor), port)
    hello(sockvisor, port, name="flip", text="flipped")
    assert reload(sockvisor)["changed"] == ["flip"]
    sockvisor.wait_event("child_exited", unit="flip", pid=pid)
    assert roundtrip(port) == b"flipped\n"
    assert daemon_listener(pid_of(sockvisor), port) == before
    assert sockvisor.unit_status("flip")["mode"] == "accept"


def test_enabling_a_disabled_unit_starts_serving(sockvisor: Sockvisor) -> None:
    """A unit switched from enabled: false to true by a reload is bound and serves."""
    port = free_port()
    hello(sockvisor, port)
    (sockvisor.config / "sockets.d" / "hello.yaml").write_text(
        f"enabled: false\nlisten: [{{tcp: '127.0.0.1:{port}'}}]\nmode: accept\nexec: [/bin/echo, hello]\n")
    sockvisor.start()
    assert listen_inode(port) is None
    hello(sockvisor, port)
    assert reload(sockvisor)["changed"] == ["hello"]
    assert roundtrip(port) == b"hello\n"


def test_sighup_reloads(sockvisor: Sockvisor) -> None:
    """SIGHUP reloads like `sockvisor reload`."""
    port, other = free_port(), free_port()
    hello(sockvisor, port)
    sockvisor.start()
    hello(sockvisor, other, name="other")
    assert sockvisor.proc is not None
    sockvisor.proc.send_signal(signal.SIGHUP)
    assert sockvisor.wait_event("reloaded")["added"] == ["other"]
    assert roundtrip(other) == b"hello\n"


def test_reload_is_announced_to_systemd(sockvisor: Sockvisor, short_tmp: Path) -> None:
    """With NOTIFY_SOCKET set the daemon sends READY=1, then RELOADING=1 and READY=1 around every reload."""
    path = str(short_tmp / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as nsock:
        nsock.bind(path)
        nsock.settimeout(10)
        hello(sockvisor, free_port())
        sockvisor.start(env={"NOTIFY_SOCKET": path})

        def message() -> dict[str, str]:
            while True:  # the listeners stored after READY=1 (FDSTORE=1, crash recovery) are not what this checks
                fields = dict(line.split("=", 1) for line in nsock.recv(4096).decode().splitlines())
                if fields.get("FDSTORE") != "1":
                    return fields

        assert message()["READY"] == "1"
        reload(sockvisor)
        reloading = message()
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        ready = message()
        assert ready["READY"] == "1" and "1 units" in ready["STATUS"]
        sockvisor.unit("bad", "listen: nope\n")
        failed = reload(sockvisor)
        assert (failed["ok"], failed["reason"]) == (False, "invalid_config")
        assert message()["RELOADING"] == "1"
        assert message()["READY"] == "1", "a failed reload is still followed by READY=1"


@pytest.mark.timeout(60)
def test_no_connection_to_an_unchanged_unit_fails_across_reloads(sockvisor: Sockvisor) -> None:
    """Ten reloads (adding and removing units and listeners, some invalid) under load fail no connection."""
    port = free_port()
    hello(sockvisor, port)
    sockvisor.start()
    before = daemon_listener(pid_of(sockvisor), port)
    load = Load(port, b"hello\n").start()
    try:
        results = []
        for i in range(10):
            load.wait_ok(5)
            step = i % 4
            if step == 0:
                hello(sockvisor, free_port(), name=f"extra{i}")
            elif step == 1:
                for p in (sockvisor.config / "sockets.d").glob("extra*.yaml"):
                    p.unlink()
            elif step == 2:
                sockvisor.unit("broken", "listen: [{tcp: '127.0.0.1:99999'}]\nexec: [/bin/true]\n")
            else:
                sockvisor.remove_unit("broken")
            results.append(reload(sockvisor)["ok"])
        load.wait_ok(5)
    finally:
        load.stop()
    assert results == [True, True, False, True] * 2 + [True, True]
    assert load.failed == 0, load.failures[:5]
    assert load.ok >= 55
    assert daemon_listener(pid_of(sockvisor), port) == before


def _bomb(levels: int = 8) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_hostile_reload_is_refused_quickly_with_located_errors(sockvisor: Sockvisor) -> None:
    """An alias bomb and a crashing value through reload exit 2 in seconds with located lines; nothing changes."""
    port = free_port()
    hello(sockvisor, port)
    sockvisor.start()
    before = daemon_listener(pid_of(sockvisor), port)
    sockvisor.unit("bomb", _bomb() + f"listen: [{{tcp: '127.0.0.1:{free_port()}'}}]\nexec: [/bin/true]\nmode: *a8\n")
    sockvisor.unit("crash", "listen: [{tcp: '127.0.0.1:1'}]\nexec: [/bin/true]\nstop_timeout: 2001-02-30\n")
    res = sockvisor.cli("reload", timeout=20)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert "sockets.d/bomb.yaml:9:5: mode: expected service, accept, pool or proxy, got a list" in lines, lines
    assert any(ln.startswith("sockets.d/crash.yaml:3:15: stop_timeout: invalid value") for ln in lines), lines
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr
    assert daemon_listener(pid_of(sockvisor), port) == before
    assert [u["name"] for u in sockvisor.status()["units"]] == ["hello"]


def test_sighup_with_a_bad_config_logs_located_errors_and_keeps_serving(sockvisor: Sockvisor) -> None:
    """SIGHUP on a config that used to raise logs reload_failed with located errors, no traceback, and serves on."""
    port = free_port()
    hello(sockvisor, port)
    sockvisor.start()
    sockvisor.unit("crash", "listen: [{tcp: '127.0.0.1:1'}]\nexec: [/bin/true]\nmode: [accept]\n")
    assert sockvisor.proc is not None
    sockvisor.proc.send_signal(signal.SIGHUP)
    failed = sockvisor.wait_event("reload_failed")
    assert failed["errors"] == ["sockets.d/crash.yaml:3:7: mode: expected service, accept, pool or proxy, got a list"]
    assert roundtrip(port) == b"hello\n"
    assert not any("Traceback" in line for line in sockvisor.raw)
