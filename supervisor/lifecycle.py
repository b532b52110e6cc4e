"""The life of a supervised process slot, as a pure state machine.

Theory of operation
-------------------
Everything that decides *when* (start, restart, back off, give up, escalate to
SIGKILL, declare a watchdog dead) lives here and nowhere else. ``step`` takes
the slot's state, one event and ``now`` (a monotonic time the caller reads) and
returns the new state plus a list of actions. It reads no clock, no
environment, no socket, and never raises for a legal event; an event that does
not apply in a state (a stale timer, an exit of a pid we no longer own) returns
the state unchanged with no actions. The daemon's adapters carry the actions
out and feed the results back as events.

A *slot* is one process position: the single process of a ``mode: service``
unit, or one worker position of a ``mode: pool`` unit. Per-connection children
of ``mode: accept`` have no restart life and are handled by ``policy``.

Two things are derived from the state rather than sent as actions, so they can
never drift out of sync with it:

- ``Slot.deadline``: the one timer the slot needs (end of back-off, start
  timeout, stop escalation, watchdog). The adapter keeps exactly one timer per
  slot armed at that time and sends ``Timer()`` when it fires.
- whether the unit's sockets are polled: a slot in ``IDLE`` waits for
  readiness (see ``polls``); in every other state the daemon does not poll.

Restart rules follow systemd for socket-activated services: a clean exit puts
the unit back to listening (the next connection starts it again); a failure
backs off (``restart_delay`` doubling up to ``restart_delay_max``, reset after
the process ran ``restart_reset``) and then listens again (on-demand) or
respawns (eager, ``restart: always``, or fds waiting in the fd store). A
clean exit of a ``restart: always`` service or a pool worker that ran less
than ``restart_reset`` backs off the same way, so a program that exits at
once costs one spawn per back-off period, not ten a second. ``restart: never`` makes a failure
final until an operator starts the unit. Only ``start_limit`` turns a crash
loop into ``FAILED``; without it a crash loop costs one spawn per back-off
period, forever, and recovers as soon as the program is fixed.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from supervisor.model import Mode, Ready, Restart, Start, Unit

# Exit by these signals counts as a clean exit, as systemd's SuccessExitStatus
# default does: they are how an operator or the daemon itself asks to stop.
CLEAN_SIGNALS = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE})


class SlotState(enum.Enum):
    IDLE = "listening"  # sockets polled; first readiness starts the process
    STARTING = "starting"  # spawned, waiting for READY=1 (ready: notify)
    RUNNING = "running"
    STOPPING = "stopping"  # stop signal sent, waiting for the exit (SIGKILL at deadline)
    BACKOFF = "backoff"  # failed; waiting for the restart delay
    STOPPED = "stopped"  # an operator stopped it; sockets stay bound, not polled
    FAILED = "failed"  # gave up (start_limit, or restart: never); operator must start it


ALIVE = frozenset({SlotState.STARTING, SlotState.RUNNING, SlotState.STOPPING})


class After(enum.Enum):
    """What a stopping slot does once its process has exited."""

    STOP = "stop"  # -> STOPPED
    RESTART = "restart"  # -> start again at once (operator restart)
    FAIL = "fail"  # -> failure handling (start/watchdog timeout)
    NOTHING = "nothing"  # -> daemon shutdown: stays STOPPED, nothing more
    IDLE = "idle"  # -> IDLE: a proxy's backend stopped for idleness; the next client starts it


@dataclass(frozen=True, slots=True)
class Exit:
    """How a process ended: exactly one of ``code`` or ``signal`` is set."""

    code: int | None = None
    signal: int | None = None

    @property
    def clean(self) -> bool:
        if self.signal is not None:
            return self.signal in CLEAN_SIGNALS
        return self.code == 0

    def __str__(self) -> str:
        if self.signal is not None:
            try:
                return signal.Signals(self.signal).name
            except ValueError:
                return f"signal {self.signal}"
        return f"exit {self.code}"


@dataclass(frozen=True, slots=True)
class Slot:
    state: SlotState = SlotState.IDLE
    pid: int | None = None
    started_at: float | None = None
    ready_at: float | None = None  # when it became RUNNING; the back-off resets only after running this long
    deadline: float | None = None
    after: After = After.STOP
    failures: int = 0  # consecutive failures, for the back-off exponent
    restarts: int = 0  # total automatic restarts, for status
    start_times: tuple[float, ...] = ()  # recent starts, for start_limit
    last_exit: Exit | None = None
    stop_signal_sent: bool = False


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Readiness:
    """A polled socket became readable (or a connection is pending)."""


@dataclass(frozen=True, slots=True)
class StartRequest:
    """Start now: eager start at boot, an operator's ``start``, or pool scale-up."""

    operator: bool = False


@dataclass(frozen=True, slots=True)
class StopRequest:
    """Stop the process; ``after`` says what comes next."""

    after: After = After.STOP


@dataclass(frozen=True, slots=True)
class Spawned:
    pid: int


@dataclass(frozen=True, slots=True)
class SpawnFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class NotifyReady:
    """The process sent READY=1."""


@dataclass(frozen=True, slots=True)
class WatchdogPing:
    """The process sent WATCHDOG=1."""


@dataclass(frozen=True, slots=True)
class Exited:
    pid: int
    exit: Exit


@dataclass(frozen=True, slots=True)
class Timer:
    """The slot's deadline passed; ``stored`` says whether the unit's fd store holds fds.

    A pending connection needs no flag: a slot that goes back to ``IDLE`` is
    polled, and a level-triggered poll reports what already waits. Stored fds
    are not polled, so the adapter says so here (SPEC section 7).
    """

    stored: bool = False


Event = Readiness | StartRequest | StopRequest | Spawned | SpawnFailed | NotifyReady | WatchdogPing | Exited | Timer

# ---------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Spawn:
    """Start the process now; answer with ``Spawned`` or ``SpawnFailed``."""


@dataclass(frozen=True, slots=True)
class Kill:
    pid: int
    signal: int


@dataclass(frozen=True, slots=True)
class Log:
    event: str
    fields: tuple[tuple[str, object], ...] = field(default=())


Action = Spawn | Kill | Log


@dataclass(frozen=True, slots=True)
class Drain:
    """Stopping a set of children (accept mode's connections): the stop signal to each now,
    SIGKILL to whoever is left at ``deadline`` (``None``: nothing pending)."""

    deadline: float | None = None


def drain_begin(unit: Unit, drain: Drain, pids: Sequence[int], now: float) -> tuple[Drain, list[Action]]:
    """Stop ``pids`` with the unit's stop signal; SIGKILL the rest after ``stop_timeout`` (not re-armed)."""
    actions: list[Action] = [Kill(pid, unit.process.stop_signal) for pid in pids]
    if pids and drain.deadline is None:
        drain = Drain(now + unit.process.stop_timeout)
    return drain, actions


def drain_timer(pids: Sequence[int]) -> tuple[Drain, list[Action]]:
    """The stop timeout passed: whoever is left is killed."""
    actions: list[Action] = []
    for pid in pids:
        actions += [Log("child_killed", (("pid", pid),)), Kill(pid, signal.SIGKILL)]
    return Drain(), actions


def drain_exited(drain: Drain, remaining: int) -> Drain:
    """A drained child exited: with none left, the pending SIGKILL is off."""
    return Drain() if remaining == 0 else drain


# ---------------------------------------------------------------- rules


def polls(slot: Slot) -> bool:
    """Whether the unit's sockets should be polled for this slot."""
    return slot.state is SlotState.IDLE


def backoff_delay(unit: Unit, failures: int) -> float:
    """The wait before restart number ``failures`` (1-based): doubling, capped."""
    if failures <= 0:
        return 0.0
    delay: float = unit.restart_delay * float(2 ** min(failures - 1, 62))
    return min(delay, max(unit.restart_delay_max, unit.restart_delay))


def initial(unit: Unit) -> tuple[Slot, list[Action]]:
    """The state of a freshly bound unit (before any event)."""
    if not unit.enabled:
        return Slot(state=SlotState.STOPPED), []
    return Slot(state=SlotState.IDLE), []


def step(unit: Unit, slot: Slot, event: Event, now: float) -> tuple[Slot, list[Action]]:
    """Apply one event to a slot; pure."""
    match event:
        case Readiness():
            if slot.state is SlotState.IDLE:
                return _spawn(unit, slot, now)
            return slot, []
        case StartRequest(operator=operator):
            if slot.state in (SlotState.IDLE, SlotState.BACKOFF, SlotState.STOPPED, SlotState.FAILED):
                if operator:
                    slot = replace(slot, failures=0, start_times=())
                if operator and unit.start is Start.ON_DEMAND and unit.mode in (Mode.SERVICE, Mode.PROXY):
                    # An operator's start of an on-demand service resumes polling;
                    # the first connection starts it, as `systemctl start x.socket`.
                    return replace(slot, state=SlotState.IDLE, deadline=None), [Log("unit_resumed")]
                return _spawn(unit, slot, now)
            return slot, []
        case StopRequest(after=after):
            return _stop(unit, slot, after, now)
        case Spawned(pid=pid):
            if slot.state is not SlotState.STARTING or slot.pid is not None:
                return slot, [Kill(pid, signal.SIGKILL)]  # nobody wants it any more
            if unit.ready is Ready.NOTIFY:
                return replace(slot, pid=pid, started_at=now, deadline=now + unit.start_timeout), [
                    Log("child_started", (("pid", pid),))
                ]
            deadline = now + unit.watchdog if unit.watchdog else None
            return replace(slot, state=SlotState.RUNNING, pid=pid, started_at=now, ready_at=now,
                           deadline=deadline), [
                Log("child_started", (("pid", pid),))
            ]
        case SpawnFailed(reason=reason):
            if slot.state is not SlotState.STARTING:
                return slot, []
            return _failed(unit, replace(slot, pid=None, started_at=now), now, [
                Log("spawn_failed", (("error", reason),))
            ])
        case NotifyReady():
            if slot.state is SlotState.STARTING and slot.pid is not None:
                deadline = now + unit.watchdog if unit.watchdog else None
                return replace(slot, state=SlotState.RUNNING, ready_at=now, deadline=deadline), [
                    Log("child_ready", (("pid", slot.pid),))
                ]
            return slot, []
        case WatchdogPing():
            if slot.state is SlotState.RUNNING and unit.watchdog:
                return replace(slot, deadline=now + unit.watchdog), []
            return slot, []
        case Exited(pid=pid, exit=ex):
            if pid != slot.pid:
                return slot, []
            return _exited(unit, slot, ex, now)
        case Timer(stored=stored):
            if slot.deadline is None or now < slot.deadline:
                return slot, []  # stale or early timer
            return _timer(unit, slot, now, stored)
    return slot, []


def _spawn(unit: Unit, slot: Slot, now: float) -> tuple[Slot, list[Action]]:
    starts = slot.start_times
    if unit.start_limit is not None:
        window = now - unit.start_limit.interval
        starts = tuple(t for t in starts if t > window)
        if len(starts) >= unit.start_limit.burst:
            return replace(slot, state=SlotState.FAILED, deadline=None, pid=None, start_times=starts), [
                Log("start_limit_hit", (("burst", unit.start_limit.burst),
                                        ("interval", unit.start_limit.interval)))
            ]
        starts = (*starts, now)
    return (
        replace(slot, state=SlotState.STARTING, pid=None, started_at=None, ready_at=None, deadline=None,
                after=After.STOP, start_times=starts, stop_signal_sent=False),
        [Spawn()],
    )


def _stop(unit: Unit, slot: Slot, after: After, now: float) -> tuple[Slot, list[Action]]:
    if slot.state in (SlotState.STARTING, SlotState.RUNNING):
        if slot.pid is None:
            # Spawn requested but not answered yet: the Spawned event will be
            # killed on arrival. Nothing runs, so settle at once.
            return _settle(unit, replace(slot, pid=None), after, now, [])
        return (
            replace(slot, state=SlotState.STOPPING, after=after, deadline=now + unit.process.stop_timeout,
                    stop_signal_sent=True),
            [Kill(slot.pid, unit.process.stop_signal), Log("child_stopping", (("pid", slot.pid),))],
        )
    if slot.state is SlotState.STOPPING:
        # Already on its way down; only a stronger intent replaces the plan.
        if after in (After.STOP, After.NOTHING) or (after is After.IDLE and slot.after is After.IDLE):
            return replace(slot, after=after), []
        return slot, []
    # Nothing runs (IDLE, BACKOFF, STOPPED, FAILED).
    return _settle(unit, slot, after, now, [])


def _settle(unit: Unit, slot: Slot, after: After, now: float, actions: list[Action]) -> tuple[Slot, list[Action]]:
    """Nothing runs any more: go where ``after`` says."""
    slot = replace(slot, pid=None, deadline=None, stop_signal_sent=False)
    if after is After.RESTART:
        new, spawn = _spawn(unit, replace(slot, failures=0), now)
        return new, [*actions, *spawn]
    if after is After.FAIL:
        return _failed(unit, slot, now, actions)
    if after is After.IDLE:
        return replace(slot, state=SlotState.IDLE), actions
    return replace(slot, state=SlotState.STOPPED), actions


def _keeps_running(unit: Unit) -> bool:
    """Whether a clean exit is followed by a respawn (pool workers, restart: always)."""
    return unit.mode is Mode.POOL or unit.restart is Restart.ALWAYS


def _exited(unit: Unit, slot: Slot, ex: Exit, now: float) -> tuple[Slot, list[Action]]:
    ran = now - slot.started_at if slot.started_at is not None else 0.0
    log = Log("child_exited", (("pid", slot.pid), ("status", str(ex)), ("duration", round(ran, 6))))
    # Only time spent *ready* earns a reset: a service that hangs until its
    # start timeout every time must keep backing off.
    served = now - slot.ready_at if slot.ready_at is not None else 0.0
    failures = 0 if served >= unit.restart_reset else slot.failures
    slot = replace(slot, last_exit=ex, failures=failures)
    if slot.state is SlotState.STOPPING:
        return _settle(unit, slot, slot.after, now, [log])
    # An unexpected exit while STARTING or RUNNING.
    failed = not ex.clean or (slot.state is SlotState.STARTING and unit.ready is Ready.NOTIFY)
    if failed:
        return _failed(unit, slot, now, [log])
    slot = replace(slot, pid=None, deadline=None)
    if _keeps_running(unit):
        # A clean exit before restart_reset of service is a loop like a crash
        # loop (a program that exits at once would otherwise respawn every
        # restart_delay forever): it backs off the same way, doubling.
        failures = slot.failures + 1 if served < unit.restart_reset else 1
        delay = backoff_delay(unit, failures)
        return replace(slot, state=SlotState.BACKOFF, failures=failures, deadline=now + delay), [
            log, Log("restart_scheduled", (("delay", round(delay, 6)), ("failures", failures)))]
    return replace(slot, state=SlotState.IDLE), [log]


def _failed(unit: Unit, slot: Slot, now: float, actions: list[Action]) -> tuple[Slot, list[Action]]:
    slot = replace(slot, pid=None)
    if unit.restart is Restart.NEVER:
        return replace(slot, state=SlotState.FAILED, deadline=None), [*actions, Log("unit_failed")]
    failures = slot.failures + 1
    delay = backoff_delay(unit, failures)
    return (
        replace(slot, state=SlotState.BACKOFF, failures=failures, deadline=now + delay),
        [*actions, Log("restart_scheduled", (("delay", round(delay, 6)), ("failures", failures)))],
    )


def _timer(unit: Unit, slot: Slot, now: float, stored: bool) -> tuple[Slot, list[Action]]:
    if slot.state is SlotState.BACKOFF:
        slot = replace(slot, deadline=None, restarts=slot.restarts + 1)
        # SPEC section 7: stored fds are something to serve that no poll will
        # report (a client connection the failed process kept), so start now.
        if unit.start is Start.EAGER or _keeps_running(unit) or stored:
            return _spawn(unit, slot, now)
        return replace(slot, state=SlotState.IDLE), []
    if slot.state is SlotState.STOPPING and slot.pid is not None:
        # The stop signal was ignored for stop_timeout: escalate, and wait for
        # the exit without a further deadline (SIGKILL cannot be ignored).
        return replace(slot, deadline=None), [
            Kill(slot.pid, signal.SIGKILL), Log("child_killed", (("pid", slot.pid),))
        ]
    if slot.state is SlotState.STARTING and slot.pid is not None:
        new, actions = _stop(unit, slot, After.FAIL, now)
        return new, [Log("start_timeout", (("pid", slot.pid),)), *actions]
    if slot.state is SlotState.RUNNING and slot.pid is not None and unit.watchdog:
        # systemd sends SIGABRT on a watchdog timeout (WatchdogSignal=), then
        # escalates like a stop; the exit counts as a failure.
        return (
            replace(slot, state=SlotState.STOPPING, after=After.FAIL,
                    deadline=now + unit.process.stop_timeout, stop_signal_sent=True),
            [Log("watchdog_timeout", (("pid", slot.pid),)), Kill(slot.pid, signal.SIGABRT)],
        )
    return replace(slot, deadline=None), []
