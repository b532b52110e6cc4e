"""Per-connection policy of ``mode: accept``: limits, rate, allow/deny, decided without a socket or a clock."""

from __future__ import annotations

import socket

import pytest

from supervisor.model import InetAddress, Listen, ListenKind, Mode, Network, Process, Rate, Unit
from supervisor.policy import Gate, Peer, Policy, Refusal, ReopensAt, ResourceBackoff, normalize_host


def make_policy(**overrides: object) -> Policy:
    """The policy of an accept unit; keyword arguments override Unit fields."""
    listen = (Listen(ListenKind.TCP, InetAddress("127.0.0.1", 7000, socket.AF_INET), "echo"),)
    unit = Unit(name="echo", listen=listen, process=Process(exec=("/bin/cat",)), mode=Mode.ACCEPT,
                **overrides)  # type: ignore[arg-type]
    return Policy.for_unit(unit)


def net(text: str) -> Network:
    """An allow/deny entry as config builds it: a CIDR, or uid:N."""
    if text.startswith("uid:"):
        return Network(text, uid=int(text[4:]))
    return Network(text, network=text)


def host(text: str) -> Peer:
    return Peer(host=text)


# ---------------------------------------------------------------- max_connections


def test_max_connections_pauses_accepting_until_a_release() -> None:
    """At max_connections accepting() is AT_EXIT (wait for an exit, not a time); a release opens it again."""
    policy = make_policy(max_connections=2)
    assert policy.accepting(0.0) is Gate.OPEN
    assert policy.admit(None, 0.0) is None
    assert policy.accepting(0.0) is Gate.OPEN
    assert policy.admit(None, 0.0) is None
    assert policy.active == 2
    assert policy.accepting(0.0) is Gate.AT_EXIT
    assert policy.accepting(1e9) is Gate.AT_EXIT  # time alone never resumes it
    policy.release(None)
    assert policy.active == 1
    assert policy.accepting(1.0) is Gate.OPEN


# ---------------------------------------------------------------- per source


def test_per_source_cap_refuses_and_frees_on_release() -> None:
    """A source at its cap is refused with PER_SOURCE without being counted; its release frees a place."""
    policy = make_policy(max_connections_per_source=2)
    a, b = host("10.0.0.1"), host("10.0.0.2")
    assert policy.admit(a, 0.0) is None
    assert policy.admit(a, 0.0) is None
    assert policy.admit(a, 0.0) is Refusal.PER_SOURCE
    assert policy.active == 2
    assert policy.admit(b, 0.0) is None  # other sources are not affected
    policy.release(a)
    assert policy.admit(a, 0.0) is None
    assert policy.admit(a, 0.0) is Refusal.PER_SOURCE


def test_per_source_counts_drop_to_nothing() -> None:
    """Releasing a source's last connection forgets the source, so the table does not grow with every client."""
    policy = make_policy(max_connections_per_source=1)
    for i in range(5):
        peer = host(f"192.0.2.{i}")
        assert policy.admit(peer, 0.0) is None
        policy.release(peer)
    assert policy.by_source == {}
    assert policy.active == 0


def test_per_source_counts_unix_peers_by_uid() -> None:
    """Unix peers are counted per uid, separately from each other."""
    policy = make_policy(max_connections_per_source=1)
    assert policy.admit(Peer(uid=1000), 0.0) is None
    assert policy.admit(Peer(uid=1000), 0.0) is Refusal.PER_SOURCE
    assert policy.admit(Peer(uid=1001), 0.0) is None


@pytest.mark.parametrize(("peer", "source"), [
    (Peer(host="10.0.0.1"), "10.0.0.1"),
    (Peer(host="::1"), "::1"),
    (Peer(uid=0), "uid:0"),
])
def test_peer_source_key(peer: Peer, source: str) -> None:
    """The per-source key is the host for IP peers and uid:N for unix peers."""
    assert peer.source == source


# ---------------------------------------------------------------- rate


def test_rate_allows_burst_then_pauses_until_next_token() -> None:
    """After burst admissions accepting() says when the next token is due, and OPEN from then on."""
    policy = make_policy(rate=Rate(per_second=2.0, burst=3))
    assert policy.accepting(10.0) is Gate.OPEN
    for _ in range(3):
        assert policy.admit(None, 10.0) is None
    assert policy.accepting(10.0) == ReopensAt(pytest.approx(10.5))
    assert policy.accepting(10.25) == ReopensAt(pytest.approx(10.5))  # half a token refilled meanwhile
    assert policy.accepting(10.5) is Gate.OPEN


def test_rate_refill_is_capped_at_burst() -> None:
    """A long quiet period refills at most burst tokens."""
    policy = make_policy(rate=Rate(per_second=10.0, burst=2))
    assert policy.admit(None, 0.0) is None
    assert policy.admit(None, 0.0) is None
    for _ in range(2):
        assert policy.accepting(1000.0) is Gate.OPEN
        assert policy.admit(None, 1000.0) is None
    assert policy.accepting(1000.0) == ReopensAt(pytest.approx(1000.1))


def test_rate_refills_with_now() -> None:
    """Tokens come back at per_second: one every 1/per_second seconds of ``now``."""
    policy = make_policy(rate=Rate(per_second=4.0, burst=1))
    now, admitted = 0.0, 0
    while now < 10.0:
        gate = policy.accepting(now)
        assert gate is not Gate.AT_EXIT
        if gate is Gate.OPEN:
            assert policy.admit(None, now) is None
            admitted += 1
        else:
            assert isinstance(gate, ReopensAt) and gate.when > now
            now = gate.when
    assert admitted == pytest.approx(1 + 4 * 10, abs=1)


@pytest.mark.parametrize("rate", [Rate(per_second=0.5, burst=1), Rate(per_second=100.0, burst=50)])
@pytest.mark.parametrize("overshoot", [0, 1, 20])
def test_rate_never_refuses_for_good(rate: Rate, overshoot: int) -> None:
    """However far a burst overshoots, accepting() names a finite time after which it accepts again."""
    policy = make_policy(rate=rate)
    for _ in range(rate.burst + overshoot):
        policy.admit(None, 0.0)
    gate = policy.accepting(0.0)
    assert isinstance(gate, ReopensAt) and gate.when > 0.0
    assert policy.accepting(gate.when) is Gate.OPEN


def test_rate_does_not_count_refused_connections() -> None:
    """A refused connection consumes no token and no connection slot."""
    policy = make_policy(rate=Rate(per_second=1.0, burst=1), deny=(net("10.0.0.0/8"),))
    assert policy.admit(host("10.1.1.1"), 0.0) is Refusal.DENIED
    assert policy.active == 0
    assert policy.accepting(0.0) is Gate.OPEN


def test_max_connections_wins_over_rate() -> None:
    """At the connection limit accepting() waits for an exit even when tokens are available."""
    policy = make_policy(max_connections=1, rate=Rate(per_second=1.0, burst=5))
    policy.admit(None, 0.0)
    assert policy.accepting(0.0) is Gate.AT_EXIT


# ---------------------------------------------------------------- allow / deny


@pytest.mark.parametrize(("allow", "deny", "peer", "refusal"), [
    ((), (), host("203.0.113.9"), None),
    ((), (), Peer(uid=0), None),
    (("10.0.0.0/8",), (), host("10.200.0.1"), None),
    (("10.0.0.0/8",), (), host("11.0.0.1"), Refusal.DENIED),
    (("192.0.2.7/32",), (), host("192.0.2.7"), None),
    (("192.0.2.7/32",), (), host("192.0.2.8"), Refusal.DENIED),
    (("2001:db8::/32",), (), host("2001:db8:1::5"), None),
    (("2001:db8::/32",), (), host("2001:db9::5"), Refusal.DENIED),
    (("fe80::/10",), (), host("fe80::1%eth0"), None),  # scope id ignored
    (("10.0.0.0/8",), (), host(normalize_host("::ffff:10.1.2.3")), None),
    (("10.0.0.0/8",), (), host("2001:db8::1"), Refusal.DENIED),  # v6 peer never in a v4 net
    (("::/0",), (), host("10.0.0.1"), Refusal.DENIED),  # nor a v4 peer in a v6 net
    ((), ("10.0.0.0/8",), host(normalize_host("::ffff:10.9.9.9")), Refusal.DENIED),
    ((), ("10.0.0.0/8",), host("172.16.0.1"), None),
    ((), ("2001:db8::/32",), host("2001:db8::1"), Refusal.DENIED),
    (("10.0.0.0/8",), ("10.0.0.5/32",), host("10.0.0.5"), Refusal.DENIED),  # deny wins
    (("10.0.0.0/8",), ("10.0.0.5/32",), host("10.0.0.6"), None),
    (("uid:1000",), (), Peer(uid=1000), None),
    (("uid:1000",), (), Peer(uid=0), Refusal.DENIED),
    ((), ("uid:0",), Peer(uid=0), Refusal.DENIED),
    ((), ("uid:0",), Peer(uid=1), None),
    (("uid:0", "uid:1000"), ("uid:1000",), Peer(uid=1000), Refusal.DENIED),  # deny wins for uids too
    (("10.0.0.0/8",), (), Peer(uid=1000), Refusal.DENIED),  # unix peers match uid entries only
    (("uid:1000",), (), host("10.0.0.1"), Refusal.DENIED),  # IP peers never match uid entries
    (("0.0.0.0/0",), (), host("not-an-address"), Refusal.DENIED),
])
def test_allow_deny(allow: tuple[str, ...], deny: tuple[str, ...], peer: Peer, refusal: Refusal | None) -> None:
    """Deny wins over allow, an empty allow allows everyone, and IP and uid entries apply to their own peers."""
    policy = make_policy(allow=tuple(map(net, allow)), deny=tuple(map(net, deny)))
    assert policy.admit(peer, 0.0) is refusal
    assert policy.active == (1 if refusal is None else 0)


def test_allow_accepts_non_strict_cidr() -> None:
    """A CIDR with host bits set (10.1.2.3/8) matches its whole network, as config normalises it."""
    policy = make_policy(allow=(Network("10.1.2.3/8", network="10.1.2.3/8"),))
    assert policy.admit(host("10.9.9.9"), 0.0) is None


@pytest.mark.parametrize(("raw", "normal"), [
    ("::ffff:192.0.2.1", "192.0.2.1"),
    ("192.0.2.1", "192.0.2.1"),
    ("::1", "::1"),
    ("2001:db8::ffff:1", "2001:db8::ffff:1"),
    ("::ffff:c000:201", "::ffff:c000:201"),  # not the dotted form the kernel prints; left alone
])
def test_normalize_host(raw: str, normal: str) -> None:
    """IPv4-mapped IPv6 peers are printed and matched as IPv4; every other address is unchanged."""
    assert normalize_host(raw) == normal


@pytest.mark.parametrize(("overrides", "needed"), [
    ({}, False),
    ({"rate": Rate(per_second=1.0, burst=1)}, False),
    ({"max_connections_per_source": 3}, True),
    ({"allow": (net("10.0.0.0/8"),)}, True),
    ({"deny": (net("uid:0"),)}, True),
])
def test_needs_peer(overrides: dict[str, object], needed: bool) -> None:
    """The accept path builds a Peer only when allow, deny or a per-source cap will look at it."""
    assert make_policy(**overrides).needs_peer is needed


# ---------------------------------------------------------------- resource back-off


def test_resource_backoff_doubles_to_its_cap_and_one_success_resets_it() -> None:
    """EMFILE/ENOMEM on accept(): 0.1 s, 0.2, 0.4, ... capped at 2 s; an accept that works starts over."""
    backoff = ResourceBackoff()
    assert [backoff.failed() for _ in range(7)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    backoff.succeeded()
    assert backoff.failed() == 0.1
