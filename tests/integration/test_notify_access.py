"""Who may speak for a unit on its notify socket, and what a flood or a failure costs.

The attacker is a real unprivileged process (``setpriv`` to nobody) that finds the unit's
abstract socket and sends READY=1, STATUS= and FDSTORE=1 with its own pipe, either exiting at
once (the old "sender already gone" guess credited it to the only child) or staying alive.
The daemon, the services and the floods are real processes; the tests wait on log events.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PROGRAMS, REPO, Sockvisor, connect, free_port, wait_for

PY = sys.executable
DEBIAN_PYTHON = "/usr/bin/python3"
SERVICE = PROGRAMS / "notify_service.py"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
DROP_REASONS = {"sender is gone", "sender is not a child of this unit", "sender's user does not fit"}

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="an unprivileged attacker needs root and setpriv")

# The attacker: sends three forged messages (the last with the write end of a pipe the test
# reads), then either exits at once or waits for its stdin to close.
ATTACKER = r'''
import array, os, socket, sys
address, stay = "\0" + sys.argv[1][1:], sys.argv[2] == "stay"
r, w = os.pipe()
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.sendto(b"STATUS=forged", address)
    s.sendto(b"READY=1\nWATCHDOG=1", address)
    s.sendmsg([b"FDSTORE=1\nFDNAME=injected"],
              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]).tobytes())], 0, address)
os.close(w)
print(os.getpid(), flush=True)
os.read(r, 1)  # EOF once the daemon closed its copy of the write end
print("closed", flush=True)
if stay:
    sys.stdin.read()
'''


def _notify_unit(sv: Sockvisor, name: str, args: str, extra: str = "") -> str:
    """A ready: notify unit running notify_service.py ``args``; returns its NOTIFY_SOCKET once shown."""
    # An unprivileged service user may not reach the test's own interpreter (under /root).
    python = DEBIAN_PYTHON if "user: nobody" in extra and os.access(DEBIAN_PYTHON, os.X_OK) else PY
    argv = ", ".join([python, str(SERVICE), *args.split()])
    sv.unit(name, f"""listen: [{{tcp: "127.0.0.1:{free_port()}", name: x}}]
start: eager
ready: notify
restart_delay: 50ms
exec: [{argv}]
environment: {{PYTHONPATH: "{REPO}"}}
{extra}""")
    sv.start()
    shown = wait_for(lambda: [e for e in sv.find("status_changed", unit=name)
                              if e["status"].startswith("socket=@")], what="the child's NOTIFY_SOCKET")
    return str(shown[0]["status"].removeprefix("socket="))


def _attack(address: str, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*NOBODY, PY, "-c", ATTACKER, address, mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


@needs_root
@pytest.mark.parametrize("unit_user", ["root", "nobody"])
@pytest.mark.parametrize("mode", ["exit", "stay"])
def test_unprivileged_spoof_is_dropped(sockvisor: Sockvisor, mode: str, unit_user: str) -> None:
    """As nobody, forged READY=1, STATUS= and FDSTORE=1 (sender exiting or staying) change nothing, are counted."""
    user = "user: nobody\n" if unit_user == "nobody" else ""
    address = _notify_unit(sockvisor, "victim", "show-socket no-ready", f"start_timeout: 30s\n{user}")
    attacker = _attack(address, mode)
    assert attacker.stdout is not None
    attacker.stdout.readline()
    assert attacker.stdout.readline().strip() == "closed", "the daemon closed the injected fd"
    st = wait_for(lambda: sum((s := sockvisor.unit_status("victim"))["notify"]["dropped"].values()) >= 3 and s,
                  what="three counted drops")
    attacker.communicate(timeout=10)
    # Against a root unit nobody's uid alone disqualifies it; against a nobody unit it is not in the tree.
    expected = {"sender's user does not fit"} if unit_user == "root" else DROP_REASONS
    assert set(st["notify"]["dropped"]) <= expected, st["notify"]["dropped"]
    assert st["state"] == "starting"
    assert st["status"].startswith("socket=")
    assert not sockvisor.find("fd_stored", unit="victim")
    assert not sockvisor.find("child_ready", unit="victim")
    # The injected fd never reaches the service: a restart would show it in LISTEN_FDNAMES.
    sockvisor.cli("restart", "victim", check=True)
    sockvisor.wait_event("child_started", unit="victim", count=2)
    assert not sockvisor.find("fd_stored", unit="victim")


@needs_root
def test_barrier_is_answered_for_any_sender(sockvisor: Sockvisor) -> None:
    """BARRIER=1 with one fd gets its reply (the fd closed) even from a foreign sender, and is not counted as a drop."""
    address = _notify_unit(sockvisor, "bar", "show-socket")
    code = (r'''import array, os, socket, sys
r, w = os.pipe()
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.sendmsg([b"BARRIER=1"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]).tobytes())],
              0, "\0" + sys.argv[1][1:])
os.close(w)
assert os.read(r, 1) == b""
''')
    subprocess.run([*NOBODY, PY, "-c", code, address], check=True, timeout=10)
    assert sockvisor.unit_status("bar")["notify"]["dropped"] == {}


@pytest.mark.skipif(not os.access("/usr/bin/systemd-notify", os.X_OK), reason="needs systemd-notify")
def test_systemd_notify_no_block_from_an_exited_sender_is_dropped(sockvisor: Sockvisor, short_tmp: Path) -> None:
    """systemd-notify --no-block as an unprivileged user exits before the read: dropped (documented trade-off)."""
    script = short_tmp / "svc.sh"
    script.write_text("#!/bin/sh\n/usr/bin/systemd-notify --no-block --status=unverified\n"
                      "/usr/bin/systemd-notify --ready --status=verified\nexec sleep 1000\n")
    script.chmod(0o755)
    sockvisor.unit("nb", f"""
        listen: [{{tcp: "127.0.0.1:{free_port()}"}}]
        start: eager
        ready: notify
        user: nobody
        exec: [{script}]
    """)
    sockvisor.start()
    sockvisor.wait_event("child_ready", unit="nb")
    st = sockvisor.unit_status("nb")
    assert st["status"] == "verified"
    # The --no-block sender may still be alive when read (then it counts); if gone, it is dropped.
    assert set(st["notify"]["dropped"]) <= {"sender is gone"}
    # Either it was read while alive (credited) or it was dropped; never both, never neither.
    credited = bool(sockvisor.find("status_changed", unit="nb", status="unverified"))
    assert credited != bool(st["notify"]["dropped"])


def _cpu(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        rest = f.read().rsplit(b")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def test_notify_flood_costs_bounded_cpu_and_log(sockvisor: Sockvisor) -> None:
    """A child flooding its notify socket 3 s costs the daemon < 0.5 s CPU a second; status fast; log bounded."""
    seconds = 3.0
    other = free_port()
    sockvisor.unit("other", f"""
        listen: [{{tcp: "127.0.0.1:{other}"}}]
        mode: accept
        exec: [/bin/echo, hi]
    """)
    sockvisor.unit("flood", f"""
        listen: [{{tcp: "127.0.0.1:{free_port()}"}}]
        start: eager
        ready: notify
        exec: [{PY}, {PROGRAMS}/notify_flood.py, "{seconds}"]
        environment: {{PYTHONPATH: "{REPO}"}}
    """)
    sockvisor.start()
    assert sockvisor.proc is not None
    daemon = sockvisor.proc.pid
    sockvisor.wait_event("child_ready", unit="flood")
    cpu0, t0, log0 = _cpu(daemon), time.monotonic(), sum(len(x) + 1 for x in list(sockvisor.raw))
    slowest = 0.0
    while time.monotonic() - t0 < seconds:  # bounded: the flood's own length
        started = time.monotonic()
        sockvisor.status("flood")
        slowest = max(slowest, time.monotonic() - started)
        with connect(other) as c:
            assert c.recv(16) == b"hi\n"
    done = wait_for(lambda: (s := sockvisor.unit_status("flood"))["status"].startswith("done") and s,
                    timeout=20, what="the end of the flood")
    cpu = _cpu(daemon) - cpu0
    elapsed = time.monotonic() - t0
    log_bytes = sum(len(x) + 1 for x in list(sockvisor.raw)) - log0
    sent = int(done["status"].split("=")[1])
    print(f"flood: sent={sent} elapsed={elapsed:.2f}s daemon_cpu={cpu:.3f}s ({cpu / elapsed:.3f}/s) "
          f"status_max={slowest:.3f}s log_bytes={log_bytes} paused={done['notify']['paused']}")
    assert cpu / elapsed < 0.5, cpu
    assert slowest < 0.5, slowest
    assert done["notify"]["paused"] > 0
    # At most RATE messages a second are handled (two debug lines each), plus summaries.
    assert log_bytes < 150_000 * elapsed, log_bytes


STORE_AND_FAIL = PROGRAMS / "store_and_fail.py"


def _store_and_fail_unit(sv: Sockvisor, port: int, start: str) -> None:
    sv.unit("keeper", f"""
        listen: [{{tcp: "127.0.0.1:{port}", name: web}}]
        start: {start}
        ready: notify
        restart: on-failure
        restart_delay: 50ms
        fd_store_max: 4
        exec: [{PY}, {STORE_AND_FAIL}]
        environment: {{PYTHONPATH: "{REPO}"}}
    """)


@pytest.mark.parametrize("start", ["on-demand", "eager"])
def test_stored_connection_is_answered_by_the_restarted_service(sockvisor: Sockvisor, start: str) -> None:
    """A service that stores a client connection and fails is started again after back-off (SPEC 7), answers it."""
    port = free_port()
    _store_and_fail_unit(sockvisor, port, start)
    sockvisor.start()
    with connect(port) as client:
        client.sendall(b"first\n")
        sockvisor.wait_event("fd_stored", unit="keeper")
        client.sendall(b"second\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = client.recv(256)
            assert chunk, "the stored connection was closed unanswered"
            reply += chunk
    words = reply.decode().split()
    assert words[0] == "answered" and words[2] == "second", reply
    first = sockvisor.find("child_exited", unit="keeper")[0]
    assert int(words[1]) != first["pid"], "a new process answered"


def test_stop_releases_the_fd_store(sockvisor: Sockvisor) -> None:
    """`sockvisor stop` closes a unit's stored fds (systemd's FileDescriptorStorePreserve=no): the client sees EOF."""
    port = free_port()
    sockvisor.unit("keeper", f"""
        listen: [{{tcp: "127.0.0.1:{port}", name: web}}]
        ready: notify
        restart: never
        fd_store_max: 4
        exec: [{PY}, {STORE_AND_FAIL}]
        environment: {{PYTHONPATH: "{REPO}"}}
    """)
    sockvisor.start()
    with connect(port) as client:
        client.sendall(b"first\n")
        sockvisor.wait_event("fd_stored", unit="keeper")
        sockvisor.wait_event("child_exited", unit="keeper")
        assert sockvisor.unit_status("keeper")["fd_store"], "the connection is held in the store"
        sockvisor.cli("stop", "keeper", check=True)
        sockvisor.wait_event("fd_store_released", unit="keeper")
        assert client.recv(16) == b"", "the daemon's copy was closed: EOF"
    assert not sockvisor.unit_status("keeper")["fd_store"]


def test_restart_always_with_an_instant_exit_backs_off(sockvisor: Sockvisor) -> None:
    """restart: always with /bin/true doubles its delay: in 2 s at 50 ms it spawns about 6 times, not 40."""
    sockvisor.unit("quick", f"""
        listen: [{{tcp: "127.0.0.1:{free_port()}"}}]
        start: eager
        restart: always
        restart_delay: 50ms
        exec: [/bin/true]
    """)
    sockvisor.start()
    t0 = time.monotonic()
    sockvisor.wait_event("restart_scheduled", unit="quick", count=5, timeout=20)
    # 50+100+200+400 ms of back-off came before the fifth exit.
    assert time.monotonic() - t0 >= 0.7
    delays = [e["delay"] for e in sockvisor.find("restart_scheduled", unit="quick")][:5]
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.8], delays
