"""The daemon: wires config, sockets, spawning, reaping and the lifecycle core.

Theory of operation
-------------------
``Daemon.run`` binds every enabled unit's sockets first (adopting any that a
parent service manager passed with ``LISTEN_FDS``), starts the control and
notify sockets, tells systemd ``READY=1``, then lets the event loop drive
everything from readiness:

- a polled listening fd becomes readable -> the unit's runtime reacts
  (service/pool: feed ``Readiness`` to the lifecycle core and stop polling;
  accept: accept a batch and spawn one child per connection);
- a child exits -> the one reaper thread (``supervisor.reaper``) posts it,
  and it is dispatched in O(1) through ``children`` (pid -> owner callback);
  no thread per child, no pidfd per child;
- a slot's deadline -> one ``call_at`` timer per slot feeds ``Timer()``;
- a notify datagram -> ``READY=1``/``STATUS=``/``WATCHDOG=1``/``FDSTORE=1``;
- ``SIGHUP`` or a control request -> reload; ``SIGTERM``/``SIGINT`` -> stop.

Signal handlers only post work to the loop (``add_signal_handler``), never run
control flow themselves. All decisions about a slot's life are in
``supervisor.lifecycle`` and about connections in ``supervisor.policy``; this
module carries their actions out.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from supervisor import activation, lifecycle, notifyd, sockets, spawn
from supervisor.errors import BindError, ConfigError, SpawnError
from supervisor.lifecycle import Exit, SlotState
from supervisor.model import Config, ListenKind, Mode, Pass, Start, Stderr, Unit
from supervisor.policy import Peer, Policy, normalize_host
from supervisor.reaper import Reaper

ChildCallback = Callable[[int, Exit], None]

# Errors from accept(2) that say the daemon (not the connection) is short of a
# resource: back off instead of spinning on a readable socket.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
RESOURCE_BACKOFF = 0.1  # seconds; doubles up to 2 s while the shortage lasts
ACCEPT_BATCH = 32  # connections accepted per readiness callback before yielding to the loop


def exit_of(status: int) -> Exit:
    if os.WIFSIGNALED(status):
        return Exit(signal=os.WTERMSIG(status))
    return Exit(code=os.WEXITSTATUS(status))


def kill_group(pid: int, sig: int) -> None:
    """Signal a child's process group (every child is a session leader), or the pid if the group is gone."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    except PermissionError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


class UnitRuntime:
    """What every mode shares: the unit's sockets, its notify endpoint, its spawn preparation, its counters."""

    def __init__(self, daemon: Daemon, unit: Unit, bound: list[sockets.Bound]) -> None:
        self.daemon = daemon
        self.unit = unit
        self.bound = bound
        self.log = daemon.log.bind(unit=unit.name)
        self.status_text = ""
        self.accepted = 0
        self.refused = 0
        self.fd_store: list[tuple[str, int]] = []
        self.endpoint = notifyd.Endpoint(unit.name, self._on_notify, self._on_notify_drop)
        daemon.loop.add_reader(self.endpoint.fileno(), self.endpoint.readable)
        self._prepared: spawn.Prepared | None = None
        self._polling = False
        self.stopped_by_operator = not unit.enabled
        self.retired = False
        self.set_blocking()

    # ------------------------------------------------------------ plumbing

    def set_blocking(self) -> None:
        """``pass: stdio`` children get blocking fds (inetd); ``pass: fds`` non-blocking (systemd)."""
        blocking = self.unit.pass_ is Pass.STDIO and self.unit.mode is not Mode.ACCEPT
        for b in self.bound:
            if b.sock is not None:
                sockets.set_blocking(b.fd, blocking)

    def prepared(self) -> spawn.Prepared:
        """The per-unit spawn preparation, computed once (retried while it fails: a binary may appear later)."""
        if self._prepared is None:
            self._prepared = spawn.prepare(
                self.unit.process,
                unit=self.unit.name,
                notify_socket=self.endpoint.address,
                daemon_environ=self.daemon.environ,
            )
        return self._prepared

    def poll(self, on: bool) -> None:
        """Watch (or stop watching) the unit's listening fds for readiness."""
        if on == self._polling:
            return
        self._polling = on
        loop = self.daemon.loop
        for b in self.bound:
            if on:
                loop.add_reader(b.fd, self.readable, b)
            else:
                loop.remove_reader(b.fd)

    @property
    def polling(self) -> bool:
        return self._polling

    def readable(self, bound: sockets.Bound) -> None:
        raise NotImplementedError

    def reconfigured(self) -> None:
        """``self.unit`` was replaced by a reload: drop what was derived from the old one."""
        self._prepared = None

    def retire(self) -> None:
        """The unit was removed from the config: stop polling and wind down (see reload)."""
        self.retired = True
        self.shutdown()

    def output_fds(self) -> tuple[int, int]:
        """(stdout, stderr) for a child without a connection: the daemon's stderr, or /dev/null (-1)."""
        err = -1 if self.unit.process.stderr is Stderr.NULL else 2
        return err, err

    # ------------------------------------------------------------ notify

    def _on_notify_drop(self, reason: str) -> None:
        self.log.warning("notify_dropped", reason=reason)

    def _on_notify(self, msg: notifyd.Message) -> None:
        fields = msg.fields
        owner = self.owner_of(msg.pid)
        if owner is None:
            for fd in msg.fds:
                os.close(fd)
            self.log.warning("notify_dropped", reason="sender is not a child of this unit", sender=msg.pid)
            return
        if "STATUS" in fields:
            self.status_text = fields["STATUS"]
        if fields.get("FDSTOREREMOVE") == "1":
            name = fields.get("FDNAME", "stored")
            for n, fd in [e for e in self.fd_store if e[0] == name]:
                self.fd_store.remove((n, fd))
                os.close(fd)
        if fields.get("FDSTORE") == "1" and msg.fds:
            name = fields.get("FDNAME", "stored")
            for fd in msg.fds:
                if len(self.fd_store) >= self.unit.fd_store_max:
                    os.close(fd)
                    self.log.warning("fd_store_full", max=self.unit.fd_store_max)
                else:
                    self.fd_store.append((name, fd))
                    self.log.info("fd_stored", name=name, count=len(self.fd_store))
        else:
            for fd in msg.fds:
                os.close(fd)
        self.notified(owner, fields)

    def owner_of(self, sender: int) -> int | None:
        """The pid of our child that ``sender`` belongs to (itself, or a process in its session)."""
        pids = self.pids()
        if sender in pids:
            return sender
        sid = notifyd.session_of(sender)
        if sid in pids:
            return sid
        if sid is None and len(pids) == 1:
            # The sender is already gone (systemd-notify exits at once); with one
            # child there is no doubt whom it spoke for.
            return pids[0]
        return None

    def notified(self, pid: int, fields: Mapping[str, str]) -> None:
        """A child of this unit sent ``fields``."""

    # ------------------------------------------------------------ interface

    def pids(self) -> list[int]:
        raise NotImplementedError

    def activate(self) -> None:
        """Begin: poll, or start at once (eager)."""
        raise NotImplementedError

    def operator_start(self) -> None:
        raise NotImplementedError

    def operator_stop(self) -> None:
        raise NotImplementedError

    def operator_restart(self) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        """Stop polling and stop every child (the daemon waits for the children table to empty)."""
        raise NotImplementedError

    def state(self) -> str:
        raise NotImplementedError

    def restarts(self) -> int:
        return 0

    def status(self) -> dict[str, Any]:
        return {
            "name": self.unit.name,
            "mode": self.unit.mode.value,
            "state": self.state(),
            "listen": [b.listen.display for b in self.bound],
            "pids": self.pids(),
            "connections": {"active": self.active(), "accepted": self.accepted, "refused": self.refused},
            "restarts": self.restarts(),
            "status": self.status_text,
            "description": self.unit.description,
        }

    def active(self) -> int:
        return len(self.pids())

    def close(self, *, remove: bool = True) -> None:
        """Release everything: readers, notify socket, stored fds, listening fds."""
        self.poll(False)
        self.daemon.loop.remove_reader(self.endpoint.fileno())
        self.endpoint.close()
        for _, fd in self.fd_store:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fd_store.clear()
        for b in self.bound:
            b.close(remove=remove)


class SlotDriver:
    """Feeds one lifecycle slot its events and carries out its actions."""

    def __init__(self, runtime: SlottedRuntime, index: int) -> None:
        self.runtime = runtime
        self.index = index
        self.slot, _ = lifecycle.initial(runtime.unit)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    def feed(self, event: lifecycle.Event) -> None:
        rt = self.runtime
        loop = rt.daemon.loop
        self.slot, actions = lifecycle.step(rt.unit, self.slot, event, loop.time())
        for action in actions:
            match action:
                case lifecycle.Spawn():
                    self._spawn()
                case lifecycle.Kill(pid=pid, signal=sig):
                    kill_group(pid, sig)
                case lifecycle.Log(event=name, fields=fields):
                    extra = {"slot": self.index} if rt.unit.mode is Mode.POOL else {}
                    rt.log.info(name, **dict(fields), **extra)
        self._arm()
        rt.slots_changed()

    def _arm(self) -> None:
        deadline = self.slot.deadline
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = self.runtime.daemon.loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = None
        self.feed(lifecycle.Timer())

    def _spawn(self) -> None:
        rt = self.runtime
        try:
            pid = rt.spawn_slot(self.index)
        except SpawnError as exc:
            self.feed(lifecycle.SpawnFailed(str(exc)))
            return
        rt.daemon.watch_child(pid, self._exited)
        self.feed(lifecycle.Spawned(pid))

    def _exited(self, pid: int, ex: Exit) -> None:
        self.feed(lifecycle.Exited(pid, ex))

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None


class SlottedRuntime(UnitRuntime):
    """``mode: service`` (one slot) and ``mode: pool`` (``workers`` slots)."""

    def __init__(self, daemon: Daemon, unit: Unit, bound: list[sockets.Bound]) -> None:
        super().__init__(daemon, unit, bound)
        count = unit.workers if unit.mode is Mode.POOL else 1
        self.slots = [SlotDriver(self, i) for i in range(count)]
        self._shutting_down = False

    def pids(self) -> list[int]:
        return [d.slot.pid for d in self.slots if d.slot.pid is not None]

    def restarts(self) -> int:
        return sum(d.slot.restarts for d in self.slots)

    def state(self) -> str:
        states = {d.slot.state for d in self.slots}
        for s in (SlotState.RUNNING, SlotState.STARTING, SlotState.STOPPING, SlotState.BACKOFF,
                  SlotState.FAILED, SlotState.IDLE, SlotState.STOPPED):
            if s in states:
                return s.value
        return SlotState.STOPPED.value

    def reconfigured(self) -> None:
        super().reconfigured()
        want = self.unit.workers if self.unit.mode is Mode.POOL else 1
        while len(self.slots) < want:
            driver = SlotDriver(self, len(self.slots))
            self.slots.append(driver)
            if self.pids() or self.unit.start is Start.EAGER:
                driver.feed(lifecycle.StartRequest())
        while len(self.slots) > want:
            driver = self.slots.pop()
            driver.feed(lifecycle.StopRequest(lifecycle.After.NOTHING))
            self.daemon.retired_slots.append(driver)

    def slots_changed(self) -> None:
        # Poll only while every slot waits for readiness: a running service
        # (or any live worker) owns the sockets.
        self.poll(not self._shutting_down and all(lifecycle.polls(d.slot) for d in self.slots))

    def readable(self, bound: sockets.Bound) -> None:
        self.poll(False)
        for d in self.slots:
            d.feed(lifecycle.Readiness())

    def activate(self) -> None:
        if not self.unit.enabled:
            return
        if self.unit.start is Start.EAGER:
            for d in self.slots:
                d.feed(lifecycle.StartRequest())
        else:
            self.slots_changed()

    def operator_start(self) -> None:
        self.stopped_by_operator = False
        for d in self.slots:
            d.feed(lifecycle.StartRequest(operator=True))
        self.slots_changed()

    def operator_stop(self) -> None:
        self.stopped_by_operator = True
        for d in self.slots:
            d.feed(lifecycle.StopRequest(lifecycle.After.STOP))
        self.poll(False)

    def operator_restart(self) -> None:
        self.stopped_by_operator = False
        for d in self.slots:
            d.feed(lifecycle.StopRequest(lifecycle.After.RESTART))

    def shutdown(self) -> None:
        self._shutting_down = True
        self.poll(False)
        for d in self.slots:
            d.feed(lifecycle.StopRequest(lifecycle.After.NOTHING))

    def close(self, *, remove: bool = True) -> None:
        for d in self.slots:
            d.cancel()
        super().close(remove=remove)

    def notified(self, pid: int, fields: Mapping[str, str]) -> None:
        for d in self.slots:
            if d.slot.pid == pid:
                if fields.get("READY") == "1":
                    d.feed(lifecycle.NotifyReady())
                if fields.get("WATCHDOG") == "1":
                    d.feed(lifecycle.WatchdogPing())
                if fields.get("STOPPING") == "1":
                    self.log.info("child_stopping_notified", pid=pid)

    def spawn_slot(self, index: int) -> int:
        """Spawn the process of slot ``index`` with the unit's fds; returns its pid."""
        unit = self.unit
        prepared = self.prepared()
        out, err = self.output_fds()
        if unit.pass_ is Pass.STDIO:
            fd = self.bound[0].fd
            # inetd "wait" programs expect a blocking socket; polling (libuv)
            # made it non-blocking, and the flag is shared with the child's copy.
            sockets.set_blocking(fd, True)
            return spawn.spawn_child(prepared, [fd, fd, err], self._extra_env(index, []), listen_pid=False)
        fds = [b.fd for b in self.bound] + [fd for _, fd in self.fd_store]
        names = [b.listen.name for b in self.bound] + [n for n, _ in self.fd_store]
        extra = self._extra_env(index, names)
        return spawn.spawn_child(prepared, [-1, out, err, *fds], extra, listen_pid=True)

    def _extra_env(self, index: int, names: list[str]) -> list[bytes]:
        env: list[bytes] = []
        if names:
            env.append(f"LISTEN_FDS={len(names)}".encode())
            env.append(("LISTEN_FDNAMES=" + ":".join(names)).encode())
        if self.unit.mode is Mode.POOL:
            env.append(f"SOCKVISOR_WORKER={index}".encode())
        if self.unit.watchdog:
            env.append(f"WATCHDOG_USEC={int(self.unit.watchdog * 1_000_000)}".encode())
        return env


class AcceptRuntime(UnitRuntime):
    """``mode: accept``: one child per connection, under xinetd-style policy."""

    def __init__(self, daemon: Daemon, unit: Unit, bound: list[sockets.Bound]) -> None:
        super().__init__(daemon, unit, bound)
        self.policy = Policy.for_unit(unit)
        self.conns: dict[int, tuple[Peer | None, float, str]] = {}
        self._resume: asyncio.TimerHandle | None = None
        self._resource_backoff = RESOURCE_BACKOFF
        self._running = False
        self._stopping = False
        self._kill_timer: asyncio.TimerHandle | None = None
        self._pass_fds = unit.pass_ is Pass.FDS
        self._log_conns = unit.log_connections

    def pids(self) -> list[int]:
        return list(self.conns)

    def reconfigured(self) -> None:
        super().reconfigured()
        old = self.policy
        self.policy = Policy.for_unit(self.unit)
        self.policy.active = old.active
        self.policy.by_source = old.by_source
        self._pass_fds = self.unit.pass_ is Pass.FDS
        self._log_conns = self.unit.log_connections

    def retire(self) -> None:
        # A removed accept unit lets its children finish their connections.
        self.retired = True
        self._running = False
        self.poll(False)

    def state(self) -> str:
        if self._stopping and self.conns:
            return SlotState.STOPPING.value
        if not self._running:
            return SlotState.STOPPED.value
        return SlotState.RUNNING.value if self.conns else SlotState.IDLE.value

    def activate(self) -> None:
        if self.unit.enabled:
            self._running = True
            self._stopping = False
            self._maybe_resume()

    def operator_start(self) -> None:
        self.stopped_by_operator = False
        self.activate()

    def operator_stop(self) -> None:
        self.stopped_by_operator = True
        self.shutdown()

    def operator_restart(self) -> None:
        self.operator_stop()
        self.operator_start()

    def shutdown(self) -> None:
        self._running = False
        self._stopping = True
        self.poll(False)
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        proc = self.unit.process
        for pid in list(self.conns):
            kill_group(pid, proc.stop_signal)
        if self.conns and self._kill_timer is None:
            self._kill_timer = self.daemon.loop.call_later(proc.stop_timeout, self._kill_remaining)

    def _kill_remaining(self) -> None:
        self._kill_timer = None
        for pid in list(self.conns):
            self.log.info("child_killed", pid=pid)
            kill_group(pid, signal.SIGKILL)

    def close(self, *, remove: bool = True) -> None:
        for handle in (self._resume, self._kill_timer):
            if handle is not None:
                handle.cancel()
        super().close(remove=remove)

    def _maybe_resume(self) -> None:
        """Poll again if the policy allows accepting now; else arrange to look again."""
        if not self._running:
            return
        loop = self.daemon.loop
        when = self.policy.accepting(loop.time())
        if when == 0.0:
            self.poll(True)
            return
        self.poll(False)
        if when is not None and self._resume is None:
            self._resume = loop.call_at(when, self._resumed)

    def _resumed(self) -> None:
        self._resume = None
        self._maybe_resume()

    def readable(self, bound: sockets.Bound) -> None:
        sock = bound.sock
        if sock is None:
            return
        loop = self.daemon.loop
        policy = self.policy
        for _ in range(ACCEPT_BATCH):
            now = loop.time()
            if policy.accepting(now) != 0.0:
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
            self._resource_backoff = RESOURCE_BACKOFF
            self._connection(fd, addr, bound, now)

    def _short_of_resources(self, exc: OSError) -> None:
        """accept() failed for lack of fds or memory: pause, then try again with a growing delay."""
        self.log.warning("accept_paused", error=exc.strerror, retry=self._resource_backoff)
        self.poll(False)
        if self._resume is None:
            self._resume = self.daemon.loop.call_later(self._resource_backoff, self._resumed)
        self._resource_backoff = min(self._resource_backoff * 2, 2.0)

    def _connection(self, fd: int, addr: Any, bound: sockets.Bound, now: float) -> None:
        kind = bound.listen.kind
        env: list[bytes]
        peer: Peer | None = None
        remote = ""
        if kind is ListenKind.TCP:
            host = normalize_host(addr[0])
            port = addr[1]
            env = [f"REMOTE_ADDR={host}".encode(), f"REMOTE_PORT={port}".encode()]
            if self.policy.needs_peer:
                peer = Peer(host=host)
            if self._log_conns:
                remote = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        else:
            pid, uid, gid = _peer_credentials(fd)
            env = [f"REMOTE_PID={pid}".encode(), f"REMOTE_UID={uid}".encode(), f"REMOTE_GID={gid}".encode()]
            if self.policy.needs_peer:
                peer = Peer(uid=uid)
            if self._log_conns:
                remote = f"pid={pid},uid={uid}"
        refusal = self.policy.admit(peer, now)
        if refusal is not None:
            os.close(fd)
            self.refused += 1
            self.log.info("connection_refused", remote=remote or (peer.source if peer else ""), reason=refusal.value)
            return
        proc_stderr = self.unit.process.stderr
        err = fd if proc_stderr is Stderr.CONNECTION else (-1 if proc_stderr is Stderr.NULL else 2)
        try:
            if self._pass_fds:
                env.append(b"LISTEN_FDS=1")
                env.append(b"LISTEN_FDNAMES=connection")
                pid = spawn.spawn_child(self.prepared(), [-1, -1 if err == fd else err, err, fd], env,
                                        listen_pid=True)
            else:
                pid = spawn.spawn_child(self.prepared(), [fd, fd, err], env, listen_pid=False)
        except SpawnError as exc:
            os.close(fd)
            self.policy.release(peer)
            self.refused += 1
            self.log.error("spawn_failed", remote=remote, error=str(exc))
            return
        os.close(fd)
        self.accepted += 1
        self.conns[pid] = (peer, now, remote)
        self.daemon.watch_child(pid, self._exited)
        if self._log_conns:
            self.log.info("connection_accepted", remote=remote, pid=pid)

    def _exited(self, pid: int, ex: Exit) -> None:
        peer, started, remote = self.conns.pop(pid)
        self.policy.release(peer)
        if self._log_conns:
            self.log.info("child_exited", pid=pid, remote=remote, status=str(ex),
                          duration=round(self.daemon.loop.time() - started, 6))
        if self._stopping and not self.conns and self._kill_timer is not None:
            self._kill_timer.cancel()
            self._kill_timer = None
        if not self._polling:
            self._maybe_resume()


def _peer_credentials(fd: int) -> tuple[int, int, int]:
    """SO_PEERCRED of a connected unix socket: (pid, uid, gid)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)
    try:
        raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    finally:
        s.detach()
    pid, uid, gid = int.from_bytes(raw[0:4], "little", signed=True), int.from_bytes(raw[4:8], "little"), \
        int.from_bytes(raw[8:12], "little")
    return pid, uid, gid


RUNTIMES: dict[Mode, type[UnitRuntime]] = {
    Mode.SERVICE: SlottedRuntime,
    Mode.POOL: SlottedRuntime,
    Mode.ACCEPT: AcceptRuntime,
}


def inherited_fds(environ: Mapping[str, str]) -> list[int]:
    """fds passed to the daemon itself with LISTEN_FDS for its own pid (systemd socket units)."""
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    return list(range(3, 3 + max(count, 0)))


class Daemon:
    """Owns every unit runtime, the child table and the control socket; ``run`` serves until stopped."""

    def __init__(self, config: Config, *, environ: Mapping[str, str], config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.environ = dict(environ)
        self.log = _root_logger()
        self.units: dict[str, UnitRuntime] = {}
        self.children: dict[int, ChildCallback] = {}
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._inherited: dict[int, bool] = {}
        self.started_at = time.time()
        self.control: Any = None
        self.retiring: list[UnitRuntime] = []
        self.retired_slots: list[SlotDriver] = []

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    # ------------------------------------------------------------ binding

    def bind_unit(self, unit: Unit) -> list[sockets.Bound]:
        """Bind (or adopt from inherited fds) every listen entry of ``unit``; all or nothing."""
        bound: list[sockets.Bound] = []
        try:
            for listen in unit.listen:
                adopted = None
                for fd, free in self._inherited.items():
                    if free and sockets.matches(fd, listen):
                        adopted = sockets.adopt(fd, listen)
                        self._inherited[fd] = False
                        self.log.info("socket_adopted", unit=unit.name, listen=listen.display, fd=fd)
                        break
                bound.append(adopted if adopted is not None else sockets.bind(listen, unit=unit.name))
        except BindError:
            for b in bound:
                b.close(remove=not b.adopted)
            raise
        return bound

    def add_unit(self, unit: Unit, bound: list[sockets.Bound]) -> UnitRuntime:
        runtime = RUNTIMES[unit.mode](self, unit, bound)
        self.units[unit.name] = runtime
        self.log.info("unit_started", unit=unit.name, mode=unit.mode.value,
                      listen=[b.listen.display for b in bound], enabled=unit.enabled)
        return runtime

    # ------------------------------------------------------------ children

    def watch_child(self, pid: int, callback: ChildCallback) -> None:
        """Call ``callback(pid, exit)`` on the loop when ``pid`` exits."""
        self.children[pid] = callback
        self.reaper.expect()

    def reaped(self, pid: int, status: int) -> None:
        """The reaper collected ``pid``: dispatch its exit to the owner in O(1)."""
        callback = self.children.pop(pid, None)
        if callback is not None:
            try:
                callback(pid, exit_of(status))
            except Exception:  # a bug in one unit must not take the daemon down
                self.log.exception("child_exit_handler_failed", pid=pid)
        if not self.children and self._stop.is_set():
            self._children_gone.set()
        self.sweep_retired()

    def sweep_retired(self) -> None:
        """Close the sockets of removed units whose last child is gone."""
        if self.retiring:
            done = [rt for rt in self.retiring if not rt.pids()]
            for rt in done:
                self.retiring.remove(rt)
                rt.close(remove=True)
                self.log.info("unit_removed", unit=rt.unit.name)
        if self.retired_slots:
            self.retired_slots = [d for d in self.retired_slots if d.slot.pid is not None]

    # ------------------------------------------------------------ running

    def summary(self) -> str:
        running = sum(1 for u in self.units.values() if u.pids())
        return f"{len(self.units)} units, {running} running, {len(self.children)} children"

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, *, ready: Callable[[], None] | None = None) -> None:
        """Bind everything, serve until ``request_stop`` (SIGTERM/SIGINT), then stop every child."""
        loop = self.loop
        self._children_gone = asyncio.Event()
        self.reaper = Reaper(loop, self.reaped)
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        self._inherited = dict.fromkeys(inherited_fds(self.environ), True)
        for fd in self._inherited:
            os.set_inheritable(fd, False)
        try:
            bound_units: list[tuple[Unit, list[sockets.Bound]]] = []
            try:
                for unit in self.config.units:
                    bound_units.append((unit, self.bind_unit(unit) if unit.enabled else []))
            except BindError:
                for _, bound in bound_units:
                    for b in bound:
                        b.close(remove=not b.adopted)
                raise
            self._close_unmatched_inherited()
            for unit, bound in bound_units:
                self.add_unit(unit, bound)
            await self._start_control()
            for runtime in self.units.values():
                runtime.activate()
            self.log.info("daemon_ready", units=len(self.units), pid=os.getpid())
            _sd_notify("READY=1", f"STATUS={self.summary()}")
            if ready is not None:
                ready()
            await self._stop.wait()
            _sd_notify("STOPPING=1")
            self.log.info("daemon_stopping")
            await self._shutdown()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self.reaper.close()
        self.log.info("daemon_stopped")

    def _close_unmatched_inherited(self) -> None:
        for fd, free in self._inherited.items():
            if free:
                self.log.warning("inherited_fd_unmatched", fd=fd)
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._inherited = {}

    async def _shutdown(self) -> None:
        for runtime in [*self.units.values(), *self.retiring]:
            runtime.shutdown()
        if self.children:
            await self._children_gone.wait()
        for runtime in [*self.units.values(), *self.retiring]:
            runtime.close(remove=True)
        if self.control is not None:
            await self.control.close()

    async def _start_control(self) -> None:
        from supervisor import control  # the control plane is optional for embedding/tests

        self.control = control.ControlServer(self)
        await self.control.start()

    # ------------------------------------------------------------ reload

    def _sighup(self) -> None:
        asyncio.ensure_future(self._reload_logged())  # noqa: RUF006 - owned by the lock; result logged

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except (ConfigError, BindError):
            pass

    async def reload(self) -> dict[str, Any]:
        """Re-read the config and apply it as a diff; an invalid config changes nothing."""
        from supervisor import reload as reloading

        async with self._reload_lock:
            _sd_notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                return reloading.apply(self)
            finally:
                _sd_notify("READY=1", f"STATUS={self.summary()}")


def _root_logger() -> Any:
    from supervisor.log import get_logger

    return get_logger()


def _sd_notify(*assignments: str) -> None:
    """Tell our own service manager (if any); failures are not ours to act on."""
    with contextlib.suppress(OSError):
        activation.notify(*assignments)
