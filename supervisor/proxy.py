"""``mode: proxy``: socket activation for a daemon that cannot take fds.

Theory of operation
-------------------
The daemon accepts the clients itself (with every accept-mode policy:
``Policy`` decides admission exactly as for ``mode: accept``), connects each
one to the backend and forwards the bytes (``supervisor.relay``: splice, on
the loop). The backend, when the unit has ``exec``, lives in one lifecycle
slot (``service.SlotDriver`` over the pure ``lifecycle`` core), so it starts,
restarts with back-off, stops and is killed exactly as a ``mode: service``
process; without ``exec`` the unit only forwards.

A client is never refused because the backend is not up yet. It *waits*
(``Waiter``): the first waiting client starts the backend (a cold start);
while the backend starts, each waiter tries to connect with a growing delay
(``retry_delay``: 5 ms doubling to 250 ms); the first success means the
backend is ready (``ready: exec``: nothing else tells a proxy that a daemon
which cannot take fds is listening). With ``ready: notify`` no connect is tried
before ``READY=1``. A waiter that is not through ``start_timeout`` after it
was accepted is closed with the reason ``backend_unavailable``.

With ``idle_stop``, the backend is stopped once no client has been connected
or waiting for that long (``idle_due``), back to ``listening``: the next
client starts it again.

A udp listener forwards each client's datagrams over its own connected socket
to the backend (a *flow*) and sends the replies back from the listener. Flows
end after ``udp_idle`` without a datagram; at ``max_connections`` flows the
oldest one is ended for a new client (as conntrack does), never the new one.
Datagrams that arrive while the backend is not running are queued per flow (a
few) and sent when it is.

``stop``, ``restart``, a reload that removes the unit and the daemon's
shutdown stop accepting, close waiting clients (reason ``stopping``), let open
connections finish for ``stop_timeout``, close what is left, and then stop the
backend.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import ipaddress
import os
import select
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from supervisor import handover, lifecycle, sockets, spawn
from supervisor.accept import RESOURCE_ERRNOS, _local_minute, _send_banner
from supervisor.lifecycle import SlotState
from supervisor.model import InetAddress, ListenKind, ProxyProtocol, Start, Unit
from supervisor.policy import Gate, Peer, Policy, ReopensAt, ResourceBackoff, normalize_host
from supervisor.relay import Poller, Relays
from supervisor.service import SlotDriver
from supervisor.status import ProxyStatus, UnitStatus
from supervisor.units import Deadline, Host, UnitRuntime, UnitState, kill_group

ACCEPT_BATCH = 32
RETRY_FIRST = 0.001  # first wait before connecting to a starting backend again
RETRY_MAX = 0.25
UDP_QUEUE = 16  # datagrams kept per flow while the backend is not running
UDP_BATCH = 64  # datagrams read per readiness callback
# connect() errors that mean "not listening yet" (retry until start_timeout).
_NOT_YET = frozenset({errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN, errno.ECONNRESET, errno.ETIMEDOUT,
                      errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNABORTED})
COLD_START_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# ------------------------------------------------------------ pure decisions


def retry_delay(attempt: int) -> float:
    """How long to wait before connect attempt ``attempt + 1`` to a starting backend (doubling, capped)."""
    return float(min(RETRY_FIRST * (2 ** min(attempt, 16)), RETRY_MAX))


def idle_due(unit: Unit, clients: int, quiet_since: float | None) -> float | None:
    """When the backend should be stopped for idleness (loop time), or None (never / clients are there)."""
    if unit.idle_stop is None or clients or quiet_since is None:
        return None
    return quiet_since + unit.idle_stop


def proxy_header(version: ProxyProtocol, peer: Any, local: Any) -> bytes:
    """The PROXY protocol header for a client at ``peer`` that connected to ``local`` (socket addresses).

    Non-IP clients (unix sockets) get ``PROXY UNKNOWN`` (v1) or a LOCAL command (v2),
    as HAProxy's proxy-protocol.txt says for connections without an address.
    """
    ip = isinstance(peer, tuple) and isinstance(local, tuple) and len(peer) >= 2 and len(local) >= 2
    if ip:
        src = ipaddress.ip_address(normalize_host(peer[0]).split("%", 1)[0])
        dst = ipaddress.ip_address(normalize_host(local[0]).split("%", 1)[0])
        if src.version != dst.version:  # a v4 client on a dual-stack socket: both as v6
            src = ipaddress.IPv6Address(f"::ffff:{src}") if src.version == 4 else src
            dst = ipaddress.IPv6Address(f"::ffff:{dst}") if dst.version == 4 else dst
    if version is ProxyProtocol.V1:
        if not ip:
            return b"PROXY UNKNOWN\r\n"
        proto = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {proto} {src} {dst} {peer[1]} {local[1]}\r\n".encode()
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    if not ip:
        return signature + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    family = 0x11 if src.version == 4 else 0x21  # AF_INET or AF_INET6, STREAM
    body = src.packed + dst.packed + struct.pack("!HH", peer[1], local[1])
    return signature + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def _sockaddr(target: InetAddress | str) -> tuple[int, Any]:
    if isinstance(target, InetAddress):
        if target.family == socket.AF_INET6:
            return socket.AF_INET6, (target.host, target.port, 0, target.scope_id)
        return socket.AF_INET, (target.host, target.port)
    return socket.AF_UNIX, ("\0" + target[1:]) if target.startswith("@") else target


@dataclass(slots=True, eq=False)
class Waiter:
    """An accepted client waiting for the backend."""

    fd: int
    addr: Any
    bound: sockets.Bound
    peer: Peer | None
    accepted: float
    deadline: float
    attempt: int = 0
    parked: bool = False  # waiting for the backend process to change state (not for a retry)
    timer: asyncio.TimerHandle | None = None
    trying: socket.socket | None = None  # a connect in progress


@dataclass(slots=True, eq=False)
class Flow:
    """One udp client's datagrams over its own backend socket."""

    client: Any
    sock: socket.socket
    last: float
    queued: collections.deque[bytes]
    listener: sockets.Bound


class ProxyRuntime(UnitRuntime):
    """``mode: proxy``: clients accepted and forwarded to a backend it starts on demand."""

    def __init__(self, host: Host, unit: Unit, bound: list[sockets.Bound]) -> None:
        super().__init__(host, unit, bound)
        self.policy = Policy.for_unit(unit)
        self.slots = ([SlotDriver(self, 0, fds=lambda _: [], changed=self._backend_changed, spawner=_spawn_backend)]
                      if unit.process.exec else [])
        self.waiting: list[Waiter] = []
        # Open connections, each with its client's peer (for the policy) and when it began.
        self.relays: Relays[tuple[Peer | None, float]] = Relays(host.loop, self._relay_done)
        self.flows: dict[int, collections.OrderedDict[Any, Flow]] = {}  # by listener fd
        self.poller = Poller(host.loop)  # connections, connects in flight and udp flows (errors included)
        self.bytes_in = 0  # from clients, delivered to the backend (connections ended)
        self.bytes_out = 0  # from the backend, delivered to clients
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.cold_starts = 0
        self.cold_start_counts = [0] * (len(COLD_START_BUCKETS) + 1)
        self.cold_start_sum = 0.0
        self._cold_since: float | None = None  # a cold start in progress since (loop time)
        self._reachable = False  # a connect succeeded since the backend (re)started
        self._running = False
        self._resume: asyncio.TimerHandle | None = None
        self._backoff = ResourceBackoff()
        self._quiet_since: float | None = host.loop.time()
        self._idle = Deadline(host.loop, self._idle_timer)
        self._drain = Deadline(host.loop, self._drain_timer)
        self._draining: lifecycle.After | None = None  # stopping: connections finish, then the backend stops so
        self._flow_expiry = Deadline(host.loop, self._expire_flows)

    # ------------------------------------------------------------ the interface

    def pids(self) -> list[int]:
        return [d.slot.pid for d in self.slots if d.slot.pid is not None]

    def busy(self) -> bool:
        return bool(self.pids() or self.relays or self.waiting)

    def restarts(self) -> int:
        return sum(d.slot.restarts for d in self.slots)

    def active(self) -> int:
        return len(self.relays) + len(self.waiting) + sum(len(f) for f in self.flows.values())

    def state(self) -> str:
        if not self._running:
            if self.busy():
                return SlotState.STOPPING.value
            return SlotState.STOPPED.value
        backend_running = bool(self.slots) and self.slots[0].slot.state in lifecycle.ALIVE
        return SlotState.RUNNING.value if self.relays or self.waiting or backend_running else SlotState.IDLE.value

    def backend_state(self) -> str:
        if not self.slots:
            return "external"
        return str(self.slots[0].slot.state.value)

    def status(self) -> UnitStatus:
        st = super().status()
        live_in, live_out = self.relays.totals()
        st["proxy"] = ProxyStatus(
            backend={"state": self.backend_state(), "pid": self.pids()[0] if self.pids() else None,
                     "address": str(self.unit.backend) if self.unit.backend is not None else None,
                     "reachable": self._reachable},
            connections=len(self.relays),
            waiting=len(self.waiting),
            flows=sum(len(f) for f in self.flows.values()),
            bytes={"in": self.bytes_in + live_in, "out": self.bytes_out + live_out},
            datagrams={"in": self.datagrams_in, "out": self.datagrams_out},
            cold_starts=self.cold_starts,
            cold_start_seconds={"buckets": list(COLD_START_BUCKETS), "counts": list(self.cold_start_counts),
                                "sum": round(self.cold_start_sum, 6)},
        )
        return st

    def reconfigured(self) -> None:
        super().reconfigured()
        old = self.policy
        self.policy = Policy.for_unit(self.unit)
        self.policy.active = old.active
        self.policy.by_source = old.by_source
        if self.unit.process.exec and not self.slots:
            self.slots = [SlotDriver(self, 0, fds=lambda _: [], changed=self._backend_changed,
                                     spawner=_spawn_backend)]
        self._arm_idle()

    def activate(self) -> None:
        if not self.unit.enabled:
            return
        self._running = True
        self._draining = None
        if self.unit.start is Start.EAGER:
            for d in self.slots:
                d.feed(lifecycle.StartRequest())
        self._maybe_resume()
        self._arm_idle()

    def operator_start(self) -> None:
        self.life = UnitState.ENABLED
        for d in self.slots:
            if d.slot.state in (SlotState.STOPPED, SlotState.FAILED):
                d.feed(lifecycle.StartRequest(operator=True))
        self.activate()

    def operator_stop(self) -> None:
        self.life = UnitState.STOPPED
        self._wind_down(lifecycle.After.STOP)

    def operator_restart(self) -> None:
        # Clients keep being accepted (they wait for the new backend); the backend restarts.
        self.life = UnitState.ENABLED
        if not self._running:
            self.activate()
        for d in self.slots:
            d.feed(lifecycle.StopRequest(lifecycle.After.RESTART))

    def shutdown(self) -> None:
        if self.life is not UnitState.RETIRING:
            self.life = UnitState.SHUTTING_DOWN
        self._wind_down(lifecycle.After.NOTHING)

    def retire(self) -> None:
        self.life = UnitState.RETIRING
        self._wind_down(lifecycle.After.NOTHING)

    def handover_slots(self) -> list[lifecycle.Slot]:
        return [d.slot for d in self.slots]

    def resume_slots(self, h: handover.UnitHandover) -> None:
        for d, slot in zip(self.slots, h.slots, strict=False):
            d.adopt(slot)
        for slot in h.slots[len(self.slots):]:  # no backend to start any more: it winds down
            if slot.pid is not None:
                self.adopt_stray(slot.pid)
                kill_group(slot.pid, self.unit.process.stop_signal)

    def handover_blocker(self) -> str | None:
        if self.relays or self.waiting or any(self.flows.values()):
            return f"unit {self.unit.name} has {self.active()} open proxied connections"
        return None

    def notified(self, pid: int, fields: Mapping[str, str]) -> None:
        for d in self.slots:
            if d.slot.pid == pid:
                d.notified(fields)

    def close(self, *, remove: bool = True) -> None:
        for w in list(self.waiting):
            self._drop_waiter(w)
        for rid in self.relays.ids():
            self.relays.close_one(rid)
        self.relays.close()
        self._end_all_flows()
        for d in self.slots:
            d.cancel()
        self._idle.cancel()
        self._drain.cancel()
        self._flow_expiry.cancel()
        if self._resume is not None:
            self._resume.cancel()
        self.poller.close()
        super().close(remove=remove)

    # ------------------------------------------------------------ stopping

    def _wind_down(self, after: lifecycle.After) -> None:
        """Stop accepting; waiting clients are closed; open connections get ``stop_timeout``; then the backend stops."""
        self._running = False
        self.poll(False)
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        for w in list(self.waiting):
            self._drop_waiter(w)
            self._refuse("stopping", w)
        self._end_all_flows()
        self._idle.cancel()
        self._draining = after
        if self.relays:
            self._drain.set(self.host.loop.time() + self.unit.process.stop_timeout)
            self.log.info("connections_draining", connections=len(self.relays), timeout=self.unit.process.stop_timeout)
        else:
            self._drained()

    def _drain_timer(self) -> None:
        if self.relays:
            self.log.info("connections_closed", connections=len(self.relays), reason="stop_timeout")
        for rid in self.relays.ids():
            self.relays.close_one(rid)
        self._drained()

    def _drained(self) -> None:
        """No connection is open any more: stop the backend as the stop asked."""
        self._drain.cancel()
        after = self._draining
        if after is None:
            return
        self._draining = None
        if self._running:  # started again meanwhile
            return
        for d in self.slots:
            d.feed(lifecycle.StopRequest(after))
        if self.life is UnitState.STOPPED:
            self.release_fd_store()
        if not self.busy():
            self.host.settled()

    # ------------------------------------------------------------ accepting clients

    def _maybe_resume(self) -> None:
        if not self._running:
            return
        loop = self.host.loop
        gate = self.policy.accepting(loop.time())
        if gate is Gate.OPEN:
            self.paused = None
            self.poll(True)
            return
        cause = "max_connections" if gate is Gate.AT_EXIT else "rate"
        if self.paused != cause:
            self.paused = cause
            self.pauses[cause] += 1
        self.poll(False)
        if isinstance(gate, ReopensAt) and self._resume is None:
            self._resume = loop.call_at(gate.when, self._resumed)

    def _resumed(self) -> None:
        self._resume = None
        self._maybe_resume()

    def readable(self, bound: sockets.Bound) -> None:
        if bound.listen.kind is ListenKind.UDP:
            self._datagrams(bound)
            return
        sock = bound.sock
        if sock is None:
            return
        loop = self.host.loop
        for _ in range(ACCEPT_BATCH):
            now = loop.time()
            if self.policy.accepting(now) is not Gate.OPEN:
                self._maybe_resume()
                return
            try:
                fd, addr = sock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    delay = self._backoff.failed()
                    if self.paused != "resources":
                        self.paused = "resources"
                        self.pauses["resources"] += 1
                    self.log.warning("accept_paused", error=exc.strerror, retry=delay)
                    self.poll(False)
                    if self._resume is None:
                        self._resume = loop.call_later(delay, self._resumed)
                    return
                continue
            self._backoff.succeeded()
            self._client(fd, addr, bound, now)

    def _client(self, fd: int, addr: Any, bound: sockets.Bound, now: float) -> None:
        peer: Peer | None = None
        if self.policy.needs_peer:
            if bound.listen.kind is ListenKind.TCP:
                peer = Peer(host=normalize_host(addr[0]))
            else:
                peer = Peer(uid=sockets.peer_credentials(fd)[1])
        refusal = self.policy.admit(peer, now, _local_minute() if self.policy.windows else None)
        u = self.unit
        if u.banner is not None and u.banner.content:
            _send_banner(fd, u.banner.content)
        if refusal is not None:
            if u.banner_fail is not None and u.banner_fail.content:
                _send_banner(fd, u.banner_fail.content)
            os.close(fd)
            self.refused += 1
            self.refused_by_reason[refusal.value] += 1
            self.summary.emit("connection_refused", reason=refusal.value, remote=_remote(addr, peer))
            return
        self.accepted += 1
        if u.banner_success is not None and u.banner_success.content:
            _send_banner(fd, u.banner_success.content)
        os.set_blocking(fd, False)
        if bound.listen.kind is ListenKind.TCP:
            with contextlib.suppress(OSError):
                _nodelay(fd)
        if self.unit.log_connections:
            self.log.info("connection_accepted", remote=_remote(addr, peer))
        self._idle.cancel()
        self._quiet_since = None
        waiter = Waiter(fd, addr, bound, peer, now, now + self.unit.start_timeout)
        self.waiting.append(waiter)
        self._advance(waiter)

    # ------------------------------------------------------------ the backend

    def _backend_up(self) -> bool:
        """Whether connects may be tried: no exec (someone else runs it), or the process is running."""
        if not self.slots:
            return True
        return self.slots[0].slot.state is SlotState.RUNNING

    def _advance(self, w: Waiter) -> None:
        """Move one waiter on: start the backend, connect, or wait (until its deadline)."""
        if w not in self.waiting:
            return
        now = self.host.loop.time()
        if now >= w.deadline:
            self._give_up(w)
            return
        if w.trying is not None:
            return  # a connect is in flight; it moves the waiter on
        w.parked = False
        if self.slots:
            d = self.slots[0]
            # Starting the backend changes its slot, which calls _backend_changed: the
            # parked waiters are moved on there, this one (not parked) here.
            if d.slot.state is SlotState.IDLE:
                self._cold_start()
            elif d.slot.state is SlotState.STOPPED and self.life is UnitState.ENABLED:
                d.feed(lifecycle.StartRequest())
            if w not in self.waiting or w.trying is not None:
                return
        if self._backend_up():
            self._connect(w)
            return
        # Not up yet (starting, backing off): the backend's next change moves us on; the deadline ends the wait.
        w.parked = True
        self._wait(w, w.deadline)

    def _cold_start(self) -> None:
        self.cold_starts += 1
        self._cold_since = self.host.loop.time()
        self._reachable = False
        self.log.info("backend_starting", waiting=len(self.waiting))
        self.slots[0].feed(lifecycle.Readiness())

    def _wait(self, w: Waiter, at: float) -> None:
        if w.timer is not None:
            w.timer.cancel()
        w.timer = self.host.loop.call_at(min(at, w.deadline), self._advance_timer, w)

    def _advance_timer(self, w: Waiter) -> None:
        w.timer = None
        if w in self.waiting:
            self._advance(w)

    def _backend_changed(self, driver: SlotDriver) -> None:
        slot = driver.slot
        if slot.state is not SlotState.RUNNING:
            self._reachable = False
        if slot.state is SlotState.RUNNING or (slot.state is SlotState.IDLE and self.waiting):
            for w in list(self.waiting):
                if w.parked:
                    self._advance(w)
        if not self.busy():
            self.host.settled()

    def _target(self, w: Waiter) -> InetAddress | str:
        target = w.bound.listen.backend if w.bound.listen.backend is not None else self.unit.backend
        assert target is not None  # the config requires one
        return target

    def _connect(self, w: Waiter) -> None:
        family, address = _sockaddr(self._target(w))
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as exc:
            self._retry(w, exc.errno or 0)
            return
        err = sock.connect_ex(address)
        if err == 0:
            self._connected(w, sock)
        elif err == errno.EINPROGRESS:
            w.trying = sock
            self.poller.watch(sock.fileno(), select.EPOLLOUT, lambda _events: self._connect_done(w))
            self._wait(w, w.deadline)
        else:
            sock.close()
            self._retry(w, err)

    def _connect_done(self, w: Waiter) -> None:
        sock = w.trying
        assert sock is not None
        self.poller.forget(sock.fileno())
        w.trying = None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            self._connected(w, sock)
        else:
            sock.close()
            self._retry(w, err)

    def _retry(self, w: Waiter, err: int) -> None:
        if err not in _NOT_YET:
            self.log.warning("backend_connect_failed", error=os.strerror(err), backend=str(self._target(w)))
        w.attempt += 1
        self._wait(w, self.host.loop.time() + retry_delay(w.attempt))

    def _connected(self, w: Waiter, sock: socket.socket) -> None:
        loop = self.host.loop
        if not self._reachable:
            self._reachable = True
            if self._cold_since is not None:
                took = loop.time() - self._cold_since
                self._cold_since = None
                self.cold_start_sum += took
                index = next((i for i, b in enumerate(COLD_START_BUCKETS) if took <= b), len(COLD_START_BUCKETS))
                self.cold_start_counts[index] += 1
                self.log.info("backend_ready", pid=self.pids()[0] if self.pids() else None, took=round(took, 6))
        if self.unit.proxy_protocol is not None and w.bound.listen.kind is ListenKind.TCP:
            try:
                local = socket.socket(fileno=w.fd)
                try:
                    header = proxy_header(self.unit.proxy_protocol, w.addr, local.getsockname())
                finally:
                    local.detach()
                sock.send(header)  # a fresh connection's send buffer takes ~100 bytes at once
            except OSError:
                sock.close()
                self._retry(w, errno.ECONNRESET)
                return
        if sock.family != socket.AF_UNIX:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.waiting.remove(w)
        if w.timer is not None:
            w.timer.cancel()
        self.relays.add(w.fd, sock.detach(), (w.peer, loop.time()))

    def _give_up(self, w: Waiter) -> None:
        self._drop_waiter(w)
        self._refuse("backend_unavailable", w)
        self.summary.emit("backend_unavailable", level="error", backend=str(self._target(w)),
                          waited=round(self.host.loop.time() - w.accepted, 3))
        self._after_client()

    def _drop_waiter(self, w: Waiter) -> None:
        if w not in self.waiting:
            return
        self.waiting.remove(w)
        if w.timer is not None:
            w.timer.cancel()
        if w.trying is not None:
            self.poller.forget(w.trying.fileno())
            w.trying.close()
            w.trying = None
        with contextlib.suppress(OSError):
            os.close(w.fd)
        self.policy.release(w.peer)

    def _refuse(self, reason: str, w: Waiter) -> None:
        self.refused += 1
        self.refused_by_reason[reason] += 1
        self.summary.emit("connection_refused", reason=reason, remote=_remote(w.addr, w.peer))

    def _relay_done(self, token: tuple[Peer | None, float], received: int, sent: int, reset: bool) -> None:
        peer, began = token
        self.bytes_in += received
        self.bytes_out += sent
        self.policy.release(peer)
        if self.unit.log_connections:
            self.log.info("connection_closed", received=received, sent=sent, reset=reset,
                          duration=round(self.host.loop.time() - began, 6))
        self._after_client()

    def _after_client(self) -> None:
        """A client left: accept again if the limit held us; arm the idle stop; finish a drain."""
        if self._running and not self.polling and self._resume is None:
            self._maybe_resume()
        if self._draining is not None and not self.relays:
            self._drained()
        self._arm_idle()
        if not self.busy():
            self.host.settled()

    # ------------------------------------------------------------ idle stop

    def _clients(self) -> int:
        return self.active()

    def _arm_idle(self) -> None:
        if self._clients():
            self._quiet_since = None
            self._idle.cancel()
            return
        if self._quiet_since is None:
            self._quiet_since = self.host.loop.time()
        self._idle.set(idle_due(self.unit, 0, self._quiet_since) if self.slots else None)

    def _idle_timer(self) -> None:
        if not self._running or self._clients():
            return
        d = self.slots[0] if self.slots else None
        if d is not None and d.slot.state in (SlotState.RUNNING, SlotState.STARTING):
            self.log.info("backend_idle_stop", pid=d.slot.pid, idle=self.unit.idle_stop)
            d.feed(lifecycle.StopRequest(lifecycle.After.IDLE))

    # ------------------------------------------------------------ udp

    def _datagrams(self, bound: sockets.Bound) -> None:
        sock = bound.sock
        if sock is None:
            return
        loop = self.host.loop
        flows = self.flows.setdefault(bound.fd, collections.OrderedDict())
        now = loop.time()
        for _ in range(UDP_BATCH):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            flow = flows.get(addr)
            if flow is None:
                flow = self._new_flow(bound, flows, addr, now)
                if flow is None:
                    continue
            else:
                flows.move_to_end(addr)
            flow.last = now
            self.datagrams_in += 1
            if self._backend_up():
                self._send_up(flow, data)
            else:
                if len(flow.queued) < UDP_QUEUE:
                    flow.queued.append(data)
                self._start_for_flows()
        self._idle.cancel()
        self._quiet_since = None
        self._arm_flow_expiry()

    def _new_flow(self, bound: sockets.Bound, flows: collections.OrderedDict[Any, Flow], addr: Any,
                  now: float) -> Flow | None:
        peer = Peer(host=normalize_host(addr[0]))
        refusal = self.policy.admit(peer, now) if (self.policy.allow or self.policy.deny) else None
        if refusal is not None:
            self.refused += 1
            self.refused_by_reason[refusal.value] += 1
            self.summary.emit("connection_refused", reason=refusal.value, remote=_remote(addr, peer))
            return None
        if refusal is None and (self.policy.allow or self.policy.deny):
            self.policy.release(peer)  # flows are capped below, not counted as connections
        total = sum(len(f) for f in self.flows.values())
        if total >= self.unit.max_connections and flows:
            self._end_flow(flows, next(iter(flows)))
        target = bound.listen.backend if bound.listen.backend is not None else self.unit.backend
        assert isinstance(target, InetAddress)
        family, address = _sockaddr(target)
        try:
            s = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            s.connect(address)
        except OSError as exc:
            self.summary.emit("flow_failed", level="error", error=exc.strerror, remote=_remote(addr, peer))
            return None
        flow = Flow(addr, s, now, collections.deque(), bound)
        flows[addr] = flow
        self.accepted += 1
        self.poller.watch(s.fileno(), select.EPOLLIN, lambda _events: self._replies(flow))
        return flow

    def _send_up(self, flow: Flow, data: bytes) -> None:
        with contextlib.suppress(OSError):  # ECONNREFUSED: nothing listens (yet); udp may lose it
            flow.sock.send(data)

    def _start_for_flows(self) -> None:
        d = self.slots[0] if self.slots else None
        if d is None:
            return
        if d.slot.state is SlotState.IDLE:
            self._cold_start()
        elif d.slot.state is SlotState.STOPPED and self.life is UnitState.ENABLED:
            d.feed(lifecycle.StartRequest())
        if self._backend_up():
            self._flush_flows()

    def _flush_flows(self) -> None:
        for flows in self.flows.values():
            for flow in flows.values():
                while flow.queued:
                    self._send_up(flow, flow.queued.popleft())

    def _replies(self, flow: Flow) -> None:
        listener = flow.listener.sock
        for _ in range(UDP_BATCH):
            try:
                data = flow.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # ECONNREFUSED from an ICMP: the backend is not there; the flow stays
            self.datagrams_out += 1
            flow.last = self.host.loop.time()
            if listener is not None:
                with contextlib.suppress(OSError):
                    listener.sendto(data, flow.client)

    def _arm_flow_expiry(self) -> None:
        oldest = min((next(iter(f.values())).last for f in self.flows.values() if f), default=None)
        self._flow_expiry.set(None if oldest is None else oldest + self.unit.udp_idle)

    def _expire_flows(self) -> None:
        now = self.host.loop.time()
        for flows in self.flows.values():
            for addr in [a for a, f in flows.items() if now - f.last >= self.unit.udp_idle]:
                self._end_flow(flows, addr)
        self._arm_flow_expiry()
        self._arm_idle()

    def _end_flow(self, flows: collections.OrderedDict[Any, Flow], addr: Any) -> None:
        flow = flows.pop(addr)
        self.poller.forget(flow.sock.fileno())
        flow.sock.close()

    def _end_all_flows(self) -> None:
        for flows in self.flows.values():
            for addr in list(flows):
                self._end_flow(flows, addr)
        self._flow_expiry.cancel()


def _nodelay(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    finally:
        sock.detach()


def _remote(addr: Any, peer: Peer | None) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = normalize_host(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return peer.source if peer is not None else ""


def _spawn_backend(rt: UnitRuntime, index: int, listen_fds: list[int], cgroup: int | None) -> int:
    """Start the backend: no fds but stdio (stdin /dev/null), no LISTEN_* (it cannot take fds)."""
    out, err = rt.output_fds()
    env: list[bytes] = []
    pid_vars: tuple[bytes, ...] = ()
    if rt.unit.watchdog:
        env.append(f"WATCHDOG_USEC={int(rt.unit.watchdog * 1_000_000)}".encode())
        pid_vars = (b"WATCHDOG_PID",)
    return spawn.spawn_child(rt.prepared(), [-1, out, err], env, listen_pid=False, pid_vars=pid_vars,
                             cgroup=cgroup)

