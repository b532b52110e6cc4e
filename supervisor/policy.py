"""Per-connection policy for ``mode: accept``, as pure decisions.

Theory of operation
-------------------
xinetd's per-connection controls, decided without touching a socket or a
clock: the accept loop asks ``Policy.admit(peer, now)`` for each accepted
connection and ``Policy.accepting(now)`` before it accepts more.

- ``max_connections``: concurrent children. At the limit the daemon stops
  accepting (``accepting`` says when to look again: never by time, only when
  a child exits), so clients wait in the kernel's backlog instead of being
  refused, as systemd's ``MaxConnections=`` does not but xinetd's
  ``instances`` effectively does.
- ``max_connections_per_source``: an over-limit connection is closed at once
  (xinetd ``per_source``).
- ``rate``: a token bucket. When it is empty the daemon *pauses accepting*
  until the next token is due; it never disables the unit (unlike xinetd's
  ``cps``, which turns a burst into a long outage, or systemd's trigger
  limit, which fails the socket for good).
- ``allow``/``deny``: deny wins; an empty ``allow`` allows everyone. Unix
  peers match ``uid:N`` entries only.

Everything is O(1) per connection except allow/deny, which is O(entries).

Admitting in bulk: when no rule looks at the peer or the clock of day
(``decides_each`` is False), a connection's fate depends only on the counts,
so ``budget(now, cap)`` says how many may be admitted right now and
``admit_many(n, now)`` counts the ones that were. The accept path then lets C
accept and spawn that many in one call without asking again per connection;
the decision is still made here, once per batch.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from supervisor.model import Network, Unit

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Refusal(enum.Enum):
    # The reason words of SPEC section 8: the same in the log, status and metrics.
    DENIED = "deny"  # matched deny, or no allow entry
    PER_SOURCE = "per_source"
    ACCESS_TIMES = "access_times"  # outside every access_times window


class Gate(enum.Enum):
    """Whether a unit may accept now (the answer of ``Policy.accepting`` when it is not a time)."""

    OPEN = "open"
    AT_EXIT = "at_exit"  # max_connections reached: look again when a child exits


@dataclass(frozen=True, slots=True)
class ReopensAt:
    """Over the rate: accept again at loop time ``when``."""

    when: float


@dataclass(slots=True)
class ResourceBackoff:
    """accept() short of fds or memory: pause ``first`` seconds, doubling up to ``cap`` while it lasts.

    One success resets it (xinetd has no equivalent: it disables the service on
    EMFILE; sockvisor pauses the one unit and keeps the listener).
    """

    first: float = 0.1
    cap: float = 2.0
    delay: float = 0.1

    def failed(self) -> float:
        """The pause to take now; the next one is twice as long (up to ``cap``)."""
        delay = self.delay
        self.delay = min(delay * 2, self.cap)
        return delay

    def succeeded(self) -> None:
        self.delay = self.first


@dataclass(frozen=True, slots=True)
class Peer:
    """Who connected: an IP host (``host``), or a unix peer (``uid``)."""

    host: str | None = None
    uid: int | None = None

    @property
    def source(self) -> str:
        """The key for per-source counting."""
        return self.host if self.host is not None else f"uid:{self.uid}"


def normalize_host(host: str) -> str:
    """IPv4-mapped IPv6 (``::ffff:1.2.3.4``) printed as IPv4, as SPEC section 3 asks."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


@dataclass(slots=True)
class _Matcher:
    networks: tuple[IPNetwork, ...]
    uids: frozenset[int]

    @classmethod
    def build(cls, entries: Sequence[Network]) -> _Matcher:
        nets = tuple(ipaddress.ip_network(e.network, strict=False) for e in entries if e.network is not None)
        uids = frozenset(e.uid for e in entries if e.uid is not None)
        return cls(nets, uids)

    def __bool__(self) -> bool:
        return bool(self.networks or self.uids)

    def match(self, peer: Peer) -> bool:
        if peer.uid is not None:
            return peer.uid in self.uids
        if peer.host is None or not self.networks:
            return False
        try:
            addr = ipaddress.ip_address(peer.host.split("%", 1)[0])
        except ValueError:
            return False
        return any(addr in net for net in self.networks)


def in_windows(windows: Sequence[tuple[int, int]], minute: int) -> bool:
    """Whether ``minute`` of the day falls in a window (start inclusive, end exclusive; start > end wraps midnight)."""
    return any((start <= minute < end) if start < end else (minute >= start or minute < end)
               for start, end in windows)


@dataclass(slots=True)
class Policy:
    """Mutable per-unit counters plus the unit's fixed limits; decisions are pure functions of them and ``now``."""

    max_connections: int
    per_source: int | None
    rate: float | None
    burst: float
    allow: _Matcher
    deny: _Matcher
    windows: tuple[tuple[int, int], ...] = ()  # access_times, minutes of the local day
    active: int = 0
    tokens: float = 0.0
    last_refill: float | None = None
    by_source: dict[str, int] = field(default_factory=dict)

    @classmethod
    def for_unit(cls, unit: Unit) -> Policy:
        rate = unit.rate.per_second if unit.rate is not None else None
        burst = float(unit.rate.burst) if unit.rate is not None else 0.0
        return cls(
            max_connections=unit.max_connections,
            per_source=unit.max_connections_per_source,
            rate=rate,
            burst=burst,
            allow=_Matcher.build(unit.allow),
            deny=_Matcher.build(unit.deny),
            windows=unit.access_times,
            tokens=burst,
        )

    @property
    def needs_peer(self) -> bool:
        """Whether decisions look at the peer at all (else the accept path may skip building a Peer)."""
        return bool(self.allow) or bool(self.deny) or self.per_source is not None

    @property
    def decides_each(self) -> bool:
        """Whether every connection needs its own decision (a rule reads the peer or the time of day)."""
        return self.needs_peer or bool(self.windows)

    def budget(self, now: float, cap: int) -> int:
        """How many connections may be admitted now without looking at them, at most ``cap``.

        Meaningful only when ``decides_each`` is False; 0 means accepting should pause
        (``accepting`` says until when).
        """
        n = min(cap, self.max_connections - self.active)
        if n <= 0:
            return 0
        if self.rate is None:
            return n
        self._refill(now)
        return min(n, int(self.tokens)) if self.tokens >= 1.0 else 0

    def admit_many(self, n: int, now: float) -> None:
        """Count ``n`` connections admitted by ``budget`` (each is released like one from ``admit``)."""
        if self.rate is not None:
            self._refill(now)
            self.tokens -= n
        self.active += n

    def unadmit(self, n: int) -> None:
        """Give back ``n`` admissions counted by ``admit_many`` that no connection used (a grant replaced)."""
        if n <= 0:
            return
        self.active -= n
        if self.rate is not None:
            self.tokens = min(self.burst, self.tokens + n)

    def _refill(self, now: float) -> None:
        if self.rate is None:
            return
        if self.last_refill is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.last_refill) * self.rate)
        self.last_refill = now

    def accepting(self, now: float) -> Gate | ReopensAt:
        """``Gate.OPEN`` to accept now; ``ReopensAt(t)`` to resume at t (rate); ``Gate.AT_EXIT`` (a child must exit)."""
        if self.active >= self.max_connections:
            return Gate.AT_EXIT
        if self.rate is None:
            return Gate.OPEN
        self._refill(now)
        if self.tokens >= 1.0:
            return Gate.OPEN
        return ReopensAt(now + (1.0 - self.tokens) / self.rate)

    def admit(self, peer: Peer | None, now: float, minute: int | None = None) -> Refusal | None:
        """Decide one accepted connection: None admits it (and counts it), else the reason to refuse.

        ``minute`` is the minute of the local day (0-1439), needed only with ``windows``.
        """
        if peer is not None:
            if self.deny and self.deny.match(peer):
                return Refusal.DENIED
            if self.allow and not self.allow.match(peer):
                return Refusal.DENIED
        if self.windows and minute is not None and not in_windows(self.windows, minute):
            return Refusal.ACCESS_TIMES
        if peer is not None and self.per_source is not None and self.by_source.get(peer.source, 0) >= self.per_source:
            return Refusal.PER_SOURCE
        if self.rate is not None:
            self._refill(now)
            self.tokens -= 1.0
        self.active += 1
        if peer is not None and self.per_source is not None:
            self.by_source[peer.source] = self.by_source.get(peer.source, 0) + 1
        return None

    def hold(self, peer: Peer | None) -> None:
        """Count a connection admitted before (by the previous image): no rule is applied, no token taken."""
        self.active += 1
        if peer is not None and self.per_source is not None:
            self.by_source[peer.source] = self.by_source.get(peer.source, 0) + 1

    def release(self, peer: Peer | None) -> None:
        """A child admitted with ``peer`` exited."""
        self.active -= 1
        if peer is not None and self.per_source is not None:
            left = self.by_source.get(peer.source, 1) - 1
            if left <= 0:
                self.by_source.pop(peer.source, None)
            else:
                self.by_source[peer.source] = left
