"""``mode: pool``: ``workers`` lifecycle slots, rolling restarts, per-slot sockets.

``PoolRuntime`` owns a list of ``supervisor.service.SlotDriver``s, one per
slot, and follows the same slot rules as a service (the functions of
``supervisor.service``); it adds two things:

- Rolling restarts. ``sockvisor restart`` runs the pure planner in
  ``supervisor.rolling``: for a slot it starts a *surge* driver (a second
  ``SlotDriver`` with the same index, so the same ``SOCKVISOR_WORKER`` and
  fds) next to the slot's current one; when the planner says ``Promote`` the
  surge becomes the slot's driver and the old one is stopped from a
  *retiring* list, which is watched until its process is gone. What the
  surge and the old process do is observed after every ``feed`` (the
  drivers' ``changed`` callback, ``_driver_changed``) and posted to the
  planner through a queue, so the planner is never re-entered from its own
  actions.
- Per-slot ``SO_REUSEPORT`` sockets. For a tcp/udp listener with
  ``reuse_port: true`` the unit's bound socket serves slot 0 and the runtime
  binds one more socket on the same address for every further slot. A slot's
  socket lives as long as the slot (not its process), so connections queued
  on it while its worker is replaced wait for the new worker instead of being
  refused. The kernel hashes each connection to one socket of the group, so
  load spreads evenly over the slots; the price is that a slot whose worker
  is dead, backing off or slow keeps its share of new connections waiting,
  where with one shared socket the other workers would take them. Closing a
  slot's socket (scale-down by reload) resets what is still queued on it
  unless ``net.ipv4.tcp_migrate_req=1`` lets the kernel move it to another
  socket of the group.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping

from supervisor import handover, lifecycle, rolling, sockets
from supervisor.errors import BindError
from supervisor.lifecycle import ALIVE, SlotState
from supervisor.model import ListenKind, Start, Unit
from supervisor.service import (
    SlotDriver,
    SlotGroup,
    group_state,
    notify,
    stop_for_operator,
)
from supervisor.status import RollStatus, UnitStatus, WorkerStatus
from supervisor.units import Deadline, Host, UnitState

# The per-slot socket of slot 0 is the unit's own bound socket.
_PER_SLOT_KINDS = frozenset({ListenKind.TCP, ListenKind.UDP})


def _per_slot(b: sockets.Bound) -> bool:
    """Whether listener ``b`` gets one SO_REUSEPORT socket per worker slot."""
    return b.listen.reuse_port and b.listen.kind in _PER_SLOT_KINDS and b.sock is not None


class PoolRuntime(SlotGroup):
    """``mode: pool``: ``workers`` slots, rolling restarts, optional per-slot SO_REUSEPORT sockets."""

    def __init__(self, host: Host, unit: Unit, bound: list[sockets.Bound]) -> None:
        super().__init__(host, unit, bound)
        # (base bound, sockets of slots 1..) for every per-slot listener
        self._slot_socks: list[tuple[sockets.Bound, list[sockets.Bound]]] = []
        self.slots = [self._driver(i) for i in range(unit.workers)]
        self.surges: dict[int, SlotDriver] = {}
        # Drivers whose process is on its way out: (slot whose roll step waits for it, or None, driver).
        self.retiring: list[tuple[int | None, SlotDriver]] = []
        self.roll: rolling.Roll | None = None
        self._queue: collections.deque[rolling.Event | None] = collections.deque()  # None: begin a roll
        self._pumping = False
        self._roll_deadline = Deadline(host.loop, lambda: self._post(rolling.Timer()))
        self._sync_slot_sockets(unit.workers)

    def _driver(self, index: int, *, surge: bool = False) -> SlotDriver:
        return SlotDriver(self, index, fds=self.listen_fds, changed=self._driver_changed, surge=surge)

    # ------------------------------------------------------------ sockets

    def listen_fds(self, index: int) -> list[int]:
        fds = []
        for b in self.bound:
            own = next((extras for base, extras in self._slot_socks if base is b), None)
            if own is not None and 0 < index <= len(own):
                fds.append(own[index - 1].fd)
            else:
                fds.append(b.fd)
        return fds

    def _extra_socks(self) -> Iterator[sockets.Bound]:
        for _, extras in self._slot_socks:
            yield from extras

    def _sync_slot_sockets(self, count: int) -> None:
        """Make every per-slot listener have sockets for slots 1..count-1; close the rest."""
        old = {id(base): extras for base, extras in self._slot_socks}
        table: list[tuple[sockets.Bound, list[sockets.Bound]]] = []
        polling = self.polling
        self.poll(False)
        for b in self.bound:
            if not _per_slot(b):
                continue
            extras = old.pop(id(b), [])
            for e in extras:
                if e.listen != b.listen:
                    sockets.retune(e, b.listen, unit=self.unit.name)
            handed = list(self.resumed.extras.get(b.listen.display, [])) if self.resumed is not None else []
            while len(extras) < count - 1:
                try:
                    if handed:  # the previous image's per-slot socket: its worker still accepts on it
                        fd = handed.pop(0)
                        blocking = os.get_blocking(fd)  # the worker's open file: left as it is
                        extras.append(sockets.adopt(fd, b.listen, unit=self.unit.name))
                        os.set_blocking(fd, blocking)
                        continue
                    extras.append(sockets.bind(b.listen, unit=self.unit.name))
                except BindError as exc:
                    # The slot falls back to the shared socket; it still serves.
                    self.log.warning("slot_bind_failed", listen=b.listen.display, slot=len(extras) + 1,
                                     error=str(exc))
                    break
            for fd in handed:  # more than the slots now: not needed
                with contextlib.suppress(OSError):
                    os.close(fd)
            while len(extras) > max(count - 1, 0):
                extras.pop().close()
            for e in extras:
                if not e.adopted:
                    sockets.set_blocking(e.fd, False)
            table.append((b, extras))
        for extras in old.values():
            for e in extras:
                e.close()
        self._slot_socks = table
        self.poll(polling)

    def poll(self, on: bool) -> None:
        if on == self.polling:
            return
        super().poll(on)
        loop = self.host.loop
        for e in self._extra_socks():
            if on:
                loop.add_reader(e.fd, self.readable, e)
            else:
                loop.remove_reader(e.fd)

    # ------------------------------------------------------------ drivers

    def drivers(self) -> Iterator[SlotDriver]:
        """Every driver with a process or a timer: the slots', the surges', the retiring ones."""
        yield from self.slots
        yield from self.surges.values()
        for _, d in self.retiring:
            yield d

    def pids(self) -> list[int]:
        return [d.slot.pid for d in self.drivers() if d.slot.pid is not None]

    def restarts(self) -> int:
        return sum(d.slot.restarts for d in self.slots)

    def state(self) -> str:
        return group_state(self.slots)

    def notified(self, pid: int, fields: Mapping[str, str]) -> None:
        notify(self.drivers(), pid, fields)

    def _driver_changed(self, driver: SlotDriver) -> None:
        """``driver`` was fed an event: post what its surge or retiring process did to the planner."""
        state = driver.slot.state
        if driver.surge and self.surges.get(driver.index) is driver:
            if state is SlotState.RUNNING:
                self._post(rolling.SurgeRunning(driver.index))
            elif state is not SlotState.STARTING:
                self._post(rolling.SurgeFailed(driver.index, _failure(driver.slot)))
        for entry in self.retiring:
            slot, d = entry
            if d is driver and state not in ALIVE:
                self.retiring.remove(entry)
                d.cancel()
                if slot is not None:
                    self._post(rolling.OldGone(slot))
                break
        self._slots_changed()

    # ------------------------------------------------------------ the roll

    def operator_restart(self) -> None:
        self.life = UnitState.ENABLED
        if self.roll is not None and self.roll.active:
            self._post(rolling.RestartRequest())
        else:
            self._post(None)

    def _post(self, event: rolling.Event | None) -> None:
        """Queue an event for the planner (None: begin a roll) and run the queue unless it already runs."""
        self._queue.append(event)
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._queue:
                ev = self._queue.popleft()
                now = self.host.loop.time()
                if ev is None:
                    self.roll, actions = rolling.begin(self.unit, self._begin_slots(), now)
                elif self.roll is not None:
                    self.roll, actions = rolling.step(self.unit, self.roll, ev, now)
                else:
                    continue
                self._carry_out(actions)
                if self.roll.state is rolling.RollState.FINISHED and self.roll.again:
                    self.roll = rolling.Roll(state=rolling.RollState.FINISHED)
                    self._queue.append(None)
        finally:
            self._pumping = False
        self._roll_deadline.set(self.roll.deadline if self.roll is not None and self.roll.active else None)

    def _begin_slots(self) -> tuple[int, ...]:
        """The slots a new roll replaces; the others (not running) start now: nothing there to keep."""
        live = []
        for d in self.slots:
            if d.slot.pid is not None and d.slot.state in (SlotState.STARTING, SlotState.RUNNING):
                live.append(d.index)
            else:
                d.feed(lifecycle.StartRequest(operator=True))
        return tuple(live)

    def _carry_out(self, actions: list[rolling.Action]) -> None:
        for action in actions:
            match action:
                case rolling.StartSurge(slot=slot):
                    surge = self._driver(slot, surge=True)
                    self.surges[slot] = surge
                    surge.feed(lifecycle.StartRequest())
                case rolling.Promote(slot=slot):
                    self._promote(slot)
                case rolling.CancelSurge(slot=slot):
                    cancelled = self.surges.pop(slot, None)
                    if cancelled is not None:
                        self.retiring.append((None, cancelled))
                        cancelled.feed(lifecycle.StopRequest(lifecycle.After.NOTHING))
                case rolling.Log(event=name, fields=fields):
                    if name == "roll_aborted":
                        self.log.warning(name, **dict(fields))
                    else:
                        self.log.info(name, **dict(fields))

    def _promote(self, slot: int) -> None:
        """The surge takes ``slot`` over; the old driver stops its process from the retiring list."""
        new = self.surges.pop(slot)
        old = self.slots[slot]
        new.surge = False
        new.slot = dataclasses.replace(new.slot, restarts=old.slot.restarts)
        self.slots[slot] = new
        self.log.info("roll_step", slot=slot, old_pid=old.slot.pid, new_pid=new.slot.pid)
        self.retiring.append((slot, old))
        old.feed(lifecycle.StopRequest(lifecycle.After.NOTHING))

    # ------------------------------------------------------------ operator, reload, shutdown

    def operator_stop(self) -> None:
        self._post(rolling.Cancel("stopped"))
        stop_for_operator(self, self.slots)

    def shutdown(self) -> None:
        self._post(rolling.Cancel("shutdown"))
        if self.life is not UnitState.RETIRING:
            self.life = UnitState.SHUTTING_DOWN
        self.poll(False)
        for d in self.slots:
            d.feed(lifecycle.StopRequest(lifecycle.After.NOTHING))
        for _, d in list(self.retiring):
            d.feed(lifecycle.StopRequest(lifecycle.After.NOTHING))

    def reconfigured(self) -> None:
        super().reconfigured()
        want = self.unit.workers
        if want < len(self.slots):
            self._post(rolling.Resize(want))
        while len(self.slots) > want:
            driver = self.slots.pop()
            self.retiring.append((None, driver))
            driver.feed(lifecycle.StopRequest(lifecycle.After.NOTHING))
        self._sync_slot_sockets(want)
        while len(self.slots) < want:
            driver = self._driver(len(self.slots))
            self.slots.append(driver)
            if any(d.slot.pid is not None for d in self.slots) or self.unit.start is Start.EAGER:
                driver.feed(lifecycle.StartRequest())

    def close(self, *, remove: bool = True) -> None:
        self._roll_deadline.cancel()
        for d in self.drivers():
            d.cancel()
        self.poll(False)
        for e in self._extra_socks():
            e.close()
        self._slot_socks = []
        super().close(remove=remove)

    # ------------------------------------------------------------ re-exec

    def handover_blocker(self) -> str | None:
        if self.roll is not None or self.surges or self.retiring:
            return f"unit {self.unit.name} is in a rolling restart; re-exec when it has finished"
        return None

    def hand_over(self) -> handover.UnitHandover:
        h = super().hand_over()
        h.extras = {base.listen.display: [e.fd for e in extras] for base, extras in self._slot_socks}
        return h

    # ------------------------------------------------------------ status

    def status(self) -> UnitStatus:
        st = super().status()
        now = self.host.loop.time()
        workers = [_worker(d, now, "worker") for d in self.slots]
        workers += [_worker(d, now, "surge") for d in self.surges.values()]
        workers += [_worker(d, now, "retiring") for _, d in self.retiring]
        st["workers"] = workers
        roll = self.roll
        if roll is not None:
            info = RollStatus(state=roll.state.value, replaced=len(roll.replaced), total=roll.total,
                              age=round(now - roll.started_at, 3))
            if roll.state is rolling.RollState.ABORTED:
                info["reason"] = roll.reason
                info["slot"] = roll.failed_slot
            st["roll"] = info
        return st


def _worker(d: SlotDriver, now: float, role: str) -> WorkerStatus:
    slot = d.slot
    age = round(now - slot.started_at, 3) if slot.pid is not None and slot.started_at is not None else None
    return WorkerStatus(slot=d.index, pid=slot.pid, state=slot.state.value, age=age, restarts=slot.restarts,
                        role=role)


def _failure(slot: lifecycle.Slot) -> str:
    """Why a surge left STARTING/RUNNING without taking its slot over."""
    if slot.state is SlotState.STOPPING:
        return "start timeout"  # the lifecycle stops a STARTING slot only at start_timeout
    if slot.last_exit is not None:
        return f"exited ({slot.last_exit})"
    return "spawn failed"
