"""The daemon's notify side, end to end: READY/STATUS/STOPPING/WATCHDOG, the fd store, bad datagrams.

Children are real programs (``tests/programs/notify_*.py`` on ``supervisor.activation``, and
Debian's ``systemd-notify`` and libsystemd through ``python3-systemd``) run by the real daemon;
the tests wait on its log events, never on sleeps.
"""

from __future__ import annotations

import array
import os
import socket
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PROGRAMS, REPO, Sockvisor, connect, free_port, wait_for

PY = sys.executable
SERVICE = PROGRAMS / "notify_service.py"
SYSTEMD_NOTIFY = "/usr/bin/systemd-notify"
DEBIAN_PYTHON = "/usr/bin/python3"


def _unit(sv: Sockvisor, name: str, args: str, extra: str = "") -> None:
    """A ``ready: notify`` unit named ``name`` running notify_service.py with ``args`` (space-separated)."""
    argv = ", ".join([PY, str(SERVICE), *args.split()])
    sv.unit(name, f"""listen: [{{tcp: "127.0.0.1:{free_port()}", name: x}}]
start: eager
ready: notify
restart_delay: 50ms
exec: [{argv}]
environment: {{PYTHONPATH: "{REPO}"}}
limits: {{core: 0}}
{extra}""")


def _at(event: dict[str, Any]) -> float:
    """The event's log timestamp, in seconds."""
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def _line(s: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(4096)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data.decode().strip()


@pytest.mark.parametrize("user", ["self", "nobody"])
def test_systemd_notify_from_a_shell_script_drives_readiness(sockvisor: Sockvisor, port: int,
                                                              short_tmp: Path, user: str) -> None:
    """Debian's systemd-notify --status and --ready from a /bin/sh service set STATUS= and make it running.

    As root systemd-notify (v252) sends with its parent's pid (the service itself); as any other
    user it cannot, and sends with its own: the daemon attributes that one by its session.
    """
    if not os.access(SYSTEMD_NOTIFY, os.X_OK):
        pytest.skip("needs systemd-notify (apt-get install systemd)")
    if os.geteuid() != 0 and user == "nobody":
        pytest.skip("running as another user needs root")
    go = short_tmp / "go"
    os.mkfifo(go)
    go.chmod(0o666)
    script = short_tmp / "svc.sh"
    script.write_text(f"""#!/bin/sh
{SYSTEMD_NOTIFY} --status="warming up"
read line < {go}
{SYSTEMD_NOTIFY} --ready --status=serving
exec sleep 1000
""")
    script.chmod(0o755)
    sockvisor.unit("shell", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        start: eager
        ready: notify
        exec: [{script}]
        {"user: nobody" if user == "nobody" else ""}
    """)
    sockvisor.start()
    pid = sockvisor.wait_event("child_started", unit="shell")["pid"]
    sockvisor.wait_event("status_changed", unit="shell", status="warming up")
    st = sockvisor.unit_status("shell")
    assert (st["state"], st["status"]) == ("starting", "warming up")
    with open(go, "w") as fifo:
        fifo.write("go\n")
    sockvisor.wait_event("child_ready", unit="shell", pid=pid)
    st = sockvisor.unit_status("shell")
    assert (st["state"], st["status"], st["pids"]) == ("running", "serving", [pid])
    assert "serving" in sockvisor.cli("status", "shell", check=True).stdout
    senders = {e["sender"] for e in sockvisor.find("notify_received", unit="shell", pid=pid) if "READY" in e["keys"]}
    assert (senders == {pid}) == (os.geteuid() == 0 and user == "self"), senders
    assert not sockvisor.find("notify_dropped", unit="shell")


def test_libsystemd_sd_notify_from_a_grandchild_is_attributed_by_session(sockvisor: Sockvisor,
                                                                        short_tmp: Path) -> None:
    """libsystemd's sd_notify (python3-systemd) from a process the service started counts as the service's READY=1."""
    probe = f"{DEBIAN_PYTHON} -c 'import systemd.daemon'"
    if not os.access(DEBIAN_PYTHON, os.X_OK) or os.system(probe + " 2>/dev/null") != 0:
        pytest.skip("needs Debian's python3-systemd (apt-get install python3-systemd)")
    script = short_tmp / "svc.sh"
    script.write_text(f"""#!/bin/sh
{DEBIAN_PYTHON} -c '
import signal, systemd.daemon
assert systemd.daemon.notify("READY=1\\nSTATUS=via libsystemd")
signal.pause()
' &
wait
""")
    script.chmod(0o755)
    sockvisor.unit("lib", f"""
        listen: [{{tcp: "127.0.0.1:{free_port()}"}}]
        start: eager
        ready: notify
        exec: [{script}]
    """)
    sockvisor.start()
    pid = sockvisor.wait_event("child_started", unit="lib")["pid"]
    sockvisor.wait_event("child_ready", unit="lib", pid=pid)
    st = sockvisor.unit_status("lib")
    assert (st["state"], st["status"], st["pids"]) == ("running", "via libsystemd", [pid])


def test_stored_connection_survives_a_restart(sockvisor: Sockvisor, port: int) -> None:
    """A connection stored with FDSTORE=1 comes back after `sockvisor restart`, named in LISTEN_FDNAMES, and works."""
    sockvisor.unit("keep", f"""
        listen: [{{tcp: "127.0.0.1:{port}", name: web}}]
        start: eager
        ready: notify
        exec: [{PY}, {PROGRAMS}/notify_fdstore.py]
        environment: {{PYTHONPATH: "{REPO}"}}
    """)
    sockvisor.start()
    sockvisor.wait_event("child_ready", unit="keep")
    assert sockvisor.unit_status("keep")["status"] == "fresh names=web"
    with connect(port) as client:
        client.sendall(b"hello\n")
        first, pid1, said = _line(client).split()
        assert (first, said) == ("first", "hello")
        sockvisor.wait_event("fd_stored", unit="keep", fdname="conn")
        sockvisor.cli("restart", "keep", check=True)
        sockvisor.wait_event("child_ready", unit="keep", count=2)
        assert sockvisor.unit_status("keep")["status"] == "resumed names=web:conn"
        client.sendall(b"again\n")
        second, pid2, said = _line(client).split()
    assert (second, said) == ("second", "again")
    assert pid2 != pid1


def test_fdstoreremove_drops_the_named_fds(sockvisor: Sockvisor) -> None:
    """FDSTOREREMOVE=1 with FDNAME= closes every fd of that name; the next process only gets the others."""
    _unit(sockvisor, "rm", "store:a:2 store:b:1 remove:a")
    sockvisor.start()
    sockvisor.wait_event("child_ready", unit="rm")
    removed = sockvisor.wait_event("fd_removed", unit="rm", fdname="a")
    assert (removed["removed"], removed["count"]) == (2, 1)
    sockvisor.cli("restart", "rm", check=True)
    sockvisor.wait_event("child_ready", unit="rm", count=2)
    assert sockvisor.unit_status("rm")["status"].startswith("names=x:b ")


def test_fd_store_cap_is_enforced(sockvisor: Sockvisor) -> None:
    """At fd_store_max further fds are closed and logged; exactly that many come back."""
    _unit(sockvisor, "cap", "store:a:3", "fd_store_max: 2\n")
    sockvisor.start()
    sockvisor.wait_event("child_ready", unit="cap")
    assert sockvisor.find("fd_store_full", unit="cap", max=2)
    assert len(sockvisor.find("fd_stored", unit="cap")) == 2
    sockvisor.cli("restart", "cap", check=True)
    sockvisor.wait_event("child_ready", unit="cap", count=2)
    assert sockvisor.unit_status("cap")["status"].startswith("names=x:a:a ")


def test_silent_service_is_killed_by_the_watchdog_and_restarted(sockvisor: Sockvisor) -> None:
    """WATCHDOG=1 pings keep a service alive; once they stop it is killed within the interval and started again."""
    _unit(sockvisor, "dog", "pings:6", "watchdog: 500ms\n")
    sockvisor.start()
    pid = sockvisor.wait_event("child_started", unit="dog")["pid"]
    sockvisor.wait_event("child_ready", unit="dog", pid=pid)
    # WATCHDOG_USEC and WATCHDOG_PID (= the child's own pid) reach it: watchdog_enabled() accepts them.
    assert sockvisor.unit_status("dog")["status"] == f"names=x watchdog=0.5 wpid={pid}"
    timeout = sockvisor.wait_event("watchdog_timeout", unit="dog", pid=pid)
    exited = sockvisor.wait_event("child_exited", unit="dog", pid=pid)
    assert exited["status"] == "SIGABRT"
    # Six pings at 125 ms carried it past one interval; the silence after the last one ended it
    # one interval later.
    pings = [e for e in sockvisor.find("notify_received", unit="dog", pid=pid) if e["keys"] == ["WATCHDOG"]]
    assert len(pings) == 6
    silence = _at(timeout) - _at(pings[-1])
    assert 0.5 - 0.01 <= silence < 0.5 + 0.4, silence  # uvloop timers have millisecond resolution
    assert exited["duration"] >= 0.75 + 0.5
    second = sockvisor.wait_event("child_started", unit="dog", count=2)["pid"]
    sockvisor.wait_event("child_ready", unit="dog", pid=second)


def test_start_timeout_kills_a_service_that_never_says_ready(sockvisor: Sockvisor) -> None:
    """ready: notify without READY=1 never runs, is stopped at start_timeout, and counts as a failure."""
    _unit(sockvisor, "mute", "no-ready", "start_timeout: 300ms\n")
    sockvisor.start()
    pid = sockvisor.wait_event("child_started", unit="mute")["pid"]
    sockvisor.wait_event("start_timeout", unit="mute", pid=pid)
    exited = sockvisor.wait_event("child_exited", unit="mute", pid=pid)
    assert exited["status"] == "SIGTERM" and exited["duration"] >= 0.3
    sockvisor.wait_event("restart_scheduled", unit="mute")
    sockvisor.wait_event("child_started", unit="mute", count=2)
    assert not sockvisor.find("child_ready", unit="mute")


def test_stopping_is_logged_even_when_the_child_exits_at_once(sockvisor: Sockvisor) -> None:
    """STOPPING=1 sent just before exiting is read before the exit is handled, and logged."""
    _unit(sockvisor, "bye", "stopping")
    sockvisor.start()
    pid = sockvisor.wait_event("child_ready", unit="bye")["pid"]
    sockvisor.cli("stop", "bye", check=True)
    sockvisor.wait_event("child_stopping_notified", unit="bye", pid=pid)
    sockvisor.wait_event("child_exited", unit="bye", pid=pid)
    assert not sockvisor.find("notify_dropped", unit="bye")


def test_oversized_and_malformed_datagrams_are_dropped(sockvisor: Sockvisor) -> None:
    """Oversized, malformed and non-UTF-8 datagrams are dropped and logged, their fds closed, and the unit goes on."""
    _unit(sockvisor, "junk", "garbage")
    sockvisor.start()
    sockvisor.wait_event("child_ready", unit="junk")
    st = sockvisor.unit_status("junk")
    assert st["notify"]["dropped"] == {"malformed message": 3, "message too large": 1}
    # Repeats are summarized: the first of each reason is logged at once, the rest counted.
    assert {e["reason"] for e in sockvisor.find("notify_dropped", unit="junk")} == {"malformed message",
                                                                                    "message too large"}
    assert st["state"] == "running" and not st["status"].startswith("xxx")


def test_foreign_sender_is_dropped(sockvisor: Sockvisor) -> None:
    """READY=1 and FDSTORE=1 sent to a unit's notify socket by a non-child are dropped and their fds closed."""
    _unit(sockvisor, "own", "show-socket no-ready")
    sockvisor.start()
    shown = wait_for(lambda: [e for e in sockvisor.find("status_changed", unit="own")
                              if e["status"].startswith("socket=@")], what="the child's NOTIFY_SOCKET")
    address = "\0" + shown[0]["status"].removeprefix("socket=@")
    r, w = os.pipe()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1\nSTATUS=forged", address)
        s.sendmsg([b"FDSTORE=1"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]).tobytes())],
                  0, address)
    os.close(w)
    assert os.read(r, 1) == b"", "the daemon closed the foreign fd"
    os.close(r)
    dropped = sockvisor.wait_event("notify_dropped", unit="own", sender=os.getpid())
    assert dropped["reason"] == "sender is not a child of this unit"
    st = wait_for(lambda: (s := sockvisor.unit_status("own"))["notify"]["dropped"] and s, what="the drop count")
    assert st["notify"]["dropped"] == {"sender is not a child of this unit": 2}
    assert st["state"] == "starting" and st["status"].startswith("socket=")
    assert not sockvisor.find("fd_stored", unit="own")
