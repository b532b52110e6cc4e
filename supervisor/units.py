"""What every unit runtime shares, whatever its mode.

A runtime owns one unit's bound sockets, its notify endpoint, its spawn
preparation and its counters, and turns operator commands and readiness into
work. The mode-specific runtimes are ``supervisor.service`` (one lifecycle
slot), ``supervisor.pool`` (``workers`` slots) and ``supervisor.accept`` (one
child per connection).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from supervisor import cgroups, handover, notifyd, sockets, spawn
from supervisor.errors import SpawnError
from supervisor.lifecycle import Exit
from supervisor.log import Logger
from supervisor.logsummary import LogSummary
from supervisor.model import Pass, Stderr, Unit, valid_fdname
from supervisor.reaper import Reaper, signal_child
from supervisor.status import Connections, LastExit, NotifyCounters, UnitStatus

ChildCallback = Callable[[int, Exit], None]


def exit_outcome(ex: Exit) -> str:
    """``success`` (exit 0), ``failure`` (another code) or ``signal`` (killed): the metrics' exit outcome."""
    if ex.signal is not None:
        return "signal"
    return "success" if ex.code == 0 else "failure"


class UnitState(enum.Enum):
    """Where a unit is in its own life (its processes' states are the slots')."""

    ENABLED = "enabled"  # runs when its sockets become ready (or at once for start: eager)
    STOPPED = "stopped"  # stopped by the operator, or disabled in the config: nothing runs until start
    SHUTTING_DOWN = "shutting_down"  # the daemon is stopping
    RETIRING = "retiring"  # removed from the config: its children wind down, then its sockets close


#: States in which a unit never polls or starts anything again.
WINDING_DOWN = frozenset({UnitState.SHUTTING_DOWN, UnitState.RETIRING})


@dataclass(frozen=True, slots=True)
class Host:
    """What a unit runtime may use of the process that runs it, and nothing else.

    The daemon builds one for all its runtimes; a test builds one on its own
    loop (``Host(loop, log, {}, children.__setitem__, spawn.Offload(loop))``).
    """

    loop: asyncio.AbstractEventLoop  # readers, timers, time()
    log: Logger  # each runtime binds unit=... once
    environ: Mapping[str, str]  # the daemon's environment, for pass_environment
    watch_child: Callable[[int, ChildCallback], None]  # call back on the loop when the pid exits
    offload: spawn.Offload[Any]  # the helper spawn thread (accept mode)
    # A runtime that was busy without children (a proxy's open connections) is not any more.
    settled: Callable[[], None] = lambda: None
    # After a re-exec: what the previous image handed over for the unit of this name (None: start fresh).
    handover: Callable[[str], handover.UnitHandover | None] = lambda _name: None
    # Where slot processes get their own cgroups (supervisor.cgroups), or None: not in use.
    cgroup_base: Callable[[], str | None] = lambda: None
    # The daemon's reaper, whose thread also serves accept mode's bulk units (None: a host
    # without one; accept mode then serves every connection from the loop).
    reaper: Reaper | None = None


class Deadline:
    """One loop timer kept at a time that moves: ``set`` re-arms only when the time changes.

    The pure cores (``lifecycle``, ``rolling``) say *when* something must
    happen as a deadline in their state; this keeps exactly one timer per
    owner at that deadline and calls ``callback`` when it passes.
    """

    __slots__ = ("_at", "_callback", "_handle", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self._at: float | None = None

    def set(self, at: float | None) -> None:
        if at == self._at:
            return
        self.cancel()
        self._at = at
        if at is not None:
            self._handle = self._loop.call_at(at, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._at = None

    def _fire(self) -> None:
        self._handle = None
        self._at = None
        self._callback()

# systemd's fdname_is_valid(): printable ASCII, no ':' (the LISTEN_FDNAMES separator), 1-255 chars.


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def kill_group(pid: int, sig: int) -> None:
    """Signal a child's process group (every child is a session leader), or the pid if the group is gone."""
    signal_child(pid, sig)  # never a pid the reaper collected and has not dispatched yet


class UnitRuntime:
    """What every mode shares: the unit's sockets, its notify endpoint, its spawn preparation, its counters."""

    def __init__(self, host: Host, unit: Unit, bound: list[sockets.Bound]) -> None:
        self.host = host
        self.unit = unit
        self.bound = bound
        self.log = host.log.bind(unit=unit.name)
        self.status_text = ""
        self.accepted = 0
        self.refused = 0
        self.refused_by_reason: collections.Counter[str] = collections.Counter()
        # For status and metrics (read at scrape time; the hot path only adds).
        self.spawns = 0
        self.spawn_failures = 0
        self.exits: collections.Counter[str] = collections.Counter()  # by outcome
        self.pauses: collections.Counter[str] = collections.Counter()  # times accepting paused, by cause
        self.paused: str | None = None  # the cause accepting is paused for now, or None
        self.started_at = time.time()
        self.fd_store: list[tuple[str, int]] = []
        # Dropped notify messages by reason, for status (the log only summarizes them).
        self.notify_dropped: collections.Counter[str] = collections.Counter()
        self.summary = LogSummary(self.log, host.loop)
        taken = host.handover(unit.name)
        # What the previous image handed over, when it ran this unit in this mode (see resume()).
        self.resumed = taken if taken is not None and taken.mode == unit.mode.value else None
        self.strays: set[int] = set()  # children without a slot, adopted from the previous image
        self.cgroups: list[cgroups.Group] = []  # its slot processes' cgroups, and leftovers being stopped
        self.endpoint = notifyd.Endpoint(unit.name, self._on_notify, self._on_notify_drop, self._on_notify_pause,
                                         adopt=self.resumed.notify if self.resumed is not None else None)
        self.endpoint.start(host.loop)
        self._prepared: spawn.Prepared | None = None
        self._polling = False
        self.life = UnitState.ENABLED if unit.enabled else UnitState.STOPPED
        # The last child exit (pid, exit, wall time), kept raw: formatted only when status asks.
        self.last_exit: tuple[int, Exit, float] | None = None
        if self.resumed is not None:
            self._restore(self.resumed)  # fds as the previous image (and a running child) left them
        else:
            self.set_blocking()

    # ------------------------------------------------------------ re-exec (supervisor.handover)

    _COUNTERS = ("accepted", "refused", "spawns", "spawn_failures", "started_at")
    _COUNTERS_BY = ("refused_by_reason", "exits", "pauses", "notify_dropped")

    def hand_over(self) -> handover.UnitHandover:
        """This unit's part of the state the next image takes over (fds stay open and owned here)."""
        counters: dict[str, Any] = {key: getattr(self, key) for key in self._COUNTERS}
        counters.update({key: dict(getattr(self, key)) for key in self._COUNTERS_BY})
        counters["status_text"] = self.status_text
        if self.last_exit is not None:
            pid, ex, at = self.last_exit
            counters["last_exit"] = [pid, ex.code, ex.signal, at]
        return handover.UnitHandover(
            name=self.unit.name, mode=self.unit.mode.value, life=self.life.value,
            listen={b.listen.display: b.fd for b in self.bound if not b.closed},
            nodes={b.listen.display: b.node for b in self.bound if not b.closed and b.node is not None},
            notify=(self.endpoint.address, self.endpoint.fileno()),
            fd_store=list(self.fd_store), counters=counters, slots=self.handover_slots(),
            strays=sorted(set(self.pids()) - set(self.handover_slot_pids()) | self.strays),
        )  # fmt: skip

    def handover_blocker(self) -> str | None:
        """Why this unit cannot be handed over right now (None: it can)."""
        return None

    def handover_slots(self) -> list[Any]:
        """The lifecycle slots to hand over (service, pool and proxy mode)."""
        return []

    def handover_slot_pids(self) -> list[int]:
        return [s.pid for s in self.handover_slots() if s.pid is not None]

    def _restore(self, h: handover.UnitHandover) -> None:
        c = h.counters
        for key in self._COUNTERS:
            value = c.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                setattr(self, key, type(getattr(self, key))(value))
        for key in self._COUNTERS_BY:
            value = c.get(key)
            if isinstance(value, dict):
                getattr(self, key).update({k: v for k, v in value.items() if isinstance(v, int)})
        if isinstance(c.get("status_text"), str):
            self.status_text = c["status_text"]
        last = c.get("last_exit")
        if isinstance(last, list) and len(last) == 4 and isinstance(last[0], int):
            self.last_exit = (last[0], Exit(code=last[1], signal=last[2]), float(last[3]))
        self.fd_store = list(h.fd_store)
        if h.life == UnitState.STOPPED.value and self.unit.enabled:
            self.life = UnitState.STOPPED

    def resume(self) -> None:
        """Instead of ``activate`` after a re-exec: take the handed-over processes back, then carry on."""
        h = self.resumed
        if h is not None:
            self.resume_slots(h)
            for pid in h.strays:
                self.adopt_stray(pid)
        if self.life is UnitState.ENABLED:
            self.resume_activate()

    def resume_slots(self, h: handover.UnitHandover) -> None:
        """Put the handed-over slots back (modes with slots)."""

    def resume_activate(self) -> None:
        self.activate()

    def adopt_stray(self, pid: int) -> None:
        """A child of the previous image with no slot here: reaped and counted, stopped with the unit."""
        self.strays.add(pid)
        self.host.watch_child(pid, self._stray_exited)

    def _stray_exited(self, pid: int, ex: Exit) -> None:
        self.strays.discard(pid)
        self.exited(pid, ex)
        if not self.busy():
            self.host.settled()

    def stop_strays(self, sig: int) -> None:
        for pid in list(self.strays):
            kill_group(pid, sig)

    # ------------------------------------------------------------ plumbing

    def set_blocking(self) -> None:
        """``pass: stdio`` children get blocking fds (inetd); ``pass: fds`` non-blocking (systemd)."""
        blocking = self.unit.pass_ is Pass.STDIO and self.unit.mode.hands_over_listeners
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
                daemon_environ=self.host.environ,
            )
        return self._prepared

    def poll(self, on: bool) -> None:
        """Watch (or stop watching) the unit's listening fds for readiness."""
        if on == self._polling:
            return
        self._polling = on
        loop = self.host.loop
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

    def reconfigure(self, unit: Unit, bound: list[sockets.Bound], *, was_polling: bool) -> bool:
        """Take a reload's new settings and socket set (same mode); live children keep theirs.

        Returns True when the unit should be (re)activated now: it is enabled, not
        stopped by the operator, and was polling or has no process.
        """
        if unit.enabled and not self.unit.enabled:
            self.life = UnitState.ENABLED  # enabling a disabled unit starts it, as a fresh one would
        self.poll(False)
        self.bound = bound
        self.unit = unit
        self.set_blocking()
        self.reconfigured()
        if not unit.enabled:
            self.operator_stop()
            return False
        return self.life is UnitState.ENABLED and (was_polling or not self.pids())

    def rebind(self, replacements: dict[int, sockets.Bound]) -> None:
        """A failed reload re-bound sockets it had closed: put them back at their index (drop the lost ones)."""
        for index, b in replacements.items():
            self.bound[index] = b
        self.bound = [b for b in self.bound if not b.closed]
        self.set_blocking()

    def keep_only(self, bound: list[sockets.Bound]) -> None:
        """Mode change: stop polling and keep only ``bound`` (what the successor did not take over)."""
        self.poll(False)
        self.bound = bound

    def retire(self) -> None:
        """The unit was removed from the config: stop polling and wind down (see reload)."""
        self.life = UnitState.RETIRING
        self.shutdown()

    def output_fds(self) -> tuple[int, int]:
        """(stdout, stderr) for a child without a connection: the daemon's stderr, or /dev/null (-1)."""
        err = -1 if self.unit.process.stderr is Stderr.NULL else 2
        return err, err

    # ------------------------------------------------------------ notify
    #
    # The fd store follows systemd's: FDSTORE=1 keeps the fds sent with it under
    # FDNAME= ("stored" by default), an fd already in the store (same file) is
    # not kept twice, at most ``fd_store_max`` are kept, FDSTOREREMOVE=1 with
    # FDNAME= drops every fd of that name. Stored fds outlive the processes and
    # are passed to every later one after the listening fds (service and pool
    # mode); an accept-mode child has no restart to survive, so its fds are
    # refused. Unlike systemd, a stored fd is not polled for hang-ups: it stays
    # until removed or the unit goes away.

    def _on_notify_drop(self, reason: str, sender: int) -> None:
        self.notify_dropped[reason] += 1
        self.summary.emit("notify_dropped", level="warning", reason=reason, sender=sender)

    def _on_notify_pause(self, delay: float) -> None:
        self.summary.emit("notify_paused", level="warning", reason="rate exceeded", delay=round(delay, 3))

    def drain_notify(self) -> None:
        """Read what is queued now (before handling an exit, so a dying child's last words count)."""
        self.endpoint.drain()

    def sender_uids(self) -> frozenset[int]:
        """The uids a sender on this unit's notify socket may have: root and the unit's user."""
        uid = -1
        with contextlib.suppress(SpawnError):
            uid = self.prepared().credentials.uid
        return frozenset({0, uid if uid >= 0 else os.geteuid()})

    def _on_notify(self, msg: notifyd.Message) -> None:
        fields = msg.fields
        if fields == {"BARRIER": "1"}:
            # sd_notify_barrier(): closing its fd is the reply, after everything sent
            # before it was handled (one socket keeps the order). It changes no
            # state, so it needs no owner: a sender that is not ours learns nothing.
            _close_all(msg.fds)
            return
        owner, reason = notifyd.identify(msg, self.pids(), self.sender_uids())
        if owner is None:
            # FDSTORE=1 (or any fd) from a sender we cannot name never reaches the store.
            _close_all(msg.fds)
            self._on_notify_drop(reason, msg.pid)
            return
        self.log.debug("notify_received", pid=owner, sender=msg.pid, keys=sorted(fields), fds=len(msg.fds))
        if "STATUS" in fields and fields["STATUS"] != self.status_text:
            self.status_text = fields["STATUS"]
            self.log.debug("status_changed", pid=owner, status=self.status_text)
        if fields.get("FDSTOREREMOVE") == "1":
            self._fd_store_remove(fields.get("FDNAME"))
        if fields.get("FDSTORE") == "1":
            self._fd_store_add(fields.get("FDNAME", "stored"), msg.fds, owner)
        elif msg.fds:
            _close_all(msg.fds)
            # BARRIER=1 (sd_notify_barrier) sends an fd only to have it closed.
            if fields.get("BARRIER") != "1":
                self.log.warning("notify_fds_closed", pid=owner, count=len(msg.fds),
                                 reason="fds sent without FDSTORE=1")
        self.notified(owner, fields)

    def release_fd_store(self) -> None:
        """Close every stored fd (an operator's stop: systemd's FileDescriptorStorePreserve=no)."""
        if not self.fd_store:
            return
        count = len(self.fd_store)
        _close_all(fd for _, fd in self.fd_store)
        self.fd_store.clear()
        self.log.info("fd_store_released", count=count)

    def _fd_store_remove(self, name: str | None) -> None:
        if name is None or not valid_fdname(name):
            self.log.warning("fd_store_refused", reason="FDSTOREREMOVE=1 needs a valid FDNAME=")
            return
        gone = [fd for n, fd in self.fd_store if n == name]
        self.fd_store = [(n, fd) for n, fd in self.fd_store if n != name]
        _close_all(gone)
        self.log.info("fd_removed", fdname=name, removed=len(gone), count=len(self.fd_store))

    def _fd_store_add(self, name: str, fds: tuple[int, ...], owner: int) -> None:
        if not fds:
            return
        if not self.unit.mode.hands_over_listeners or self.unit.pass_ is Pass.STDIO:
            _close_all(fds)
            self.log.warning("fd_store_refused", pid=owner, reason=f"no fd store in mode {self.unit.mode.value}"
                             if not self.unit.mode.hands_over_listeners else "no fd store with pass: stdio")
            return
        if not valid_fdname(name):
            _close_all(fds)
            self.log.warning("fd_store_refused", pid=owner, reason="invalid FDNAME", fdname=name)
            return
        known = {_identity(fd) for _, fd in self.fd_store}
        for fd in fds:
            ident = _identity(fd)
            if ident in known:
                os.close(fd)  # the same file is in the store already (systemd does not keep it twice)
            elif len(self.fd_store) >= self.unit.fd_store_max:
                os.close(fd)
                self.log.warning("fd_store_full", pid=owner, fdname=name, max=self.unit.fd_store_max)
            else:
                known.add(ident)
                self.fd_store.append((name, fd))
                self.log.info("fd_stored", pid=owner, fdname=name, count=len(self.fd_store))

    def notified(self, pid: int, fields: Mapping[str, str]) -> None:
        """A child of this unit sent ``fields``."""

    # ------------------------------------------------------------ interface

    def pids(self) -> list[int]:
        raise NotImplementedError

    def busy(self) -> bool:
        """Whether anything of the unit still runs (a retiring unit's sockets close when nothing does)."""
        return bool(self.pids() or self.strays)

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

    def status(self) -> UnitStatus:
        return self.with_processes(self.base_status())

    def base_status(self) -> UnitStatus:
        return UnitStatus(
            name=self.unit.name,
            mode=self.unit.mode.value,
            state=self.state(),
            listen=[b.listen.display for b in self.bound],
            pids=self.pids(),
            connections=Connections(active=self.active(), accepted=self.accepted, refused=self.refused,
                                    refused_by_reason=dict(self.refused_by_reason)),
            restarts=self.restarts(),
            status=self.status_text,
            description=self.unit.description,
            last_exit=self._last_exit_status(),
            notify=NotifyCounters(dropped=dict(self.notify_dropped), paused=self.endpoint.paused),
            fd_store=[name for name, _ in self.fd_store],
            spawns=self.spawns,
            spawn_failures=self.spawn_failures,
            exits=dict(self.exits),
            pauses=dict(self.pauses),
            paused=self.paused,
            started_at=round(self.started_at, 3),
        )

    def with_processes(self, status: UnitStatus) -> UnitStatus:
        if self.cgroups:
            status["processes"] = sum(len(g.pids()) for g in self.cgroups)
        return status

    def _last_exit_status(self) -> LastExit | None:
        if self.last_exit is None:
            return None
        pid, ex, at = self.last_exit
        return LastExit(pid=pid, status=str(ex), at=round(at, 3))

    def active(self) -> int:
        return len(self.pids())

    def exited(self, pid: int, ex: Exit) -> None:
        """Every mode's child exit: remembered for status, counted by outcome for metrics."""
        self.last_exit = (pid, ex, time.time())
        self.exits[exit_outcome(ex)] += 1

    def close(self, *, remove: bool = True) -> None:
        """Release everything: readers, notify socket, stored fds, listening fds."""
        self.poll(False)
        self.endpoint.close()
        self.summary.flush()
        for _, fd in self.fd_store:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fd_store.clear()
        for b in self.bound:
            b.close(remove=remove)


