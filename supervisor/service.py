"""``mode: service`` and ``mode: pool``: processes that live in lifecycle slots.

A service unit has one slot, a pool ``workers`` slots. Each ``SlotDriver`` feeds
its slot's events to the pure core (``supervisor.lifecycle``) and carries out
the actions: spawn, signal, log, and the one timer at the slot's deadline.
The sockets are polled only while every slot waits for readiness.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING

from supervisor import lifecycle, sockets, spawn
from supervisor.errors import SpawnError
from supervisor.lifecycle import Exit, SlotState
from supervisor.model import Mode, Pass, Start, Unit
from supervisor.units import UnitRuntime, kill_group

if TYPE_CHECKING:
    from supervisor.daemon import Daemon


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
        # What the process said before it died (STOPPING=1, STATUS=) is read
        # while it is still ours, as systemd reads notify before SIGCHLD.
        self.runtime.drain_notify()
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
                return str(s.value)
        return str(SlotState.STOPPED.value)

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
            return spawn.spawn_child(prepared, [fd, fd, err], self._extra_env(index, []), listen_pid=False,
                                     pid_vars=self._pid_vars())
        fds = [b.fd for b in self.bound] + [fd for _, fd in self.fd_store]
        names = [b.listen.name for b in self.bound] + [n for n, _ in self.fd_store]
        extra = self._extra_env(index, names)
        return spawn.spawn_child(prepared, [-1, out, err, *fds], extra, listen_pid=True, pid_vars=self._pid_vars())

    def _pid_vars(self) -> tuple[bytes, ...]:
        # WATCHDOG_PID is the child's own pid, which only the spawner knows at exec time.
        return (b"WATCHDOG_PID",) if self.unit.watchdog else ()

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


