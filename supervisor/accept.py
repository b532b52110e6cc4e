"""``mode: accept``: accept each connection and spawn one child for it.

Theory of operation
-------------------
The hot path is ``readable`` -> ``_accept_batch``: when no rule of the unit
looks at an individual connection (no allow/deny, per-source limit,
access_times, banner or builtin), the pure ``Policy`` grants a count
(``budget``: max_connections and rate) and one call into C accepts up to that
many queued connections and starts one child each without the GIL, two at
a time on two threads (``spawn.AcceptTemplate``, "accept mode: batches" in
``_spawn.c``); Python then only counts the admissions and remembers the
pids. Nothing else runs per connection: no pipes, no socket objects, and no
log formatting when ``log_connections`` is off.

The engine: on a host with a reaper (the daemon), a bulk unit is not served
from the loop at all. Its listeners go to the reaper's thread
(``Reaper.engine``, "the hub" in ``_spawn.c``), which accepts as many
connections as Python granted (``Policy.budget`` again, reserved with
``admit_many`` and given back with ``unadmit`` when the grant is replaced),
spawns, and reaps the children with every other child. Python takes in the
records in batches (``took``, then ``settle`` renews the grant): up to 20 ms
after the first one, at once when the grant is used up or an fd shortage
stopped it, so one wake-up of the loop carries many connections. Everything
that reads the children (status, metrics, stop, reload, re-exec) drains
first (``sync``).

Units whose rules look at each peer take the per-connection path
(``_admit``): accept one connection at a time, ask ``Policy.admit``, spawn
with the vfork spawner, close the daemon's copy; when several are queued all
but the last go to the helper thread, so two children exec at once there too.

The policy never refuses by rate: it pauses accepting (``poll(False)`` plus one
timer), and at ``max_connections`` it stops accepting until a child exits, so
clients wait in the backlog. accept() errors that mean the daemon is short of
fds or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) pause accepting with a growing
delay instead of spinning on a readable socket; errors that concern only one
connection (ECONNABORTED, EPROTO, ...) are skipped.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from typing import Any, NamedTuple

from supervisor import _spawn, handover, lifecycle, log, sockets, spawn
from supervisor.builtins import Streams
from supervisor.errors import SpawnError
from supervisor.lifecycle import Drain, Exit, SlotState
from supervisor.model import ListenKind, Pass, Stderr, Unit
from supervisor.policy import Gate, Peer, Policy, ReopensAt, ResourceBackoff, normalize_host
from supervisor.units import Deadline, Host, UnitRuntime, UnitState, kill_group

# Errors from accept(2) that say the daemon (not the connection) is short of a
# resource: back off instead of spinning on a readable socket.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BATCH = 32  # connections accepted per readiness callback before yielding to the loop
ENGINE_GRANT = 256  # admissions granted to the engine at a time (renewed at every drain)
ADDR_ENV_CACHE = 256  # encoded REMOTE_ADDR values kept per unit (clients tend to repeat)
CONN = -2  # stand-in for "the connection" in the stderr slot
_FDS_ENV = (b"LISTEN_FDS=1", b"LISTEN_FDNAMES=connection")
# The listen kinds the batch path serves, and the peer variables their children get.
_REMOTE_OF = {
    ListenKind.TCP: spawn.Remote.INET,
    ListenKind.UNIX: spawn.Remote.UNIX,
    ListenKind.UNIX_SEQPACKET: spawn.Remote.UNIX,
}


class AcceptRuntime(UnitRuntime):
    """``mode: accept``: one child per connection, under xinetd-style policy."""

    def __init__(self, host: Host, unit: Unit, bound: list[sockets.Bound]) -> None:
        super().__init__(host, unit, bound)
        self.policy = Policy.for_unit(unit)
        self.conns: dict[int, tuple[Peer | None, float, str]] = {}
        self._resume: asyncio.TimerHandle | None = None
        self._backoff = ResourceBackoff()
        self._running = False  # activated and accepting (life is ENABLED and activate() ran)
        self._drain = Drain()
        self._kill_deadline = Deadline(host.loop, self._drain_timer)
        self._pass_fds = unit.pass_ is Pass.FDS
        self._log_conns = unit.log_connections
        self._lines = log.ConnectionLines(self.log)  # connection_accepted / child_exited, the hot lines
        self._err = _stderr_slot(unit.process.stderr)
        self._needs_peer = self.policy.needs_peer
        self._addr_env: dict[str, bytes] = {}
        self.spawn_failures = 0
        self._streams = Streams(host, unit.builtin, self._builtin_done) if unit.builtin else None
        self._templates: dict[int, spawn.AcceptTemplate] = {}  # by listening fd
        self._engine: _spawn.Engine | None = None
        self._engine_on = False  # polling through the engine (its grant is ours to take back)
        self._first_grant: asyncio.Handle | None = None
        self._engine_err = 0  # an fd shortage that stopped the engine, until settle()
        self._engine_set: list[tuple[socket.socket, spawn.AcceptTemplate]] = []  # what it serves
        self._banners()

    def _banners(self) -> None:
        u = self.unit
        self._banner = u.banner.content if u.banner is not None and u.banner.content else None
        ok = u.banner_success
        self._banner_ok = ok.content if ok is not None and ok.content else None
        self._banner_fail = u.banner_fail.content if u.banner_fail is not None and u.banner_fail.content else None
        # The batch path: nothing is decided or sent per connection.
        self._bulk = (not self.policy.decides_each and u.builtin is None and self._banner is None
                      and self._banner_ok is None and self._banner_fail is None)

    def active(self) -> int:
        self.sync()
        return len(self.conns) + (len(self._streams) if self._streams is not None else 0)

    def _builtin_done(self, peer: object) -> None:
        """A builtin connection ended: release its admission, accept again if the limit held us."""
        self.policy.release(peer if isinstance(peer, Peer) else None)
        if self._drain.deadline is not None and not self.active():
            self._drain = lifecycle.drain_exited(self._drain, 0)
            self._kill_deadline.set(self._drain.deadline)
        if not self._polling and self._resume is None:
            self._maybe_resume()

    def pids(self) -> list[int]:
        self.sync()
        return list(self.conns)

    # ------------------------------------------------------------ re-exec

    def hand_over(self) -> handover.UnitHandover:
        """As every unit's, with each connection's child as a connection, not a stray."""
        h = super().hand_over()  # after pids(): self.conns holds what the engine filed
        h.conns = [handover.Conn(pid, remote, peer.host if peer else None, peer.uid if peer else None, started)
                   for pid, (peer, started, remote) in self.conns.items()]
        h.strays = [pid for pid in h.strays if pid not in self.conns]
        return h

    def resume_slots(self, h: handover.UnitHandover) -> None:
        """The previous image's connections are ours again: listed, counted against the limits, logged at exit."""
        for c in h.conns:
            peer = Peer(host=c.host, uid=c.uid) if c.host is not None or c.uid is not None else None
            self.conns[c.pid] = (peer, c.started, c.remote)
            self.policy.hold(peer)
            self.host.watch_child(c.pid, self._exited)

    def reconfigured(self) -> None:
        super().reconfigured()
        old = self.policy
        self.policy = Policy.for_unit(self.unit)
        self.policy.active = old.active
        self.policy.by_source = old.by_source
        self._pass_fds = self.unit.pass_ is Pass.FDS
        self._log_conns = self.unit.log_connections
        self._err = _stderr_slot(self.unit.process.stderr)
        self._needs_peer = self.policy.needs_peer
        self._templates = {}
        self._banners()
        if self.unit.builtin is None and self._streams is not None:
            self._streams.close()
            self._streams = None
        elif self.unit.builtin is not None and (self._streams is None or self._streams.kind is not self.unit.builtin):
            if self._streams is not None:
                self._streams.close()
            self._streams = Streams(self.host, self.unit.builtin, self._builtin_done)

    def retire(self) -> None:
        # A removed accept unit lets its children finish their connections.
        self.life = UnitState.RETIRING
        self._running = False
        self.poll(False)

    def state(self) -> str:
        self.sync()
        if not self._running:
            if self._drain.deadline is not None and self.conns:
                return SlotState.STOPPING.value
            return SlotState.STOPPED.value
        return SlotState.RUNNING.value if self.active() else SlotState.IDLE.value

    def activate(self) -> None:
        if self.unit.enabled:
            self._running = True
            self._maybe_resume()

    def operator_start(self) -> None:
        self.life = UnitState.ENABLED
        self.activate()

    def operator_stop(self) -> None:
        self.life = UnitState.STOPPED
        self._stop_children()

    def operator_restart(self) -> None:
        self.operator_stop()
        self.operator_start()

    def shutdown(self) -> None:
        if self.life is not UnitState.RETIRING:
            self.life = UnitState.SHUTTING_DOWN
        self._stop_children()

    def _stop_children(self) -> None:
        self._running = False
        self.poll(False)
        self.sync()
        if self._streams is not None:
            self._streams.end_all()  # the daemon's own connections end with the unit
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        self._drain, actions = lifecycle.drain_begin(self.unit, self._drain, list(self.conns), self.host.loop.time())
        self._carry_out(actions)

    def _drain_timer(self) -> None:
        self._drain, actions = lifecycle.drain_timer(list(self.conns))
        self._carry_out(actions)

    def _carry_out(self, actions: list[lifecycle.Action]) -> None:
        for action in actions:
            if isinstance(action, lifecycle.Kill):
                kill_group(action.pid, action.signal)
            elif isinstance(action, lifecycle.Log):
                self.log.info(action.event, **dict(action.fields))
        self._kill_deadline.set(self._drain.deadline)

    def close(self, *, remove: bool = True) -> None:
        self._close_engine()
        if self._resume is not None:
            self._resume.cancel()
        self._kill_deadline.cancel()
        if self._streams is not None:
            self._streams.close()
        super().close(remove=remove)

    def _maybe_resume(self) -> None:
        """Poll again if the policy allows accepting now; else arrange to look again."""
        if not self._running:
            return
        loop = self.host.loop
        gate = self.policy.accepting(loop.time())
        if gate is Gate.OPEN:
            self.paused = None
            self.poll(True)
            return
        self._pause("max_connections" if gate is Gate.AT_EXIT else "rate")
        self.poll(False)
        if isinstance(gate, ReopensAt) and self._resume is None:
            self._resume = loop.call_at(gate.when, self._resumed)

    def _pause(self, cause: str) -> None:
        """Accepting stops for ``cause``; counted once per pause, not per look."""
        if self.paused != cause:
            self.paused = cause
            self.pauses[cause] += 1

    def _resumed(self) -> None:
        self._resume = None
        self._maybe_resume()

    # ------------------------------------------------------------ the engine

    def poll(self, on: bool) -> None:
        if on == self._polling:
            return
        if not on:
            if self._engine_on:
                self._polling = self._engine_on = False
                self._cancel_first_grant()
                self._take_back()
                return
            super().poll(False)
            return
        engine = self._engine_for()
        if engine is None:
            super().poll(True)
            return
        self._polling = self._engine_on = True
        # Granted from the next loop iteration, as the loop's own reader would first fire: what
        # the caller reports now (the reply to `start`) is the state before a connection is taken.
        if self._first_grant is None:
            self._first_grant = self.host.loop.call_soon(self._grant_first)

    def _grant_first(self) -> None:
        self._first_grant = None
        if self._engine_on and self._engine is not None:
            self._regrant(self._engine)

    def _cancel_first_grant(self) -> None:
        if self._first_grant is not None:
            self._first_grant.cancel()
            self._first_grant = None

    def _engine_for(self) -> _spawn.Engine | None:
        """The engine set up to serve every listener of the unit, or None: the loop serves them."""
        reaper = self.host.reaper
        if not self._bulk or reaper is None or not self.bound:
            return None
        wanted: list[tuple[socket.socket, spawn.AcceptTemplate]] = []
        for b in self.bound:
            template = self._template(b) if b.sock is not None else None
            if template is None or b.sock is None:
                return None
            wanted.append((b.sock, template))
        engine = self._engine
        if engine is None:
            try:
                engine = reaper.engine(self)
            except (OSError, RuntimeError) as exc:
                self.log.warning("accept_engine_unavailable", error=str(exc))
                return None
            self._engine = engine
        # Compared by socket object, not fd number: a reload may bind a new socket on a reused fd.
        if len(wanted) != len(self._engine_set) or any(
                sock is not old_sock or t is not old_t
                for (sock, t), (old_sock, old_t) in zip(wanted, self._engine_set, strict=True)):
            engine.clear()
            self._engine_set = []
            try:
                for sock, template in wanted:
                    engine.add(sock.fileno(), template.native)
            except (OSError, ValueError) as exc:
                engine.clear()
                self.log.warning("accept_engine_unavailable", error=str(exc))
                return None
            self._engine_set = wanted
        return engine

    def _regrant(self, engine: _spawn.Engine) -> None:
        """Give the engine what the policy allows now (reserved here); none: pause as the loop path would."""
        # The new grant replaces the old one in one step (the thread may be using it); what was
        # left of the old one is given back after. The budget still counts that remainder as
        # admitted, so near max_connections the new grant is smaller than it could be, never larger.
        policy = self.policy
        now = self.host.loop.time()
        n = policy.budget(now, ENGINE_GRANT)
        if n > 0:
            policy.admit_many(n, now)
        policy.unadmit(engine.grant(n, self._log_conns))
        if n == 0:
            self._polling = self._engine_on = False
            self._maybe_resume()

    def _take_back(self) -> None:
        if self._engine is not None:
            self.policy.unadmit(self._engine.grant(0, False))

    def sync(self) -> None:
        """Take in what the engine did (before anything reads the children)."""
        if self._engine is not None and self.host.reaper is not None:
            self.host.reaper.reap()

    def took(self, accepted: list[tuple[int, float, str]], failures: list[tuple[str, int, str]], err: int) -> None:
        """The engine's records: children started (admitted when granted), connections that got none."""
        if accepted:
            self._backoff.succeeded()
            self.accepted += len(accepted)
            self.spawns += len(accepted)
            conns = self.conns
            watch = self.host.watch_child
            exited = self._exited
            ago = self.host.loop.time() - time.monotonic()  # the engine's times are time.monotonic()
            if self._log_conns:
                line = self._lines.accepted
                for pid, when, remote in accepted:
                    conns[pid] = (None, when + ago, remote)
                    watch(pid, exited)
                    line(remote, pid)
            else:
                for pid, when, remote in accepted:
                    conns[pid] = (None, when + ago, remote)
                    watch(pid, exited)
        if failures:
            template = self._engine_set[0][1] if self._engine_set else None
            for stage, code, remote in failures:
                exc = template.error(stage, code) if template is not None else SpawnError(stage, code, stage)
                self._spawn_failed(None, remote, exc)
        if err:
            self._engine_err = err

    def settle(self) -> None:
        """After a drain: an fd shortage backs off; else the grant is renewed (or accepting resumes)."""
        err, self._engine_err = self._engine_err, 0
        if err:
            self._short_of_resources(OSError(err, os.strerror(err)))
        elif self._engine_on and self._engine is not None:
            self._regrant(self._engine)
        elif not self._polling and self._resume is None:
            self._maybe_resume()

    def _close_engine(self) -> None:
        engine = self._engine
        if engine is None:
            return
        self.sync()
        self._polling = self._engine_on = False
        self._cancel_first_grant()
        self._take_back()
        self._engine = None
        self._engine_set = []
        if self.host.reaper is not None:
            self.host.reaper.release(engine)  # children still running are reaped as any other

    def readable(self, bound: sockets.Bound) -> None:
        sock = bound.sock
        if sock is None:
            return
        if self._bulk:
            template = self._template(bound)
            if template is not None:
                self._accept_batch(bound, template)
                return
        self._accept_each(bound, sock)

    def _template(self, bound: sockets.Bound) -> spawn.AcceptTemplate | None:
        """The batch spawner for ``bound``'s kind; None when only the per-connection path applies."""
        template = self._templates.get(bound.fd)
        if template is not None and template.prepared is self._prepared:
            return template
        remote = _REMOTE_OF.get(bound.listen.kind)
        if remote is None:
            return None
        try:
            prepared = self._prepared or self.prepared()
        except SpawnError:
            return None  # the per-connection path reports it for each connection
        err = self._err
        if self._pass_fds:
            fds = [-1, -1 if err == CONN else err, spawn.CONNECTION if err == CONN else err, spawn.CONNECTION]
        else:
            fds = [spawn.CONNECTION, spawn.CONNECTION, spawn.CONNECTION if err == CONN else err]
        template = spawn.AcceptTemplate.build(prepared, fds, _FDS_ENV if self._pass_fds else (),
                                              listen_pid=self._pass_fds, remote=remote)
        self._templates[bound.fd] = template
        return template

    def _accept_batch(self, bound: sockets.Bound, template: spawn.AcceptTemplate) -> None:
        """Accept and spawn as many queued connections as the policy grants, in one call into C."""
        policy = self.policy
        now = self.host.loop.time()
        budget = policy.budget(now, ACCEPT_BATCH)
        if budget == 0:
            self._maybe_resume()
            return
        log_conns = self._log_conns
        pids, remotes, failures, err = template.accept_spawn(bound.fd, budget, log_conns)
        done = len(pids) + len(failures)
        if done:
            self._backoff.succeeded()
            policy.admit_many(done, now)
            self.accepted += len(pids)
            self.spawns += len(pids)
            conns = self.conns
            watch = self.host.watch_child
            exited = self._exited
            if remotes is not None:
                line = self._lines.accepted
                for pid, remote in zip(pids, remotes, strict=True):
                    conns[pid] = (None, now, remote)
                    watch(pid, exited)
                    line(remote, pid)
            else:
                entry = (None, now, "")
                for pid in pids:
                    conns[pid] = entry
                    watch(pid, exited)
            for exc, remote in failures:
                self._spawn_failed(None, remote, exc)
        if err:
            self._short_of_resources(OSError(err, os.strerror(err)))
        elif done >= budget:
            self._maybe_resume()  # the grant is used up: accepting may have to pause

    def _accept_each(self, bound: sockets.Bound, sock: socket.socket) -> None:
        """The per-connection path: accept, decide and spawn one connection at a time."""
        loop = self.host.loop
        policy = self.policy
        # One admitted connection is held back until we know whether another
        # follows in this batch: a lone connection (the common case at low
        # load) is spawned inline, the cheapest path; when several are
        # queued, all but the last go to the helper thread while it is free,
        # so two vforks wait for exec at once (vfork suspends only the
        # calling thread) instead of one after the other.
        held: Job | None = None
        try:
            for _ in range(ACCEPT_BATCH):
                now = loop.time()
                if policy.accepting(now) is not Gate.OPEN:
                    self._maybe_resume()
                    return
                try:
                    fd, addr = sock._accept()  # type: ignore[attr-defined]
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    if exc.errno in RESOURCE_ERRNOS:
                        self._short_of_resources(exc)
                        return
                    # ECONNABORTED, EPROTO, EPERM (firewall), ...: that connection
                    # is gone; the next one is fine.
                    continue
                self._backoff.succeeded()
                job = self._admit(fd, addr, bound, now)
                if job is None:
                    continue
                if held is not None and not self.host.offload.submit(held, self._offloaded):
                    self._spawn_inline(held)
                held = job
        finally:
            if held is not None:
                self._spawn_inline(held)

    def _short_of_resources(self, exc: OSError) -> None:
        """accept() failed for lack of fds or memory: pause, then try again with a growing delay."""
        delay = self._backoff.failed()
        self._pause("resources")
        self.log.warning("accept_paused", error=exc.strerror, retry=delay)
        self.poll(False)
        if self._resume is None:
            self._resume = self.host.loop.call_later(delay, self._resumed)

    def _admit(self, fd: int, addr: Any, bound: sockets.Bound, now: float) -> Job | None:
        """Decide one accepted connection; returns what to spawn, or None (refused and closed)."""
        # The hot path: keep it to plain local operations (no f-strings, no logging calls
        # when log_connections is off, no socket objects for TCP peers).
        env: list[bytes]
        peer: Peer | None = None
        remote = ""
        policy = self.policy
        if self._banner is not None:
            _send_banner(fd, self._banner)
        if bound.listen.kind is ListenKind.TCP:
            host: str = addr[0]
            port: int = addr[1]
            if host[:7] == "::ffff:":
                host = normalize_host(host)
            addr_env = self._addr_env.get(host)
            if addr_env is None:
                addr_env = b"REMOTE_ADDR=" + host.encode()
                if len(self._addr_env) < ADDR_ENV_CACHE:
                    self._addr_env[host] = addr_env
            env = [addr_env, b"REMOTE_PORT=%d" % port]
            if self._needs_peer:
                peer = Peer(host=host)
            if self._log_conns:
                remote = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        else:
            pid, uid, gid = sockets.peer_credentials(fd)
            env = [b"REMOTE_PID=%d" % pid, b"REMOTE_UID=%d" % uid, b"REMOTE_GID=%d" % gid]
            if self._needs_peer:
                peer = Peer(uid=uid)
            if self._log_conns:
                remote = f"pid={pid},uid={uid}"
        refusal = policy.admit(peer, now, _local_minute() if policy.windows else None)
        if refusal is not None:
            if self._banner_fail is not None:
                _send_banner(fd, self._banner_fail)
            os.close(fd)
            self._refuse(refusal.value, remote or _describe(peer, addr))
            return None
        if self._banner_ok is not None:
            _send_banner(fd, self._banner_ok)
        if self._streams is not None:
            self.accepted += 1
            if self._log_conns:
                self.log.info("connection_accepted", remote=remote or _describe(peer, addr),
                              builtin=self._streams.kind.value)
            self._streams.serve(fd, peer)
            return None
        try:
            prepared = self._prepared or self.prepared()
        except SpawnError as exc:
            os.close(fd)
            self._spawn_failed(peer, remote or _describe(peer, addr), exc)
            return None
        err = self._err
        if self._pass_fds:
            env += _FDS_ENV
            fds = [-1, -1 if err == CONN else err, fd if err == CONN else err, fd]
        else:
            fds = [fd, fd, fd if err == CONN else err]
        return Job(fd, fds, env, self._pass_fds, peer, now, remote, prepared)

    def _spawn_inline(self, job: Job) -> None:
        try:
            pid = job.spawn()
        except SpawnError as exc:
            self._spawn_failed(job.peer, job.remote, exc)
            return
        finally:
            os.close(job.fd)  # the child has its copy (or there is no child)
        self._spawned(job, pid)

    def _offloaded(self, job: Job, pid: int, exc: SpawnError | None) -> None:
        """Back on the loop: the helper thread spawned ``job`` (it already closed the connection)."""
        if exc is not None:
            self._spawn_failed(job.peer, job.remote, exc)
            return
        if not self._running:
            kill_group(pid, self.unit.process.stop_signal)  # stopped while it was being spawned
        self._spawned(job, pid)

    def _spawned(self, job: Job, pid: int) -> None:
        self.accepted += 1
        self.spawns += 1
        self.conns[pid] = (job.peer, job.now, job.remote)
        self.host.watch_child(pid, self._exited)
        if self._log_conns:
            self._lines.accepted(job.remote, pid)

    def _spawn_failed(self, peer: Peer | None, remote: str, exc: SpawnError) -> None:
        """An admitted connection got no child (its fd is already closed): undo the admission, log it."""
        self.policy.release(peer)
        self.spawn_failures += 1
        # A missing binary fails every connection: one line a second with a count, not one each.
        self.summary.emit("spawn_failed", level="error", reason=exc.stage, remote=remote, error=str(exc))
        self._refuse("spawn_failed", remote)

    def _refuse(self, reason: str, remote: str) -> None:
        """Count a refused connection by reason; log it, at most once a second per reason (a flood is summarized)."""
        self.refused += 1
        self.refused_by_reason[reason] += 1
        self.summary.emit("connection_refused", reason=reason, remote=remote)

    def _exited(self, pid: int, ex: Exit) -> None:
        self.exited(pid, ex)
        peer, started, remote = self.conns.pop(pid)
        self.policy.release(peer)
        if self._log_conns:
            reaper = self.host.reaper
            ended = reaper.exit_time if reaper is not None and reaper.exit_time is not None else self.host.loop.time()
            self._lines.exited(pid, remote, str(ex), round(ended - started, 6))
        if self._drain.deadline is not None:
            self._drain = lifecycle.drain_exited(self._drain, len(self.conns))
            self._kill_deadline.set(self._drain.deadline)
        # A pending timer (rate, or an fd shortage backing off) resumes by itself; resuming
        # here would cut the back-off short.
        if not self._polling and self._resume is None:
            self._maybe_resume()


class Job(NamedTuple):
    """One admitted connection, ready to spawn."""

    fd: int
    fds: list[int]
    env: list[bytes]
    listen_pid: bool
    peer: Peer | None
    now: float
    remote: str
    prepared: spawn.Prepared

    def spawn(self) -> int:
        """Start the child (from the loop thread or the helper thread); raises SpawnError."""
        return spawn.spawn_child(self.prepared, self.fds, self.env, listen_pid=self.listen_pid)


def _send_banner(fd: int, data: bytes) -> None:
    """Send a banner without waiting: what the socket buffer does not take is dropped (a banner is short)."""
    sock = socket.socket(fileno=fd)
    try:
        sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
    except OSError:
        pass
    finally:
        sock.detach()


def _local_minute() -> int:
    """The minute of the local day, for access_times."""
    t = time.localtime()
    return t.tm_hour * 60 + t.tm_min


def _stderr_slot(stderr: Stderr) -> int:
    """The child's fd 2 source: the connection (CONN), /dev/null (-1) or the daemon's stderr (2)."""
    if stderr is Stderr.CONNECTION:
        return CONN
    return -1 if stderr is Stderr.NULL else 2


def _describe(peer: Peer | None, addr: Any) -> str:
    """A refused peer for the log when connection logging is off (refusals are logged anyway)."""
    if peer is not None:
        return peer.source
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{normalize_host(addr[0])}:{addr[1]}"
    return ""
