"""mode: accept under a queue of connections: children start side by side, and the count the policy grants holds.

The child program checks in on a unix socket the test listens on and then blocks until the
test answers, which it does only once every expected child has checked in. So a daemon that
waited for one child (its exec or its exit) before starting the next would leave the test
waiting on its bounded accept() timeout, not pass by luck. Both accept paths are covered: the
batch path in C (no rule looks at the peer) and the per-connection path (``allow`` set).
"""

from __future__ import annotations

import socket
import sys
import textwrap
from pathlib import Path

import pytest

from supervisor.policy import Gate, Policy, _Matcher
from tests.conftest import Sockvisor, connect

PY = sys.executable
TIMEOUT = 20.0  # every wait below is bounded by this

# Checks in with its pid, waits for the test's word, sends it to the client with its pid.
MEET = textwrap.dedent("""\
    import os, socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(sys.argv[1])
    s.sendall(b"%d\\n" % os.getpid())
    word = s.makefile("rb").readline()
    conn = 3 if os.environ.get("LISTEN_FDS") == "1" else 1
    os.write(conn, word.strip() + b" %d\\n" % os.getpid())
""")


def _read_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _meeting(tmp: Path) -> tuple[Path, socket.socket]:
    """The child program and the socket its children check in on."""
    prog = tmp / "meet.py"
    prog.write_text(MEET)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp / "meet.sock"))
    server.listen(64)
    server.settimeout(TIMEOUT)
    return prog, server


def _check_in(server: socket.socket, n: int) -> list[tuple[socket.socket, int]]:
    """Wait (bounded) until ``n`` children have checked in; their sockets and pids."""
    got = []
    for _ in range(n):
        conn, _ = server.accept()
        conn.settimeout(TIMEOUT)
        got.append((conn, int(conn.makefile("rb").readline())))
    return got


UNITS = {
    # No rule looks at a peer: the batch path (accept and spawn in one call into C).
    "batch-stdio": "pass: stdio",
    "batch-fds": "pass: fds",
    # allow is decided per connection: the Python path, with its helper spawn thread.
    "each-stdio": 'pass: stdio\nallow: ["127.0.0.0/8"]',
}


@pytest.mark.parametrize("style", sorted(UNITS))
def test_two_queued_connections_have_children_running_at_once(sockvisor: Sockvisor, port: int, short_tmp: Path,
                                                              style: str) -> None:
    """Two connections queued together each get a child before either child may finish (no spawn waits for another)."""
    prog, server = _meeting(short_tmp)
    sockvisor.unit("meet", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: accept
        {UNITS[style].replace(chr(10), chr(10) + "        ")}
        exec: [{PY}, {prog}, {short_tmp / "meet.sock"}]
    """)
    sockvisor.start()
    with server:
        clients = [connect(port, timeout=TIMEOUT) for _ in range(2)]
        children = _check_in(server, 2)  # both are alive and blocked: they started side by side
        assert len({pid for _, pid in children}) == 2
        for conn, _ in children:
            conn.sendall(b"both\n")
            conn.close()
        replies = sorted(_read_all(c) for c in clients)
    pids = sorted(pid for _, pid in children)
    assert sorted(int(r.split()[1]) for r in replies) == pids
    assert all(r.startswith(b"both ") for r in replies)
    for pid in pids:
        sockvisor.wait_event("child_exited", unit="meet", pid=pid)
    for c in clients:
        c.close()


def test_a_burst_gets_all_its_children_at_once(sockvisor: Sockvisor, port: int, short_tmp: Path) -> None:
    """Twelve connections queued at once all have live children together: the batch spawns every one it accepted."""
    prog, server = _meeting(short_tmp)
    sockvisor.unit("burst", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: accept
        exec: [{PY}, {prog}, {short_tmp / "meet.sock"}]
    """)
    sockvisor.start()
    with server:
        clients = [connect(port, timeout=TIMEOUT) for _ in range(12)]
        children = _check_in(server, 12)
        assert sockvisor.unit_status("burst")["connections"]["active"] == 12
        for conn, _ in children:
            conn.sendall(b"go\n")
            conn.close()
        replies = [_read_all(c) for c in clients]
    assert all(r.startswith(b"go ") for r in replies)
    for c in clients:
        c.close()


def test_max_connections_caps_a_queued_burst(sockvisor: Sockvisor, port: int, short_tmp: Path) -> None:
    """Five queued, max_connections: 3: three children run, the others start only as those exit, none refused."""
    prog, server = _meeting(short_tmp)
    sockvisor.unit("cap", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: accept
        max_connections: 3
        exec: [{PY}, {prog}, {short_tmp / "meet.sock"}]
    """)
    sockvisor.start()
    with server:
        clients = [connect(port, timeout=TIMEOUT) for _ in range(5)]
        first = _check_in(server, 3)
        st = sockvisor.unit_status("cap")["connections"]
        assert st["active"] == 3 and st["accepted"] == 3
        for conn, _ in first[:2]:
            conn.sendall(b"go\n")
            conn.close()
        rest = _check_in(server, 2)  # the two exits opened two places
        for conn, _ in [*first[2:], *rest]:
            conn.sendall(b"go\n")
            conn.close()
        replies = [_read_all(c) for c in clients]
    assert all(r.startswith(b"go ") for r in replies)
    st = sockvisor.unit_status("cap")["connections"]
    assert st["accepted"] == 5 and st["refused"] == 0
    for c in clients:
        c.close()


# ---------------------------------------------------------------- the policy's grant, pure


def _policy(max_connections: int = 10, rate: float | None = None, burst: float = 0.0) -> Policy:
    none = _Matcher((), frozenset())
    return Policy(max_connections=max_connections, per_source=None, rate=rate, burst=burst, allow=none,
                  deny=none, tokens=burst)


@pytest.mark.parametrize(("max_connections", "active", "cap", "expected"), [
    (10, 0, 32, 10),  # the places left
    (100, 0, 32, 32),  # the batch size
    (3, 3, 32, 0),  # full: accepting pauses until an exit
    (3, 5, 32, 0),  # over (a reload lowered the limit): nothing, not a negative count
])
def test_budget_is_the_places_left(max_connections: int, active: int, cap: int, expected: int) -> None:
    """budget grants min(places left, cap) and never a negative count."""
    policy = _policy(max_connections)
    policy.active = active
    assert policy.budget(0.0, cap) == expected


def test_budget_follows_the_rate_tokens() -> None:
    """With a rate, budget grants whole tokens only, and admit_many spends them as admit would."""
    policy = _policy(rate=10.0, burst=5.0)
    assert policy.budget(0.0, 32) == 5
    policy.admit_many(5, 0.0)
    assert policy.active == 5 and policy.budget(0.0, 32) == 0
    assert policy.accepting(0.0) is not Gate.OPEN  # the caller pauses until the next token
    assert policy.budget(0.25, 32) == 2  # 2.5 tokens refilled: two whole ones
    for _ in range(5):
        policy.release(None)
    assert policy.active == 0


def test_peer_rules_need_a_decision_each() -> None:
    """A unit with allow/deny, per-source limits or access times is never admitted in bulk."""
    policy = _policy()
    assert not policy.decides_each
    policy.windows = ((0, 60),)
    assert policy.decides_each
    policy = _policy()
    policy.per_source = 2
    assert policy.decides_each
