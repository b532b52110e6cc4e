"""``mode: service``: one process in one lifecycle slot; and the slot driver pools reuse.

A ``SlotDriver`` feeds one slot's events to the pure core (``supervisor.lifecycle``)
and carries out the actions: spawn, signal, log, and the one timer at the
slot's deadline. It knows its runtime only as a ``UnitRuntime`` plus two
callables the owner passes in: which listening fds slot ``index`` gets, and
what to do after every ``feed`` (the owner re-evaluates polling; a pool also
turns slot states into roll events). ``ServiceRuntime`` owns one driver;
``supervisor.pool.PoolRuntime`` owns many. Neither inherits from the other:
the rules both follow (spawn environment, notify handling, when to poll, the
unit's state, an operator's stop) are the functions of this module.

The sockets are polled only while every slot waits for readiness.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping

from supervisor import cgroups, handover, lifecycle, sockets, spawn
from supervisor.errors import SpawnError
from supervisor.lifecycle import Exit, SlotState
from supervisor.model import Mode, Pass, Start, Unit
from supervisor.units import WINDING_DOWN, Deadline, Host, UnitRuntime, UnitState, kill_group

# How a slot's process is started: (runtime, slot index, listen fds, cgroup dir fd to be born in) -> pid.
Spawner = Callable[[UnitRuntime, int, list[int], int | None], int]


class SlotDriver:
    """Feeds one lifecycle slot its events and carries out its actions."""

    def __init__(self, runtime: UnitRuntime, index: int, *, fds: Callable[[int], list[int]],
                 changed: Callable[[SlotDriver], None], surge: bool = False,
                 spawner: Spawner | None = None) -> None:
        self.runtime = runtime
        self.index = index
        self._fds = fds
        self._spawner = spawner or spawn_slot
        self._changed = changed
        # A pool's second process for a slot during a rolling restart, until it takes the slot over.
        self.surge = surge
        self.slot, _ = lifecycle.initial(runtime.unit)
        self._group: cgroups.Group | None = None  # the cgroup of the slot's current process
        self._deadline = Deadline(runtime.host.loop,
                                  lambda: self.feed(lifecycle.Timer(stored=bool(runtime.fd_store))))

    def feed(self, event: lifecycle.Event) -> None:
        rt = self.runtime
        loop = rt.host.loop
        self.slot, actions = lifecycle.step(rt.unit, self.slot, event, loop.time())
        for action in actions:
            match action:
                case lifecycle.Spawn():
                    self._spawn()
                case lifecycle.Kill(pid=pid, signal=sig):
                    kill_group(pid, sig)
                case lifecycle.Log(event=name, fields=fields):
                    extra = self._slot_fields()
                    if self.surge:
                        extra["surge"] = True
                    rt.log.info(name, **dict(fields), **extra)
        self._deadline.set(self.slot.deadline)
        self._changed(self)

    def notified(self, fields: Mapping[str, str]) -> None:
        """This slot's process sent ``fields``."""
        if fields.get("READY") == "1":
            self.feed(lifecycle.NotifyReady())
        if fields.get("WATCHDOG") == "1":
            self.feed(lifecycle.WatchdogPing())
        if fields.get("STOPPING") == "1":
            self.runtime.log.info("child_stopping_notified", pid=self.slot.pid, **self._slot_fields())

    def _slot_fields(self) -> dict[str, object]:
        return {"slot": self.index} if self.runtime.unit.mode is Mode.POOL else {}

    def _spawn(self) -> None:
        rt = self.runtime
        try:
            pid, group = self._start()
        except SpawnError as exc:
            rt.spawn_failures += 1
            self.feed(lifecycle.SpawnFailed(str(exc)))
            return
        rt.spawns += 1
        rt.host.watch_child(pid, self._exited)
        if group is not None:
            rt.cgroups.append(group)
            self._group = group
        self.feed(lifecycle.Spawned(pid))

    def _start(self) -> tuple[int, cgroups.Group | None]:
        """Spawn the slot's process in a new cgroup of its own (where cgroups are in use): (pid, the cgroup)."""
        rt = self.runtime
        fds = self._fds(self.index)
        base = rt.host.cgroup_base()
        if base is None:
            return self._spawner(rt, self.index, fds, None), None
        try:
            group = cgroups.Group.create(base, rt.unit.name)
        except OSError as exc:
            rt.log.warning("cgroup_failed", error=f"{base}: {exc.strerror}")
            return self._spawner(rt, self.index, fds, None), None
        try:
            fd = group.open()
        except OSError as exc:  # out of fds, say
            rt.log.warning("cgroup_failed", error=f"{group.path}: {exc.strerror}")
            group.remove()
            return self._spawner(rt, self.index, fds, None), None
        try:
            return self._spawner(rt, self.index, fds, fd), group
        except SpawnError as exc:
            group.remove()
            if exc.stage != "cgroup":
                raise
            rt.log.warning("cgroup_failed", error=f"{group.path}: {os.strerror(exc.errno)}")
        except BaseException:
            group.remove()
            raise
        finally:
            os.close(fd)
        return self._spawner(rt, self.index, fds, None), None

    def _stop_leftovers(self) -> None:
        """The slot's process exited: what it left in its cgroup stops too (systemd's KillMode=control-group)."""
        group, self._group = self._group, None
        if group is None:
            return
        rt = self.runtime
        left = group.signal(rt.unit.process.stop_signal)
        if not left:
            group.remove()
            with contextlib.suppress(ValueError):
                rt.cgroups.remove(group)
            return
        rt.log.info("leftovers_stopping", pids=left, cgroup=group.path)
        loop = rt.host.loop

        def kill() -> None:
            if group.pids():
                rt.log.warning("leftovers_killed", pids=group.pids(), cgroup=group.path)
                group.kill()
            loop.call_later(0.2, sweep, 10)

        def sweep(tries: int) -> None:
            if not group.pids():
                group.remove()
                with contextlib.suppress(ValueError):
                    rt.cgroups.remove(group)
            elif tries > 0:
                loop.call_later(0.5, sweep, tries - 1)

        loop.call_later(rt.unit.process.stop_timeout, kill)
        loop.call_later(0.1, sweep, int(rt.unit.process.stop_timeout / 0.5) + 1)

    def _exited(self, pid: int, ex: Exit) -> None:
        self.runtime.exited(pid, ex)
        if self._group is not None:
            self._stop_leftovers()  # before a restart can spawn again
        # What the process said before it died (STOPPING=1, STATUS=) is read
        # while it is still ours, as systemd reads notify before SIGCHLD.
        self.runtime.drain_notify()
        self.feed(lifecycle.Exited(pid, ex))

    def cancel(self) -> None:
        self._deadline.cancel()

    def adopt(self, slot: lifecycle.Slot) -> None:
        """Take over ``slot`` as a previous image of the daemon left it (re-exec): its pid, timer and counts."""
        self.slot = slot
        if slot.pid is not None:
            self.runtime.host.watch_child(slot.pid, self._exited)
            base = self.runtime.host.cgroup_base()
            if base is not None:
                group = cgroups.Group.of(base, slot.pid)
                if group is not None:
                    self._group = group
                    self.runtime.cgroups.append(group)
        self._deadline.set(slot.deadline)


# ------------------------------------------------------------ rules shared by service and pool

def notify(drivers: Iterable[SlotDriver], pid: int, fields: Mapping[str, str]) -> None:
    """Hand ``fields`` from ``pid`` to the driver whose process it is."""
    for d in list(drivers):
        if d.slot.pid == pid:
            d.notified(fields)


def wants_poll(drivers: Iterable[SlotDriver]) -> bool:
    """Poll only while every slot waits for readiness: a running service (or any live worker) owns the sockets."""
    return all(lifecycle.polls(d.slot) for d in drivers)


def group_state(drivers: Iterable[SlotDriver]) -> str:
    """The unit's state: the most alive of its slots' states."""
    states = {d.slot.state for d in drivers}
    for s in (SlotState.RUNNING, SlotState.STARTING, SlotState.STOPPING, SlotState.BACKOFF,
              SlotState.FAILED, SlotState.IDLE, SlotState.STOPPED):
        if s in states:
            return str(s.value)
    return str(SlotState.STOPPED.value)


def activate(rt: UnitRuntime, drivers: Iterable[SlotDriver], changed: Callable[[], None]) -> None:
    """Begin: eager units start every slot, on-demand ones poll (``changed`` re-evaluates polling)."""
    if not rt.unit.enabled:
        return
    if rt.unit.start is Start.EAGER:
        for d in drivers:
            d.feed(lifecycle.StartRequest())
    else:
        changed()


def readable(rt: UnitRuntime, drivers: Iterable[SlotDriver]) -> None:
    """A polled socket is ready: stop polling and tell every slot (on-demand start)."""
    rt.poll(False)
    for d in drivers:
        d.feed(lifecycle.Readiness())


def start_for_operator(rt: UnitRuntime, drivers: Iterable[SlotDriver], changed: Callable[[], None]) -> None:
    """``sockvisor start``: every slot may start again (an on-demand one polls first)."""
    rt.life = UnitState.ENABLED
    for d in drivers:
        d.feed(lifecycle.StartRequest(operator=True))
    changed()


def stop_for_operator(rt: UnitRuntime, drivers: Iterable[SlotDriver]) -> None:
    """``sockvisor stop``: every slot stops and stays stopped; the sockets are not polled."""
    rt.life = UnitState.STOPPED
    for d in drivers:
        d.feed(lifecycle.StopRequest(lifecycle.After.STOP))
    rt.poll(False)
    # As systemd (FileDescriptorStorePreserve=no): a stopped unit keeps no stored fds.
    # The stopping process holds its own copies; the next start begins empty.
    rt.release_fd_store()


def spawn_slot(rt: UnitRuntime, index: int, listen_fds: list[int], cgroup: int | None) -> int:
    """Spawn the process of slot ``index`` with ``listen_fds`` and the stored fds (born in ``cgroup``); its pid."""
    unit = rt.unit
    prepared = rt.prepared()
    out, err = rt.output_fds()
    pid_vars = _pid_vars(unit)
    if unit.pass_ is Pass.STDIO:
        fd = rt.bound[0].fd
        # inetd "wait" programs expect a blocking socket; polling (libuv)
        # made it non-blocking, and the flag is shared with the child's copy.
        sockets.set_blocking(fd, True)
        return spawn.spawn_child(prepared, [fd, fd, err], _extra_env(unit, index, []), listen_pid=False,
                                 pid_vars=pid_vars, cgroup=cgroup)
    fds = listen_fds + [fd for _, fd in rt.fd_store]
    names = [b.listen.name for b in rt.bound] + [n for n, _ in rt.fd_store]
    return spawn.spawn_child(prepared, [-1, out, err, *fds], _extra_env(unit, index, names), listen_pid=True,
                             pid_vars=pid_vars, cgroup=cgroup)


def _pid_vars(unit: Unit) -> tuple[bytes, ...]:
    # WATCHDOG_PID is the child's own pid, which only the spawner knows at exec time.
    return (b"WATCHDOG_PID",) if unit.watchdog else ()


def _extra_env(unit: Unit, index: int, names: list[str]) -> list[bytes]:
    env: list[bytes] = []
    if names:
        env.append(f"LISTEN_FDS={len(names)}".encode())
        env.append(("LISTEN_FDNAMES=" + ":".join(names)).encode())
    if unit.mode is Mode.POOL:
        env.append(f"SOCKVISOR_WORKER={index}".encode())
    if unit.watchdog:
        env.append(f"WATCHDOG_USEC={int(unit.watchdog * 1_000_000)}".encode())
    return env


# ------------------------------------------------------------ the service runtime

class SlotGroup(UnitRuntime):
    """What service and pool mode share: their ``slots`` (``SlotDriver``s) polled, started and fed together."""

    slots: list[SlotDriver]

    def _slots_changed(self) -> None:
        self.poll(self.life not in WINDING_DOWN and wants_poll(self.slots))

    def readable(self, bound: sockets.Bound) -> None:
        readable(self, self.slots)

    def activate(self) -> None:
        activate(self, self.slots, self._slots_changed)

    def operator_start(self) -> None:
        start_for_operator(self, self.slots, self._slots_changed)

    def handover_slots(self) -> list[lifecycle.Slot]:
        return [d.slot for d in self.slots]

    def resume_slots(self, h: handover.UnitHandover) -> None:
        for d, slot in zip(self.slots, h.slots, strict=False):
            d.adopt(slot)
        for slot in h.slots[len(self.slots):]:  # fewer workers now: the rest wind down
            if slot.pid is not None:
                self.adopt_stray(slot.pid)
                kill_group(slot.pid, self.unit.process.stop_signal)

    def resume_activate(self) -> None:
        if any(d.slot.pid is not None or d.slot.state is not lifecycle.SlotState.IDLE for d in self.slots):
            self._slots_changed()  # carry on from where the slots were
        else:
            self.activate()


class ServiceRuntime(SlotGroup):
    """``mode: service``: one slot, one process, the unit's sockets as they are."""

    def __init__(self, host: Host, unit: Unit, bound: list[sockets.Bound]) -> None:
        super().__init__(host, unit, bound)
        self.slots = [SlotDriver(self, 0, fds=self.listen_fds, changed=self._driver_changed)]

    def listen_fds(self, index: int) -> list[int]:
        """The listening fds the slot gets, in listen order."""
        return [b.fd for b in self.bound]

    def pids(self) -> list[int]:
        return [d.slot.pid for d in self.slots if d.slot.pid is not None]

    def restarts(self) -> int:
        return sum(d.slot.restarts for d in self.slots)

    def state(self) -> str:
        return group_state(self.slots)

    def _driver_changed(self, driver: SlotDriver) -> None:
        self._slots_changed()

    def operator_stop(self) -> None:
        stop_for_operator(self, self.slots)

    def operator_restart(self) -> None:
        self.life = UnitState.ENABLED
        for d in self.slots:
            d.feed(lifecycle.StopRequest(lifecycle.After.RESTART))

    def shutdown(self) -> None:
        if self.life is not UnitState.RETIRING:
            self.life = UnitState.SHUTTING_DOWN
        self.poll(False)
        for d in self.slots:
            d.feed(lifecycle.StopRequest(lifecycle.After.NOTHING))

    def close(self, *, remove: bool = True) -> None:
        for d in self.slots:
            d.cancel()
        super().close(remove=remove)

    def notified(self, pid: int, fields: Mapping[str, str]) -> None:
        notify(self.slots, pid, fields)
