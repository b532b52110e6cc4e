"""Under systemd: the real systemd-socket-activate binds the sockets and execs `sockvisor run`, which adopts them.

systemd-socket-activate (Debian's systemd package) listens, waits for the first
connection on any socket, then execs the command in its own process with
``LISTEN_FDS``/``LISTEN_PID``: exactly what a ``.socket`` unit does for a
``Type=notify`` service. The daemon must serve the socket it inherited (same
process, same inode, no second bind) and close the inherited one nothing
configures.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

from tests.conftest import Sockvisor, connect, free_port, roundtrip, wait_for
from tests.integration.reload_helpers import daemon_listener, listen_inode, socket_inodes

ACTIVATE = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"

pytestmark = pytest.mark.skipif(not os.access(ACTIVATE, os.X_OK),
                                reason="systemd-socket-activate (Debian package systemd) is not installed")


def test_inherited_sockets_are_adopted_and_the_stray_one_closed(sockvisor: Sockvisor, short_tmp: Path) -> None:
    """Matching inherited sockets are adopted (same pid, same inode, no bind), others bound, the stray one closed."""
    port, stray, own = free_port(), free_port(), free_port()
    sockvisor.unit("hello", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: accept
        exec: [/bin/echo, hello]
    """)
    sockvisor.unit("other", f"""
        listen: [{{tcp: "127.0.0.1:{own}"}}]
        mode: accept
        exec: [/bin/echo, other]
    """)
    argv = [ACTIVATE, "-l", f"127.0.0.1:{port}", "-l", f"127.0.0.1:{stray}", "--fdname", "web:stray",
            sys.executable, "-m", "supervisor", "run", "--config", str(sockvisor.config)]
    sockvisor.start(argv=argv, wait=False)
    assert sockvisor.proc is not None
    pid = sockvisor.proc.pid
    wait_for(lambda: listen_inode(port) and listen_inode(stray), what="systemd-socket-activate to listen")
    created = socket_inodes(pid)
    assert created[3] == listen_inode(port) and created[4] == listen_inode(stray)

    with connect(port) as first:  # the first connection makes systemd-socket-activate exec the daemon
        ready = sockvisor.wait_event("daemon_ready", timeout=30)
        first.shutdown(socket.SHUT_WR)
        assert first.recv(64) == b"hello\n", "the connection that triggered the exec is served from the backlog"

    assert ready["pid"] == pid, "the daemon is the process systemd-socket-activate exec'd"
    adopted = sockvisor.wait_event("socket_adopted", unit="hello")
    assert (adopted["fd"], adopted["fdname"], adopted["listen"]) == (3, "web", f"tcp:127.0.0.1:{port}")
    assert sockvisor.find("socket_bound", unit="hello") == []
    assert sockvisor.find("socket_bound", unit="other")[0]["listen"] == f"tcp:127.0.0.1:{own}"
    unmatched = sockvisor.wait_event("inherited_fd_unmatched")
    assert (unmatched["fd"], unmatched["fdname"], unmatched["address"]) == (4, "stray", f"127.0.0.1:{stray}")

    assert daemon_listener(pid, port) == (3, created[3]), "still the very socket systemd-socket-activate bound"
    assert listen_inode(stray) is None, "the unmatched inherited socket was closed"
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", stray))
    assert roundtrip(port) == b"hello\n"
    assert roundtrip(own) == b"other\n"
    units = {u["name"]: u for u in sockvisor.status()["units"]}
    assert units["hello"]["connections"]["accepted"] == 2


def test_adopted_socket_survives_a_reload(sockvisor: Sockvisor) -> None:
    """A reload that changes the adopting unit's command keeps the inherited socket (its fd and inode)."""
    port = free_port()
    sockvisor.unit("hello", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: accept
        exec: [/bin/echo, hello]
    """)
    argv = [ACTIVATE, "-l", f"127.0.0.1:{port}",
            sys.executable, "-m", "supervisor", "run", "--config", str(sockvisor.config)]
    sockvisor.start(argv=argv, wait=False)
    assert sockvisor.proc is not None
    wait_for(lambda: listen_inode(port), what="systemd-socket-activate to listen")
    inherited = socket_inodes(sockvisor.proc.pid)[3]
    assert roundtrip(port) == b"hello\n"
    sockvisor.wait_event("socket_adopted", unit="hello")
    sockvisor.unit("hello", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: accept
        exec: [/bin/echo, again]
    """)
    sockvisor.cli("reload", check=True)
    assert roundtrip(port) == b"again\n"
    assert daemon_listener(sockvisor.proc.pid, port) == (3, inherited)
