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
- a child exits -> the SIGCHLD signalfd (``supervisor.reaper``) is readable,
  ``waitpid(-1, WNOHANG)`` collects every exit, each dispatched in O(1)
  through ``children`` (pid -> owner callback); no thread or fd per child;
- a slot's deadline -> one ``call_at`` timer per slot feeds ``Timer()``;
- a notify datagram -> ``READY=1``/``STATUS=``/``WATCHDOG=1``/``FDSTORE=1``;
- ``SIGHUP`` or a control request -> reload; ``SIGTERM``/``SIGINT`` -> stop.

Before anything is bound, the soft ``RLIMIT_NOFILE`` is raised to the hard
limit, and the configuration's fd budget (every enabled unit's listen entries
and ``fd_store_max``, plus ``FD_RESERVE`` for the daemon's own fds) is checked
against it: a configuration that could run the daemon out of fds is refused at
start (``FdBudgetError``, exit 1) and on reload (the old configuration kept).

The daemon's lifetime is given to it: ``run(shutdown=..., started=...)``
serves until the ``shutdown`` awaitable completes (the CLI completes it from
SIGTERM/SIGINT and posts SIGHUP to ``request_reload``; a test passes an
event), and one task group owns the daemon's own tasks. Signal handlers only
post work to the loop, never run control flow themselves. The reaper and the
spawn helper thread are made with the daemon, on the loop it runs on. All decisions about a slot's life are in
``supervisor.lifecycle`` and about connections in ``supervisor.policy``; this
module carries their actions out.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from supervisor import __version__, _spawn, activation, cgroups, control, handover, matching, metrics, recovery, sockets
from supervisor import config as configuration
from supervisor import reload as reloading
from supervisor.control import Command, Reply, Request, failure
from supervisor.errors import BindError, ConfigError, FdBudgetError, Problem
from supervisor.log import Logger, LogWriter, get_logger
from supervisor.model import Config, InetAddress, Listen, ListenKind, Unit
from supervisor.reaper import Reaper, become_subreaper, exit_of, own_children, signal_child
from supervisor.registry import Registry
from supervisor.spawn import Offload
from supervisor.status import DaemonCounters, DaemonStatus, UnitStatus
from supervisor.units import ChildCallback, Host, kill_group

ORPHAN_STOP_TIMEOUT = 10.0  # seconds an adopted orphan gets after SIGTERM at shutdown
FD_RESERVE = 64  # the daemon's own fds: control, notify, signalfd, log, connections in flight
EARLY_EXITS_MAX = 4096  # unregistered exits remembered (helper-thread spawns, adopted orphans)
# Signals that wait (blocked, pending) across a re-exec's execve until the new image handles them.
EXEC_BLOCKED = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2, signal.SIGCHLD})
STATE_INTERVAL = 1.0  # seconds between rewrites of the children state file (when it changed)
LISTEN_VARS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_PIDFDID", "LISTEN_FDNAMES")

def inherited_fds(environ: Mapping[str, str]) -> list[tuple[int, str]]:
    """fds passed to the daemon itself (``LISTEN_FDS`` for its pid), with their names, parsed as libsystemd does.

    Raises:
        ValueError: malformed variables (libsystemd's -EINVAL); the daemon then adopts nothing.
    """
    return activation.parse_listen_environment(environ, os.getpid())


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (best effort); returns the (soft, hard) now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def fd_budget_problem(config: Config) -> str | None:
    """Why ``config`` does not fit the soft ``RLIMIT_NOFILE``, or None when it does."""
    enabled = [u for u in config.units if u.enabled]
    listeners = sum(len(u.listen) for u in enabled)
    stores = sum(u.fd_store_max for u in enabled)
    need = listeners + stores + FD_RESERVE
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or need <= soft:
        return None
    return (f"configuration needs {need} fds ({listeners} listeners + fd_store_max total {stores} + reserve "
            f"{FD_RESERVE}), over the open-file limit RLIMIT_NOFILE={soft}; raise the limit or lower fd_store_max")


class Daemon:
    """Owns the unit registry, the child table and the control socket; ``run`` serves until shut down.

    Made on the loop it will run on (inside a coroutine): the reaper's signalfd
    and the spawn helper belong to that loop from the start.
    """

    def __init__(self, config: Config, *, environ: Mapping[str, str], config_path: str | None = None,
                 log_writer: LogWriter | None = None) -> None:
        self.config = config
        self.log_writer = log_writer
        self.config_path = config_path
        self.environ = dict(environ)
        self.log = _root_logger()
        self.loop = asyncio.get_running_loop()
        self.children: dict[int, ChildCallback] = {}
        self._stopping = False
        self._children_gone = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._reload_wanted = asyncio.Event()
        self._inherited: dict[int, bool] = {}
        self._inherited_names: dict[int, str] = {}
        self.started_at = time.time()
        self.control: control.ControlServer | None = None
        self._early_exits: dict[int, int] = {}
        self.offload: Offload[Any] = Offload(self.loop)
        self.reaper = Reaper(self.loop, self.reaped, self._watchdog_killed)
        self._all_settled = asyncio.Event()
        self.subreaper = False
        self.handed: handover.State | None = None  # what the previous image left (re-exec), until ready
        self._unplaced: set[int] = set()  # the previous image's children no unit took back
        self._fallback_children = False  # the handover was unreadable: stop the children we cannot place
        self._survivors: dict[int, recovery.Survivor] = {}  # a killed previous run's children, by pid
        self._survivors_gone = asyncio.Event()
        self._state_timer: asyncio.TimerHandle | None = None  # the children state file is due
        self._start_times: dict[int, int] = {}
        self._state_warned = False
        self.cgroup_base: str | None = None
        self.host = Host(self.loop, self.log, self.environ, self.watch_child, self.offload, self._settled,
                         self._unit_handover, lambda: self.cgroup_base, self.reaper)
        self.units = Registry(self.host, self.log)
        self.counters = DaemonCounters(reloads={}, last_reload_success=time.time(), reexecs=0)
        self.metrics: metrics.MetricsServer | None = None
        self._metrics_registry = metrics.registry_for(self.snapshot)

    # ------------------------------------------------------------ binding

    def bind_unit(self, unit: Unit) -> list[sockets.Bound]:
        """Bind (or adopt from inherited fds) every listen entry of ``unit``; all or nothing.

        Raises:
            BindError: located at the listen entry, whatever failed (an OSError or anything else).
        """
        bound: list[sockets.Bound] = []
        listen = unit.listen[0] if unit.listen else None
        try:
            for listen in unit.listen:
                adopted = self._handed_listener(unit, listen)
                for fd, free in self._inherited.items():
                    if adopted is not None:
                        break
                    if free and matching.matches(fd, listen):
                        adopted = sockets.adopt(fd, listen)
                        self._inherited[fd] = False
                        self.log.info("socket_adopted", unit=unit.name, listen=listen.display, fd=fd,
                                      fdname=self._inherited_names.get(fd))
                        break
                if adopted is None:
                    adopted = sockets.bind(listen, unit=unit.name)
                    self.log.info("socket_bound", unit=unit.name, listen=listen.display, fd=adopted.fd)
                bound.append(adopted)
        except Exception as exc:
            for b in bound:
                b.close(remove=not b.adopted)
            if listen is None:
                raise
            if not isinstance(exc, BindError):  # never a traceback for a listener that cannot be set up
                exc = BindError(unit.name, listen.display, f"{type(exc).__name__}: {exc}")
            raise (exc if listen.location is None else exc.at(listen.location)) from None
        return bound

    def _unit_handover(self, name: str) -> handover.UnitHandover | None:
        return self.handed.units.get(name) if self.handed is not None else None

    def _handed_listener(self, unit: Unit, listen: Listen) -> sockets.Bound | None:
        """The listening socket the previous image had for this entry (re-exec), when it still fits."""
        h = self._unit_handover(unit.name)
        fd = h.listen.pop(listen.display, None) if h is not None else None
        if fd is None or h is None:
            return None
        if not matching.matches(fd, listen):
            self.log.warning("handover_socket_changed", unit=unit.name, listen=listen.display, fd=fd)
            with contextlib.suppress(OSError):
                os.close(fd)
            return None
        # O_NONBLOCK belongs to the open file, shared with the running service that may have
        # changed it: adopting must leave it as it is.
        blocking = os.get_blocking(fd)
        bound = sockets.adopt(fd, listen, unit=unit.name)
        os.set_blocking(fd, blocking)
        bound.own_node(h.nodes.get(listen.display))
        self.log.debug("socket_taken_over", unit=unit.name, listen=listen.display, fd=fd)
        return bound

    # ------------------------------------------------------------ children

    def watch_child(self, pid: int, callback: ChildCallback) -> None:
        """Call ``callback(pid, exit)`` on the loop when ``pid`` exits."""
        self.children[pid] = callback
        if self._state_timer is None:
            self._state_timer = self.loop.call_later(STATE_INTERVAL, self._write_state)
        if self._early_exits:
            status = self._early_exits.pop(pid, None)
            if status is not None:
                # Spawned from a helper thread and reaped before it was registered.
                self.loop.call_soon(self.reaped, pid, status)

    def _watchdog_killed(self, new: int, total: int) -> None:
        self.log.warning("child_stopped_before_exec", killed=new, total=total,
                         why="stopped (SIGSTOP or ptrace) between its setuid and its exec, which holds the "
                             "thread that spawned it: killed, so that spawning goes on")

    def reaped(self, pid: int, status: int) -> None:
        """The reaper collected ``pid``: dispatch its exit to the owner in O(1)."""
        callback = self.children.pop(pid, None)
        if callback is None:
            # Not registered (yet): a spawn still being handed back by a helper
            # thread, or an orphan we inherited as a subreaper. Keep a bounded memory.
            if len(self._early_exits) >= EARLY_EXITS_MAX:
                self._early_exits.pop(next(iter(self._early_exits)))
            self._early_exits[pid] = status
        else:
            try:
                callback(pid, exit_of(status))
            except Exception:  # a bug in one unit must not take the daemon down
                self.log.exception("child_exit_handler_failed", pid=pid)
        if not self.children and self._stopping:
            self._children_gone.set()
        self.units.sweep()

    def _set_subreaper(self, wanted: bool) -> None:
        """``subreaper: true`` (always as PID 1): orphans of the units' processes are reaped by the daemon."""
        wanted = wanted or os.getpid() == 1
        if wanted != self.subreaper:
            if become_subreaper(wanted):
                self.subreaper = wanted
                self.log.info("subreaper", enabled=wanted, pid1=os.getpid() == 1)
            else:
                self.log.warning("subreaper_failed", enabled=wanted)

    async def _stop_orphans(self) -> None:
        """As a subreaper, after every unit stopped: what is left is adopted orphans (a service that
        double-forked). They get SIGTERM, then SIGKILL after the default stop timeout, so a container's
        PID 1 leaves nothing behind and a daemon restart finds no stray process holding a port."""
        pids = [p for p in own_children() if p not in self.children]
        if not pids:
            return
        self.log.info("orphans_stopping", pids=pids)
        waits: list[asyncio.Future[None]] = []
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            done: asyncio.Future[None] = self.loop.create_future()

            def gone(fd: int = fd, done: asyncio.Future[None] = done) -> None:
                self.loop.remove_reader(fd)
                os.close(fd)
                if not done.done():
                    done.set_result(None)

            self.loop.add_reader(fd, gone)
            waits.append(done)
            signal_child(pid, signal.SIGTERM, group=False)
        if not waits:  # every one was reaped meanwhile (the hub thread does not wait for the loop)
            self.reaper.reap()
            return
        _, pending = await asyncio.wait(waits, timeout=ORPHAN_STOP_TIMEOUT)
        if pending:
            left = [p for p in own_children() if p not in self.children]
            self.log.warning("orphans_killed", pids=left)
            for pid in left:
                signal_child(pid, signal.SIGKILL, group=False)
            await asyncio.wait(pending, timeout=5)
        self.reaper.reap()

    def _set_cgroups(self, wanted: bool) -> None:
        """``cgroups: true`` (the default): a cgroup v2 per slot process where a hierarchy is writable."""
        if not wanted:
            if self.cgroup_base is not None:
                self.log.info("cgroups", enabled=False)
            self.cgroup_base = None
            return
        if self.cgroup_base is not None:
            return
        base, where = cgroups.find_base()
        self.cgroup_base = base
        if base is not None:
            self.log.info("cgroups", enabled=True, base=base)
        else:
            self.log.info("cgroups", enabled=False, reason=where)

    async def _stop_cgroups(self) -> None:
        """At shutdown, after every unit's processes exited: what they left in their cgroups stops too."""
        groups = [g for rt in self.units.everything() for g in rt.cgroups]
        if not groups:
            return
        deadline = self.loop.time() + ORPHAN_STOP_TIMEOUT
        while any(g.pids() for g in groups) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)  # leftovers were signalled when their slot's process exited
        for g in groups:
            if g.pids():
                self.log.warning("leftovers_killed", pids=g.pids(), cgroup=g.path)
                g.kill()
        for _ in range(40):
            if not any(g.pids() for g in groups):
                break
            await asyncio.sleep(0.05)
        if self.cgroup_base is not None:
            cgroups.remove_base(self.cgroup_base)

    def _settled(self) -> None:
        """A runtime busy without children (a proxy's connections) is idle now."""
        self.units.sweep()
        if self._stopping and not any(rt.busy() for rt in self.units.everything()):
            self._all_settled.set()

    # ------------------------------------------------------------ running

    def summary(self) -> str:
        running = sum(1 for u in self.units if u.pids())
        return f"{len(self.units)} units, {running} running, {len(self.children)} children"

    def request_reload(self) -> None:
        """Ask for a reload (SIGHUP); requests arriving during one coalesce into the next."""
        self._reload_wanted.set()

    async def run(self, *, shutdown: Awaitable[object], started: Callable[[], None] | None = None) -> None:
        """Bind everything, serve until ``shutdown`` completes, then stop every child and close."""
        waiter = asyncio.ensure_future(shutdown)  # owned here: cancelled if we never get to wait on it
        soft, hard = raise_nofile_limit()
        self.log.info("nofile_limit", soft=soft, hard=hard)
        try:
            problem = fd_budget_problem(self.config)
            if problem is not None:
                raise FdBudgetError(problem)
            self._set_subreaper(self.config.main.subreaper)
            self._set_cgroups(self.config.main.cgroups)
            self._take_handover()
            if self.handed is None and not self._fallback_children:
                self._recover_previous_run()
            self._adopt_inherited()
            bound_units: list[tuple[Unit, list[sockets.Bound]]] = []
            try:
                for unit in self.config.units:
                    try:
                        bound_units.append((unit, self.bind_unit(unit) if unit.enabled else []))
                    except BindError as exc:
                        if self.handed is None:
                            raise
                        # After a re-exec the other units must keep running whatever this one does.
                        self.log.error("unit_bind_failed", unit=unit.name, error=str(exc))
            except BindError:
                for _, bound in bound_units:
                    for b in bound:
                        b.close(remove=not b.adopted)
                raise
            self._close_unmatched_inherited()
            for unit, bound in bound_units:
                self.units.add(unit, bound)
            await self._start_control()
            await self._set_metrics(self.config.main.metrics_listen)
            for runtime in self.units:
                if self.handed is not None:
                    runtime.resume()
                else:
                    runtime.activate()
            requester = self._finish_handover()
            self._stop_survivors()
            gc.collect()
            _spawn.trim()
            self.log.info("daemon_ready", units=len(self.units), pid=os.getpid())
            _sd_notify("READY=1", f"STATUS={self.summary()}")
            self._store_listeners()
            if requester is not None:
                _answer(requester, control.Reply(ok=True, pid=os.getpid(), version=__version__,
                                                 reexecs=self.counters["reexecs"]))
            if started is not None:
                started()
            async with asyncio.TaskGroup() as tasks:
                reloads = tasks.create_task(self._serve_reloads())
                await waiter
                reloads.cancel()
            _sd_notify("STOPPING=1")
            self.log.info("daemon_stopping")
            await self._shutdown()
        finally:
            waiter.cancel()
            self.reaper.close()
            self.offload.close()
        self.log.info("daemon_stopped")

    async def _serve_reloads(self) -> None:
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            try:
                await self.reload()
            except (ConfigError, BindError):
                pass  # logged by reload itself; a bad reload keeps the old config
            except Exception as exc:  # SIGHUP has no one to answer: log it, never a bare traceback
                self.log.exception("reload_failed", errors=[f"internal error: {exc}"])

    def _adopt_inherited(self) -> None:
        """Take the fds a service manager passed us (``LISTEN_FDS`` for our pid) and forget the variables."""
        try:
            passed = inherited_fds(self.environ)
        except ValueError as exc:
            self.log.warning("inherited_fds_invalid", error=str(exc))
            passed = []
        self._inherited.update({fd: True for fd, _ in passed})
        self._inherited_names.update({fd: name for fd, name in passed if name != "unknown"})
        for fd, _ in passed:
            os.set_inheritable(fd, False)
        for var in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_PIDFDID", "LISTEN_FDNAMES"):
            self.environ.pop(var, None)  # as sd_listen_fds(unset_environment=1): never passed on
        if passed:
            self.log.info("inherited_fds", fds=[fd for fd, _ in passed], names=[name for _, name in passed])

    def _close_unmatched_inherited(self) -> None:
        for fd, free in self._inherited.items():
            if free:
                self.log.warning("inherited_fd_unmatched", fd=fd, fdname=self._inherited_names.get(fd),
                                 address=_describe_fd(fd))
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._inherited = {}
        self._inherited_names = {}

    async def _shutdown(self) -> None:
        self._stopping = True
        for runtime in self.units.everything():
            runtime.shutdown()
            runtime.stop_strays(signal.SIGTERM)
        for pid in self._unplaced:
            kill_group(pid, signal.SIGTERM)
        if any(rt.strays for rt in self.units.everything()) or self._unplaced:
            self.loop.call_later(ORPHAN_STOP_TIMEOUT, self._kill_leftovers)
        # A spawn still in flight on the helper thread comes back stopped
        # (its unit is no longer running) and joins the children waited for.
        await self.offload.idle.wait()
        if self.children:
            await self._children_gone.wait()
        if any(rt.busy() for rt in self.units.everything()):
            await self._all_settled.wait()  # open proxy connections: each drains within its stop_timeout
        if self.subreaper:
            await self._stop_orphans()
        await self._wait_survivors()
        await self._stop_cgroups()
        if self._state_timer is not None:
            self._state_timer.cancel()
            self._state_timer = None
        recovery.remove(recovery.path_for(self.config.main.control_socket))
        for runtime in self.units.everything():
            runtime.close(remove=True)
        if self.control is not None:
            await self.control.close()
        await self._set_metrics(None)

    def snapshot(self) -> tuple[list[UnitStatus], DaemonCounters]:
        """Everything the metrics show, read when Prometheus scrapes."""
        return [rt.status() for rt in self.units], self.counters

    async def _set_metrics(self, address: InetAddress | str | None) -> None:
        """Serve metrics at ``address`` (None: not at all). Raises BindError, changing nothing."""
        staged = await self._stage_metrics(address)
        await self._commit_metrics(staged)

    async def _stage_metrics(self, address: InetAddress | str | None) -> tuple[bool, metrics.MetricsServer | None]:
        """(changed, new server): the new endpoint bound and serving beside the old one, or nothing to do.

        Raises:
            BindError: the new address cannot be bound (the old endpoint keeps serving).
        """
        current = self.metrics.bound.listen.address if self.metrics is not None else None
        if address == current:
            return False, None
        if address is None:
            return True, None
        kind = ListenKind.TCP if isinstance(address, InetAddress) else ListenKind.UNIX
        bound = sockets.bind(Listen(kind=kind, address=address, name="metrics", backlog=128), unit="metrics")
        server = metrics.MetricsServer(bound, self._metrics_registry, self.log)
        try:
            await server.start()
        except OSError as exc:
            await server.close()
            raise BindError("metrics", bound.listen.display, exc.strerror or str(exc)) from exc
        return True, server

    async def _commit_metrics(self, staged: tuple[bool, metrics.MetricsServer | None]) -> None:
        changed, server = staged
        if changed:
            old, self.metrics = self.metrics, server
            if old is not None:
                await old.close()

    async def _start_control(self) -> None:
        main = self.config.main
        self.control = control.ControlServer(main.control_socket, main.control_mode, self.log, self.handle,
                                             idle_timeout=control.IDLE_TIMEOUT)
        handed = self.handed.control if self.handed is not None else None
        await self.control.start(adopt=handed)

    # ------------------------------------------------------------ control

    async def handle(self, req: Request) -> Reply:
        """What a control request does: the daemon's dispatch (the server only parses and answers)."""
        if req.command is Command.RELOAD:
            try:
                summary = await self.reload()
            except ConfigError as exc:
                return Reply(ok=False, error="configuration invalid; nothing changed", reason="invalid_config",
                             errors=[str(p) for p in exc.problems])
            except BindError as exc:
                return Reply(ok=False, error=f"reload failed; nothing changed: {exc}", reason="bind_failed",
                             errors=[str(exc)])
            reply = Reply(ok=True, added=summary["added"], changed=summary["changed"], removed=summary["removed"])
            if "failed" in summary:
                reply["failed"] = summary["failed"]
            return reply
        if req.command is Command.REEXEC:
            return await self.reexec(req.peer)
        if req.command is Command.STATUS and req.unit is None:
            counters = self.counters
            return Reply(ok=True, units=[rt.status() for rt in self.units],
                         daemon=DaemonStatus(pid=os.getpid(), version=__version__, started=round(self.started_at, 3),
                                             summary=self.summary(), reloads=dict(counters["reloads"]),
                                             last_reload_success=counters["last_reload_success"],
                                             reexecs=counters["reexecs"]))
        assert req.unit is not None  # parse_request: every other command names its unit
        rt = self.units.get(req.unit)
        if rt is None:
            return failure(f"unknown unit {req.unit!r}")
        if req.command is Command.STATUS:
            return Reply(ok=True, units=[rt.status()])
        if req.command is Command.START:
            rt.operator_start()
        elif req.command is Command.STOP:
            rt.operator_stop()
        else:
            rt.operator_restart()
        self.log.info(f"unit_{req.command.value}_requested", unit=req.unit)
        return Reply(ok=True, unit=rt.status())

    # ------------------------------------------------------------ surviving a crash (SPEC 12)

    def _write_state(self) -> None:
        """Record every child (unit, role, pid, start time) for the next run should this one be killed."""
        self._state_timer = None
        entries = []
        live: dict[int, int] = {}
        for rt in self.units.everything():
            slots = set(rt.handover_slot_pids())
            for pid in {*rt.pids(), *rt.strays}:
                start = self._start_times.get(pid) or recovery.start_time(pid)
                if start is None:
                    continue
                live[pid] = start
                entries.append(recovery.Entry(rt.unit.name, "slot" if pid in slots else "child", pid, start))
        self._start_times = live
        try:
            recovery.write(recovery.path_for(self.config.main.control_socket), entries)
        except OSError as exc:
            if not self._state_warned:
                self._state_warned = True
                self.log.warning("state_file_failed", error=f"{exc.filename}: {exc.strerror}")

    def _recover_previous_run(self) -> None:
        """A previous run was killed: take its listeners back from the children it left."""
        entries, why = recovery.read(recovery.path_for(self.config.main.control_socket))
        if why is not None:
            self.log.warning("state_file_ignored", reason=why)
        if not entries:
            return
        fds, survivors, problems = recovery.recover(entries)
        for problem in problems:
            self.log.warning("recovery_incomplete", error=problem)
        for fd in fds:
            self._inherited.setdefault(fd, True)
        self._survivors = {s.entry.pid: s for s in survivors}
        self.log.info("previous_run_found", children=len(entries), alive=len(survivors), listeners=len(fds))

    def _stop_survivors(self) -> None:
        """The previous run's services and workers stop (their units start afresh); per-connection ones finish."""
        units = {u.name: u for u in self.config.units}
        for pid, survivor in self._survivors.items():
            self.loop.add_reader(survivor.pidfd, self._survivor_gone, pid)
            if survivor.entry.role == "slot":
                unit = units.get(survivor.entry.unit)
                sig = unit.process.stop_signal if unit is not None else signal.SIGTERM
                timeout = unit.process.stop_timeout if unit is not None else ORPHAN_STOP_TIMEOUT
                self.log.info("previous_child_stopping", unit=survivor.entry.unit, pid=pid)
                kill_group(pid, sig)
                self.loop.call_later(timeout, self._kill_survivor, pid)
            else:
                self.log.info("previous_child_watched", unit=survivor.entry.unit, pid=pid)

    def _kill_survivor(self, pid: int) -> None:
        if pid in self._survivors:
            self.log.warning("previous_child_killed", unit=self._survivors[pid].entry.unit, pid=pid)
            kill_group(pid, signal.SIGKILL)

    def _survivor_gone(self, pid: int) -> None:
        survivor = self._survivors.pop(pid, None)
        if survivor is None:
            return
        self.loop.remove_reader(survivor.pidfd)
        os.close(survivor.pidfd)
        self.log.info("previous_child_exited", unit=survivor.entry.unit, pid=pid)
        if not self._survivors:
            self._survivors_gone.set()

    async def _wait_survivors(self) -> None:
        if not self._survivors:
            return
        for pid in list(self._survivors):
            kill_group(pid, signal.SIGTERM)
        self._survivors_gone.clear()
        try:
            await asyncio.wait_for(self._survivors_gone.wait(), ORPHAN_STOP_TIMEOUT)  # set by their pidfds
        except TimeoutError:
            for pid in list(self._survivors):
                kill_group(pid, signal.SIGKILL)

    def _store_listeners(self) -> None:
        """Under systemd: keep every unit's listeners in its fd store too (FDSTORE=1, FDNAME=unit)."""
        if not self.environ.get("NOTIFY_SOCKET") and not os.environ.get("NOTIFY_SOCKET"):
            return
        for rt in self.units:
            fds = [b.fd for b in rt.bound if not b.closed]
            if fds:
                _sd_notify("FDSTORE=1", f"FDNAME={rt.unit.name}", fds=fds)

    # ------------------------------------------------------------ re-exec (SPEC 12)

    def request_reexec(self) -> None:
        """SIGUSR2: re-exec with no one to answer (the outcome is logged)."""
        task = self.loop.create_task(self.reexec(-1))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def reexec(self, requester: int) -> Reply:
        """Replace this image with the installed program, same pid, keeping listeners, children and state.

        On success this never returns: the new image answers ``requester``. On failure the old image
        goes on exactly as before and the reply says why.
        """
        async with self._reload_lock:
            if self._stopping:
                return Reply(ok=False, error="the daemon is stopping", reason="reexec_failed")
            blockers = [b for b in (rt.handover_blocker() for rt in self.units.everything()) if b]
            if blockers:
                return Reply(ok=False, error=f"cannot re-exec now: {blockers[0]}", reason="busy")
            try:  # the new image re-reads the configuration: it must be readable now
                configuration.load_config(self.config_path, environ=self.environ)
            except ConfigError as exc:
                return Reply(ok=False, error=f"cannot re-exec: the configuration is invalid: {exc.problems[0]}",
                             reason="invalid_config", errors=[str(p) for p in exc.problems])
            program = self.environ.get("SOCKVISOR_EXEC") or sys.executable
            argv = [program, "-m", "supervisor", *sys.argv[1:]]
            self.log.info("reexec", program=program, argv=argv[1:])
            _sd_notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
            was_polling = [rt for rt in self.units.everything() if rt.polling]
            for rt in self.units.everything():
                rt.poll(False)
                rt.endpoint.pause()
            await self.offload.idle.wait()  # a spawn in flight on the helper thread comes back first
            await self._set_metrics(None)  # the new image binds it again (a scrape in between fails)
            self.reaper.freeze()  # nothing is reaped until the new image runs: the children handed over are live
            error = self._exec(program, argv, requester)
            # Only on failure: everything goes on as before.
            self.reaper.thaw()
            for rt in self.units.everything():
                rt.endpoint.resume()
            for rt in was_polling:
                rt.poll(True)
            with contextlib.suppress(BindError):
                await self._set_metrics(self.config.main.metrics_listen)
            _sd_notify("READY=1", f"STATUS={self.summary()}")
            self.log.error("reexec_failed", error=error)
            return Reply(ok=False, error=f"re-exec failed; still running the old image: {error}",
                         reason="reexec_failed")

    def _handover_state(self, requester: int) -> handover.State:
        state = handover.State(started_at=self.started_at,
                               counters={"reloads": dict(self.counters["reloads"]),
                                         "last_reload_success": self.counters["last_reload_success"],
                                         "reexecs": self.counters["reexecs"]})
        for rt in self.units:
            state.units[rt.unit.name] = rt.hand_over()
        state.children = sorted(self.children)  # after the units: what they took in is not listed
        if self.control is not None:
            state.control = self.control.listening()
        if requester >= 0:
            with contextlib.suppress(OSError):
                state.requester = os.dup(requester)
        return state

    def _exec(self, program: str, argv: list[str], requester: int) -> str:
        """execve the new image with the state; returns why it failed (on success it does not return)."""
        state = self._handover_state(requester)
        kept = state.fds()
        memfd = -1
        mask: set[int | signal.Signals] | None = None
        try:
            memfd = handover.write_memfd(state)
            for fd in kept:
                os.set_inheritable(fd, True)
            env = {k: v for k, v in os.environ.items() if k not in LISTEN_VARS}
            env[handover.ENV] = str(memfd)
            if self.log_writer is not None:
                self.log_writer.close(1.0)  # every line so far reaches stderr before the image goes
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, EXEC_BLOCKED)
            os.execve(program, argv, env)
        except (OSError, ValueError) as exc:
            why = f"{program}: {exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if self.log_writer is not None:
            self.log_writer.attach(self.loop)
        for fd in kept:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        for leftover in (memfd, state.requester):
            if leftover is not None and leftover >= 0:
                with contextlib.suppress(OSError):
                    os.close(leftover)
        return why

    def _take_handover(self) -> None:
        """A re-exec's new image: read what the previous one left; unreadable, adopt what can be found."""
        try:
            self.handed = handover.take(self.environ)
        except handover.HandoverError as exc:
            # Fall back to a fresh start that keeps every listener: the inherited listening
            # sockets are adopted by address, as LISTEN_FDS would be; old children are stopped.
            self.log.error("handover_unreadable", error=str(exc))
            self.handed = None
            for fd in _inheritable_sockets():
                self._inherited.setdefault(fd, True)
            self._fallback_children = True
            return
        if self.handed is None:
            return
        state = self.handed
        self.started_at = state.started_at or self.started_at
        reloads = state.counters.get("reloads")
        if isinstance(reloads, dict):
            self.counters["reloads"] = {k: v for k, v in reloads.items() if isinstance(v, int)}
        last = state.counters.get("last_reload_success")
        if isinstance(last, int | float):
            self.counters["last_reload_success"] = float(last)
        count = state.counters.get("reexecs")
        self.counters["reexecs"] = (count if isinstance(count, int) else 0) + 1
        for fd in state.fds():
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        self.log.info("reexec_resumed", units=len(state.units), children=len(state.children),
                      reexecs=self.counters["reexecs"])

    def _finish_handover(self) -> int | None:
        """After every unit resumed: place what is left, reap what exited meanwhile; the requester's fd."""
        state, self.handed = self.handed, None
        if self._fallback_children:
            self._fallback_children = False
            for pid in own_children():
                if pid not in self.children:
                    self._adopt_unplaced(pid)
        if state is None:
            self.reaper.reap()
            return None
        for h in state.units.values():
            rt = self.units.get(h.name)
            taken = {b.fd for b in rt.bound} if rt is not None else set()
            if rt is not None and rt.resumed is not None:
                taken |= {fd for fds in h.extras.values() for fd in fds}  # the pool took or closed them
            for fd in list(h.listen.values()) + [fd for fds in h.extras.values() for fd in fds]:
                if fd not in taken:
                    with contextlib.suppress(OSError):
                        os.close(fd)  # a listener no unit took back (the configuration changed)
            if rt is None or rt.resumed is None:
                if h.notify is not None:
                    with contextlib.suppress(OSError):
                        os.close(h.notify[1])
                for _, fd in h.fd_store:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        for pid in state.children:
            if pid not in self.children:
                self._adopt_unplaced(pid)
        self._reap_handed_over()
        return state.requester

    def _reap_handed_over(self) -> None:
        """Reap the exits while no image was watching; forget a handed-over pid that is no child of ours.

        Such a pid would never exit here, and shutdown waits for every child: a handover that
        listed a child the previous image had already reaped must not hang the daemon.
        """
        alive = set(own_children()) if os.path.isdir(f"/proc/{os.getpid()}/task") else None
        # Taken before the drain: anything registered later (a restart it triggers) is not suspect.
        suspects = [] if alive is None else [pid for pid in self.children if pid not in alive]
        self.reaper.reap()  # what exited before the look above is dispatched here
        for pid in suspects:
            if pid in self.children:
                self.log.warning("child_vanished", pid=pid)
                self.reaped(pid, 0)

    def _adopt_unplaced(self, pid: int) -> None:
        """A child of the previous image that no unit took back: stopped, reaped, forgotten."""
        self._unplaced.add(pid)
        self.watch_child(pid, self._unplaced_exited)
        self.log.info("child_unplaced_stopping", pid=pid)
        kill_group(pid, signal.SIGTERM)

    def _unplaced_exited(self, pid: int, ex: Any) -> None:
        self._unplaced.discard(pid)
        self.log.info("child_unplaced_exited", pid=pid, status=str(ex))

    def _kill_leftovers(self) -> None:
        for rt in self.units.everything():
            rt.stop_strays(signal.SIGKILL)
        for pid in self._unplaced:
            kill_group(pid, signal.SIGKILL)

    # ------------------------------------------------------------ reload

    def _count_reload(self, result: str) -> None:
        self.counters["reloads"][result] = self.counters["reloads"].get(result, 0) + 1

    async def reload(self) -> reloading.ReloadSummary:
        """Re-read the config and apply it as a diff; an invalid config changes nothing."""
        async with self._reload_lock:
            _sd_notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                try:
                    new = configuration.load_config(self.config_path, environ=self.environ)
                except ConfigError as exc:
                    self.log.error("reload_failed", errors=[str(p) for p in exc.problems])
                    raise
                problem = fd_budget_problem(new)
                if problem is not None:
                    self.log.error("reload_failed", errors=[problem])
                    raise ConfigError([Problem(None, "", problem)])
                try:
                    staged = await self._stage_metrics(new.main.metrics_listen)
                except BindError as exc:
                    self.log.error("reload_failed", errors=[str(exc)])
                    raise
                try:
                    summary = reloading.apply(self.units, new, self.log)
                except BindError:
                    if staged[1] is not None:
                        await staged[1].close()
                    raise
                await self._commit_metrics(staged)
                self.config = new
                self._set_subreaper(new.main.subreaper)
                self._set_cgroups(new.main.cgroups)
            except ConfigError:
                self._count_reload("invalid_config")
                raise
            except BindError:
                self._count_reload("bind_failed")
                raise
            else:
                self._count_reload("success")
                self.counters["last_reload_success"] = time.time()
            finally:
                _sd_notify("READY=1", f"STATUS={self.summary()}")
            for name in summary["removed"]:
                _sd_notify("FDSTOREREMOVE=1", f"FDNAME={name}")
            self._store_listeners()
            return summary


def _describe_fd(fd: int) -> str:
    """What an inherited fd is bound to, for the log (best effort)."""
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            return sockets.format_sockaddr(s.family, s.getsockname())
    except OSError:
        return "?"


def _inheritable_sockets() -> list[int]:
    """fds above 2 without FD_CLOEXEC that are sockets: a previous image's listeners when its state is lost."""
    import fcntl
    import stat

    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2:
            continue
        try:
            if fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                continue
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                found.append(fd)
        except OSError:
            continue
    return found


def _answer(fd: int, reply: Reply) -> None:
    """Write ``reply`` to the control connection the previous image handed over, then close it."""
    import json

    try:
        with socket.socket(fileno=fd) as conn:
            conn.settimeout(5)
            conn.sendall(json.dumps(reply).encode() + b"\n")
    except OSError:
        pass


def _root_logger() -> Logger:
    return get_logger()


def _sd_notify(*assignments: str, fds: list[int] | None = None) -> None:
    """Tell our own service manager (if any); failures are not ours to act on."""
    with contextlib.suppress(OSError):
        activation.notify(*assignments, fds=fds or ())
