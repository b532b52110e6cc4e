"""Rolling restart of a ``mode: pool`` unit, as a pure planner.

Theory of operation
-------------------
``sockvisor restart NAME`` on a pool must never leave an address without a
worker that accepts on it, so workers are replaced one slot at a time, new
before old (the way a Kubernetes Deployment rolls with ``maxUnavailable: 0``):

1. For the next slot, a *surge* process is started for the same slot index
   (same ``SOCKVISOR_WORKER``, same fds: the same per-slot ``SO_REUSEPORT``
   socket when there is one) while the slot's current process keeps serving.
2. Once the surge is *ready* it takes the slot over (``Promote``): with
   ``ready: notify`` that is its ``READY=1``; otherwise the unit's ``settle``
   time after it was spawned without exiting. The old process then gets its
   stop signal (SIGKILL after ``stop_timeout``, by the slot lifecycle).
3. The step ends when the old process is gone. Until then it still counts as
   an extra process: at most ``max_surge`` steps are in flight at a time, so
   the pool never runs more than ``workers + max_surge`` processes.

A surge that fails to become ready (it exits, cannot be spawned, or misses
``start_timeout``) aborts the roll: surges still starting are cancelled, the
old workers of every slot not yet promoted keep running, and the roll ends
``ABORTED`` with the reason. Slots already promoted stay promoted.

``step`` takes the roll, one event and ``now`` and returns the new roll and a
list of actions, like ``supervisor.lifecycle``: it reads no clock and touches
no process. ``Roll.deadline`` is the one timer the adapter keeps armed (the end
of the earliest settle period); it sends ``Timer()`` when it fires. The
adapter (``supervisor.pool.PoolRuntime``) owns the processes: it starts and
cancels surges, swaps the slot's driver on ``Promote``, and reports what the
surge and the old process did as events. Slots whose worker is not running
when the roll begins (back-off, stopped) are not rolled; the adapter starts
them directly, since nothing serves there that a new process could replace.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from supervisor.model import Ready, Unit


class RollState(enum.Enum):
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


class Phase(enum.Enum):
    STARTING = "starting"  # surge spawned (or being spawned), not ready yet
    SETTLING = "settling"  # ready: exec; surge running, waiting out ``settle``
    RETIRING = "retiring"  # surge took the slot; the old process is stopping


@dataclass(frozen=True, slots=True)
class Step:
    """One slot being replaced."""

    slot: int
    phase: Phase = Phase.STARTING
    deadline: float | None = None  # end of the settle period (SETTLING only)


@dataclass(frozen=True, slots=True)
class Roll:
    state: RollState = RollState.RUNNING
    pending: tuple[int, ...] = ()  # slots still to replace, in order
    steps: tuple[Step, ...] = ()  # in flight; len <= max_surge
    replaced: tuple[int, ...] = ()  # slots whose surge took over
    total: int = 0
    started_at: float = 0.0
    reason: str | None = None  # why it was aborted
    failed_slot: int | None = None
    again: bool = False  # another restart was asked for while this one ran

    @property
    def deadline(self) -> float | None:
        times = [s.deadline for s in self.steps if s.deadline is not None]
        return min(times) if times else None

    @property
    def active(self) -> bool:
        return self.state is RollState.RUNNING

    def step_for(self, slot: int) -> Step | None:
        return next((s for s in self.steps if s.slot == slot), None)


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class SurgeRunning:
    """The surge of ``slot`` is running (``ready: notify``: it sent READY=1)."""

    slot: int


@dataclass(frozen=True, slots=True)
class SurgeFailed:
    """The surge of ``slot`` will not become ready: it exited, could not spawn, or timed out."""

    slot: int
    reason: str


@dataclass(frozen=True, slots=True)
class OldGone:
    """The process that ``slot``'s surge replaced has exited (or there was none)."""

    slot: int


@dataclass(frozen=True, slots=True)
class RestartRequest:
    """Another ``restart`` arrived while this roll runs: roll again once it finishes."""


@dataclass(frozen=True, slots=True)
class Cancel:
    """Stop rolling (operator stop, shutdown); ``reason`` is reported."""

    reason: str


@dataclass(frozen=True, slots=True)
class Resize:
    """A reload changed ``workers``: slots at or above ``count`` no longer exist."""

    count: int


@dataclass(frozen=True, slots=True)
class Timer:
    """``Roll.deadline`` passed."""


Event = SurgeRunning | SurgeFailed | OldGone | RestartRequest | Cancel | Resize | Timer

# ---------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class StartSurge:
    """Start a second process for ``slot`` alongside its current one."""

    slot: int


@dataclass(frozen=True, slots=True)
class Promote:
    """The surge takes ``slot`` over; stop the old process (answer with ``OldGone`` once it exited)."""

    slot: int


@dataclass(frozen=True, slots=True)
class CancelSurge:
    """Stop ``slot``'s surge; the old process keeps the slot."""

    slot: int


@dataclass(frozen=True, slots=True)
class Log:
    event: str
    fields: tuple[tuple[str, object], ...] = field(default=())


Action = StartSurge | Promote | CancelSurge | Log

# ---------------------------------------------------------------- rules


def begin(unit: Unit, slots: tuple[int, ...], now: float) -> tuple[Roll, list[Action]]:
    """A new roll over ``slots`` (the slots whose worker runs), in that order."""
    roll = Roll(pending=slots, total=len(slots), started_at=now)
    actions: list[Action] = [Log("roll_started", (("slots", list(slots)), ("max_surge", _surge(unit))))]
    return _advance(unit, roll, now, actions)


def step(unit: Unit, roll: Roll, event: Event, now: float) -> tuple[Roll, list[Action]]:
    """Apply one event to a roll; pure. Events that do not apply change nothing."""
    if not roll.active:
        return roll, []
    match event:
        case SurgeRunning(slot=slot):
            s = roll.step_for(slot)
            if s is None or s.phase is not Phase.STARTING:
                return roll, []
            if unit.ready is Ready.NOTIFY or unit.settle <= 0:
                return _promote(roll, s)
            settling = replace(s, phase=Phase.SETTLING, deadline=now + unit.settle)
            return _with_step(roll, settling), []
        case SurgeFailed(slot=slot, reason=reason):
            s = roll.step_for(slot)
            if s is None or s.phase is Phase.RETIRING:
                return roll, []
            return _abort(roll, now, reason, slot)
        case OldGone(slot=slot):
            s = roll.step_for(slot)
            if s is None or s.phase is not Phase.RETIRING:
                return roll, []
            roll = replace(roll, steps=tuple(x for x in roll.steps if x is not s))
            return _advance(unit, roll, now, [])
        case RestartRequest():
            if roll.again:
                return roll, []
            return replace(roll, again=True), [Log("roll_queued")]
        case Cancel(reason=reason):
            return _abort(roll, now, reason, None)
        case Resize(count=count):
            actions: list[Action] = []
            kept: list[Step] = []
            for s in roll.steps:
                if s.slot >= count and s.phase is not Phase.RETIRING:
                    actions.append(CancelSurge(s.slot))
                else:
                    kept.append(s)
            pending = tuple(p for p in roll.pending if p < count)
            roll = replace(roll, steps=tuple(kept), pending=pending,
                           total=roll.total - (len(roll.pending) - len(pending)) - len(actions))
            return _advance(unit, roll, now, actions)
        case Timer():
            due = [s for s in roll.steps if s.deadline is not None and s.deadline <= now]
            actions = []
            for s in due:
                current = roll.step_for(s.slot)
                assert current is not None
                roll, more = _promote(roll, current)
                actions += more
            return roll, actions
    return roll, []


def _surge(unit: Unit) -> int:
    return max(1, unit.max_surge)


def _with_step(roll: Roll, new: Step) -> Roll:
    return replace(roll, steps=tuple(new if s.slot == new.slot else s for s in roll.steps))


def _promote(roll: Roll, s: Step) -> tuple[Roll, list[Action]]:
    roll = _with_step(roll, replace(s, phase=Phase.RETIRING, deadline=None))
    roll = replace(roll, replaced=(*roll.replaced, s.slot))
    return roll, [Promote(s.slot)]


def _advance(unit: Unit, roll: Roll, now: float, actions: list[Action]) -> tuple[Roll, list[Action]]:
    """Start surges while there is room; finish when nothing is left."""
    while roll.pending and len(roll.steps) < _surge(unit):
        slot, *rest = roll.pending
        roll = replace(roll, pending=tuple(rest), steps=(*roll.steps, Step(slot)))
        actions.append(StartSurge(slot))
    if not roll.pending and not roll.steps:
        roll = replace(roll, state=RollState.FINISHED)
        actions.append(Log("roll_finished", (("replaced", len(roll.replaced)),
                                             ("duration", round(now - roll.started_at, 6)))))
    return roll, actions


def _abort(roll: Roll, now: float, reason: str, slot: int | None) -> tuple[Roll, list[Action]]:
    actions: list[Action] = [CancelSurge(s.slot) for s in roll.steps if s.phase is not Phase.RETIRING]
    fields: list[tuple[str, object]] = [("reason", reason), ("replaced", len(roll.replaced)),
                                        ("remaining", roll.total - len(roll.replaced))]
    if slot is not None:
        fields.insert(0, ("slot", slot))
    roll = replace(roll, state=RollState.ABORTED, reason=reason, failed_slot=slot, pending=(),
                   steps=tuple(s for s in roll.steps if s.phase is Phase.RETIRING), again=False)
    return roll, [*actions, Log("roll_aborted", tuple(fields))]
