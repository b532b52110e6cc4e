"""The unit lifecycle state machine, driven event by event with virtual time.

Every test builds a ``Unit`` directly, feeds ``step`` a scripted list of
``(now, event)`` pairs and asserts on the resulting slot and actions. Nothing
here touches a loop, a socket, a process or a clock.
"""

from __future__ import annotations

import math
import signal
import socket
from dataclasses import replace

import pytest

from supervisor import lifecycle
from supervisor.lifecycle import (
    CLEAN_SIGNALS,
    Action,
    After,
    Event,
    Exit,
    Exited,
    Kill,
    Log,
    NotifyReady,
    Readiness,
    Slot,
    SlotState,
    Spawn,
    Spawned,
    SpawnFailed,
    StartRequest,
    StopRequest,
    Timer,
    WatchdogPing,
    backoff_delay,
    initial,
    polls,
    step,
)
from supervisor.model import (
    InetAddress,
    Listen,
    ListenKind,
    Mode,
    Process,
    Ready,
    Restart,
    Start,
    StartLimit,
    Unit,
)

PID = 4242
CRASH = Exit(code=1)
SEGV = Exit(signal=int(signal.SIGSEGV))


def make_unit(**overrides: object) -> Unit:
    """A service unit on one TCP listener; keyword arguments override Unit fields."""
    process = overrides.pop("process", Process(exec=("/bin/true",)))
    listen = (Listen(ListenKind.TCP, InetAddress("127.0.0.1", 8080, socket.AF_INET), "web"),)
    return Unit(name="web", listen=listen, process=process, **overrides)  # type: ignore[arg-type]


def run(unit: Unit, slot: Slot, script: list[tuple[float, Event]]) -> list[tuple[Slot, list[Action]]]:
    """Feed ``script`` to ``step`` in order; the (slot, actions) after every event."""
    trace = []
    for now, event in script:
        slot, actions = step(unit, slot, event, now)
        trace.append((slot, actions))
    return trace


def last(unit: Unit, slot: Slot, script: list[tuple[float, Event]]) -> tuple[Slot, list[Action]]:
    """The (slot, actions) after the whole script."""
    return run(unit, slot, script)[-1]


def effects(actions: list[Action]) -> list[Action]:
    """The actions the adapters carry out (everything but log events)."""
    return [a for a in actions if not isinstance(a, Log)]


def logged(actions: list[Action]) -> list[str]:
    """The log event names among ``actions``."""
    return [a.event for a in actions if isinstance(a, Log)]


def running(unit: Unit, now: float = 0.0, pid: int = PID) -> Slot:
    """A slot whose process ``pid`` was started and became ready at ``now``."""
    script: list[tuple[float, Event]] = [(now, StartRequest()), (now, Spawned(pid))]
    if unit.ready is Ready.NOTIFY:
        script.append((now, NotifyReady()))
    slot, _ = last(unit, Slot(), script)
    assert slot.state is SlotState.RUNNING and slot.pid == pid
    return slot


# ---------------------------------------------------------------- starting


@pytest.mark.parametrize(("enabled", "state", "polled"), [
    (True, SlotState.IDLE, True),
    (False, SlotState.STOPPED, False),
])
def test_initial_state(enabled: bool, state: SlotState, polled: bool) -> None:
    """A freshly bound enabled unit listens; a disabled one is stopped and not polled."""
    slot, actions = initial(make_unit(enabled=enabled))
    assert slot.state is state
    assert polls(slot) is polled
    assert actions == []


def test_readiness_starts_on_demand_service_and_stops_polling() -> None:
    """Readiness on an idle slot spawns the process, and the sockets are no longer polled."""
    slot, actions = step(make_unit(), Slot(), Readiness(), 1.0)
    assert slot.state is SlotState.STARTING
    assert slot.pid is None
    assert actions == [Spawn()]
    assert not polls(slot)


@pytest.mark.parametrize("state", [s for s in SlotState if s is not SlotState.IDLE])
def test_readiness_is_ignored_unless_idle(state: SlotState) -> None:
    """Only an idle slot reacts to readiness; every other state ignores it."""
    slot = Slot(state=state, pid=PID if state in (SlotState.RUNNING, SlotState.STOPPING) else None)
    assert step(make_unit(), slot, Readiness(), 1.0) == (slot, [])


def test_polls_only_when_idle() -> None:
    """The sockets are polled in IDLE and in no other state."""
    assert [s for s in SlotState if polls(Slot(state=s))] == [SlotState.IDLE]


def test_exec_ready_is_running_on_spawned() -> None:
    """With ready: exec the slot is RUNNING as soon as the spawn is confirmed, with no deadline."""
    unit = make_unit()
    slot, actions = last(unit, Slot(), [(0.0, Readiness()), (0.5, Spawned(PID))])
    assert slot.state is SlotState.RUNNING
    assert slot.pid == PID
    assert slot.started_at == 0.5
    assert slot.deadline is None
    assert logged(actions) == ["child_started"]


def test_notify_ready_waits_for_ready_then_runs() -> None:
    """With ready: notify the slot stays STARTING under start_timeout until READY=1, then RUNNING."""
    unit = make_unit(ready=Ready.NOTIFY, start_timeout=5.0)
    (starting, _), (ready, actions) = run(unit, Slot(), [
        (0.0, Readiness()), (1.0, Spawned(PID)), (2.0, NotifyReady()),
    ])[1:]
    assert starting.state is SlotState.STARTING
    assert starting.pid == PID
    assert starting.deadline == 6.0
    assert ready.state is SlotState.RUNNING
    assert ready.deadline is None
    assert logged(actions) == ["child_ready"]


def test_notify_ready_before_spawned_is_ignored() -> None:
    """READY=1 cannot arrive for a process whose spawn is not confirmed; it changes nothing."""
    unit = make_unit(ready=Ready.NOTIFY)
    slot, _ = step(unit, Slot(), Readiness(), 0.0)
    assert step(unit, slot, NotifyReady(), 0.1) == (slot, [])


def test_notify_start_timeout_kills_then_escalates_and_counts_as_failure() -> None:
    """A notify service silent past start_timeout gets the stop signal, SIGKILL after stop_timeout, then backs off."""
    unit = make_unit(ready=Ready.NOTIFY, start_timeout=5.0,
                     process=Process(exec=("/bin/x",), stop_signal=int(signal.SIGINT), stop_timeout=3.0))
    trace = run(unit, Slot(), [
        (0.0, Readiness()),
        (0.0, Spawned(PID)),
        (5.0, Timer()),  # start timeout
        (8.0, Timer()),  # stop timeout
        (8.5, Exited(PID, Exit(signal=int(signal.SIGKILL)))),
    ])
    (timed_out, a1), (killed, a2), (after, a3) = trace[2:]
    assert timed_out.state is SlotState.STOPPING
    assert timed_out.after is After.FAIL
    assert timed_out.deadline == 8.0
    assert effects(a1) == [Kill(PID, signal.SIGINT)]
    assert "start_timeout" in logged(a1)
    assert killed.state is SlotState.STOPPING
    assert killed.deadline is None
    assert effects(a2) == [Kill(PID, signal.SIGKILL)]
    assert after.state is SlotState.BACKOFF
    assert after.failures == 1
    assert after.pid is None
    assert after.deadline == pytest.approx(8.5 + unit.restart_delay)
    assert effects(a3) == []


def test_notify_start_timeout_with_restart_never_fails_the_unit() -> None:
    """A start timeout is a failure, so restart: never ends in FAILED once the process is gone."""
    unit = make_unit(ready=Ready.NOTIFY, start_timeout=5.0, restart=Restart.NEVER)
    slot, actions = last(unit, Slot(), [
        (0.0, Readiness()), (0.0, Spawned(PID)), (5.0, Timer()), (5.1, Exited(PID, Exit(signal=signal.SIGTERM))),
    ])
    assert slot.state is SlotState.FAILED
    assert "unit_failed" in logged(actions)


def test_notify_clean_exit_before_ready_is_a_failure() -> None:
    """A notify service that exits 0 before READY=1 never started properly: it backs off instead of listening."""
    unit = make_unit(ready=Ready.NOTIFY)
    slot, _ = last(unit, Slot(), [(0.0, Readiness()), (0.0, Spawned(PID)), (1.0, Exited(PID, Exit(code=0)))])
    assert slot.state is SlotState.BACKOFF
    assert slot.failures == 1


def test_spawned_when_not_wanted_is_killed() -> None:
    """A spawn confirmation nobody waits for (slot already running) kills that new process and changes nothing."""
    unit = make_unit()
    slot = running(unit)
    assert step(unit, slot, Spawned(PID + 1), 1.0) == (slot, [Kill(PID + 1, signal.SIGKILL)])


def test_spawn_failed_backs_off() -> None:
    """A spawn that fails (exec not found, ...) is a failure: BACKOFF with the first delay."""
    unit = make_unit()
    slot, actions = last(unit, Slot(), [(0.0, Readiness()), (0.0, SpawnFailed("ENOENT"))])
    assert slot.state is SlotState.BACKOFF
    assert slot.failures == 1
    assert slot.deadline == pytest.approx(0.1)
    assert logged(actions) == ["spawn_failed", "restart_scheduled"]
    assert effects(actions) == []


def test_spawn_failed_outside_starting_is_ignored() -> None:
    """A SpawnFailed that arrives when no spawn is pending is a no-op."""
    unit = make_unit()
    slot = running(unit)
    assert step(unit, slot, SpawnFailed("late"), 1.0) == (slot, [])


# ---------------------------------------------------------------- exits


@pytest.mark.parametrize(("exit_", "clean"), [
    (Exit(code=0), True),
    (Exit(code=1), False),
    (Exit(code=255), False),
    (Exit(signal=int(signal.SIGTERM)), True),
    (Exit(signal=int(signal.SIGHUP)), True),
    (Exit(signal=int(signal.SIGINT)), True),
    (Exit(signal=int(signal.SIGPIPE)), True),
    (Exit(signal=int(signal.SIGSEGV)), False),
    (Exit(signal=int(signal.SIGKILL)), False),
    (Exit(signal=int(signal.SIGABRT)), False),
])
def test_exit_cleanliness(exit_: Exit, clean: bool) -> None:
    """Exit 0 and the CLEAN_SIGNALS are clean; any other code or signal is a failure."""
    assert exit_.clean is clean


def test_clean_signals_are_the_stop_requests() -> None:
    """CLEAN_SIGNALS is exactly systemd's default set: SIGHUP, SIGINT, SIGTERM, SIGPIPE."""
    assert frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE}) == CLEAN_SIGNALS


@pytest.mark.parametrize(("exit_", "text"), [
    (Exit(code=3), "exit 3"),
    (Exit(signal=int(signal.SIGSEGV)), "SIGSEGV"),
    (Exit(signal=250), "signal 250"),
])
def test_exit_text(exit_: Exit, text: str) -> None:
    """An exit prints as the child_exited status field shows it."""
    assert str(exit_) == text


@pytest.mark.parametrize("exit_", [Exit(code=0), Exit(signal=int(signal.SIGTERM))])
def test_clean_exit_goes_back_to_listening(exit_: Exit) -> None:
    """A clean exit of an on-demand service returns it to IDLE: polled again, no restart, no failure counted."""
    unit = make_unit()
    slot, actions = step(unit, running(unit), Exited(PID, exit_), 5.0)
    assert slot.state is SlotState.IDLE
    assert polls(slot)
    assert slot.pid is None
    assert slot.deadline is None
    assert slot.failures == 0
    assert slot.last_exit == exit_
    assert effects(actions) == []
    assert logged(actions) == ["child_exited"]


@pytest.mark.parametrize("unit", [
    make_unit(restart=Restart.ALWAYS),
    make_unit(mode=Mode.POOL, workers=2),
], ids=["restart-always", "pool"])
def test_clean_exit_respawns_when_keeping_running(unit: Unit) -> None:
    """restart: always and pool workers respawn after a clean exit, after restart_delay."""
    slot, _ = step(unit, running(unit), Exited(PID, Exit(code=0)), 5.0)
    assert slot.state is SlotState.BACKOFF
    assert slot.deadline is not None
    assert slot.deadline == pytest.approx(5.0 + unit.restart_delay)
    slot, actions = step(unit, slot, Timer(), slot.deadline)
    assert slot.state is SlotState.STARTING
    assert actions == [Spawn()]


@pytest.mark.parametrize("exit_", [CRASH, SEGV])
def test_failure_backs_off(exit_: Exit) -> None:
    """A non-zero exit or a crash signal puts the slot in BACKOFF for the first delay."""
    unit = make_unit()
    slot, actions = step(unit, running(unit), Exited(PID, exit_), 2.0)
    assert slot.state is SlotState.BACKOFF
    assert not polls(slot)
    assert slot.failures == 1
    assert slot.deadline == pytest.approx(2.1)
    assert logged(actions) == ["child_exited", "restart_scheduled"]


@pytest.mark.parametrize(("failures", "delay"), [
    (0, 0.0),
    (1, 0.1),
    (2, 0.2),
    (3, 0.4),
    (4, 0.8),
    (9, 25.6),
    (10, 30.0),
    (11, 30.0),
    (10_000, 30.0),
])
def test_backoff_delay_doubles_up_to_the_cap(failures: int, delay: float) -> None:
    """restart_delay doubles per consecutive failure and is capped at restart_delay_max, even for huge counts."""
    assert backoff_delay(make_unit(restart_delay=0.1, restart_delay_max=30.0), failures) == pytest.approx(delay)


def test_backoff_delay_cap_below_first_delay_uses_first_delay() -> None:
    """A restart_delay_max smaller than restart_delay never shortens the first delay."""
    assert backoff_delay(make_unit(restart_delay=2.0, restart_delay_max=1.0), 5) == 2.0


def test_consecutive_failures_double_the_delay() -> None:
    """Each quick crash in a row waits twice as long as the previous one: 0.1, 0.2, 0.4, 0.8."""
    unit = make_unit(start=Start.EAGER)
    slot, now, delays = Slot(), 0.0, []
    slot, _ = step(unit, slot, StartRequest(), now)
    for pid in range(100, 104):
        slot, _ = step(unit, slot, Spawned(pid), now)
        now += 1.0
        slot, _ = step(unit, slot, Exited(pid, CRASH), now)
        assert slot.deadline is not None
        delays.append(round(slot.deadline - now, 9))
        now = slot.deadline
        slot, actions = step(unit, slot, Timer(), now)
        assert actions == [Spawn()]
    assert delays == [0.1, 0.2, 0.4, 0.8]
    assert slot.restarts == 4


@pytest.mark.parametrize(("ran", "failures", "delay"), [
    (59.9, 4, 0.8),  # short run: the exponent keeps growing
    (60.0, 1, 0.1),  # ran restart_reset: back to the first delay
    (600.0, 1, 0.1),
])
def test_long_run_resets_backoff(ran: float, failures: int, delay: float) -> None:
    """A process that ran at least restart_reset before failing starts the back-off over from the first delay."""
    unit = make_unit(restart_reset=60.0)
    slot = replace(running(unit, now=100.0), failures=3)
    slot, _ = step(unit, slot, Exited(PID, CRASH), 100.0 + ran)
    assert slot.failures == failures
    assert slot.deadline == pytest.approx(100.0 + ran + delay)


@pytest.mark.parametrize(("unit", "state", "actions"), [
    (make_unit(), SlotState.IDLE, []),
    (make_unit(start=Start.EAGER), SlotState.STARTING, [Spawn()]),
    (make_unit(restart=Restart.ALWAYS), SlotState.STARTING, [Spawn()]),
    (make_unit(mode=Mode.POOL, workers=3), SlotState.STARTING, [Spawn()]),
], ids=["on-demand", "eager", "restart-always", "pool"])
def test_backoff_timer(unit: Unit, state: SlotState, actions: list[Action]) -> None:
    """When the back-off ends an on-demand service listens again; eager, restart: always and pool respawn."""
    slot, _ = step(unit, running(unit), Exited(PID, CRASH), 1.0)
    assert slot.deadline is not None
    slot, got = step(unit, slot, Timer(), slot.deadline)
    assert slot.state is state
    assert got == actions
    assert slot.restarts == 1
    assert slot.failures == 1  # kept until a long enough run resets it


def test_restart_never_makes_a_failure_final() -> None:
    """With restart: never a failure is FAILED: no deadline, no polling, readiness and timers ignored."""
    unit = make_unit(restart=Restart.NEVER)
    slot, actions = step(unit, running(unit), Exited(PID, CRASH), 1.0)
    assert slot.state is SlotState.FAILED
    assert slot.deadline is None
    assert not polls(slot)
    assert logged(actions) == ["child_exited", "unit_failed"]
    assert step(unit, slot, Readiness(), 2.0) == (slot, [])
    assert step(unit, slot, Timer(), 100.0) == (slot, [])


def test_restart_never_clean_exit_still_listens() -> None:
    """restart: never only concerns failures: a clean exit returns the unit to listening."""
    unit = make_unit(restart=Restart.NEVER)
    slot, _ = step(unit, running(unit), Exited(PID, Exit(code=0)), 1.0)
    assert slot.state is SlotState.IDLE


@pytest.mark.parametrize(("unit", "state", "actions"), [
    (make_unit(restart=Restart.NEVER), SlotState.IDLE, ["unit_resumed"]),
    (make_unit(restart=Restart.NEVER, start=Start.EAGER), SlotState.STARTING, [Spawn()]),
], ids=["on-demand", "eager"])
def test_operator_start_recovers_failed_unit(unit: Unit, state: SlotState, actions: list[object]) -> None:
    """An operator start of a FAILED unit resumes it (on-demand listens, eager spawns) with a fresh failure count."""
    slot, _ = step(unit, running(unit), Exited(PID, CRASH), 1.0)
    assert slot.state is SlotState.FAILED
    slot, got = step(unit, slot, StartRequest(operator=True), 2.0)
    assert slot.state is state
    assert [a.event if isinstance(a, Log) else a for a in got] == actions
    assert slot.failures == 0


# ---------------------------------------------------------------- start_limit


def crash_quickly(unit: Unit, count: int, spacing: float) -> tuple[Slot, list[list[Action]]]:
    """An eager unit whose process dies ``spacing`` after each spawn, ``count`` times (or until it stops spawning)."""
    slot, actions = step(unit, Slot(), StartRequest(), 0.0)
    now, pid, history = 0.0, 100, [actions]
    for _ in range(count):
        if Spawn() not in actions:
            break
        pid += 1
        slot, _ = step(unit, slot, Spawned(pid), now)
        now += spacing
        slot, _ = step(unit, slot, Exited(pid, CRASH), now)
        assert slot.deadline is not None
        now = slot.deadline
        slot, actions = step(unit, slot, Timer(), now)
        history.append(actions)
    return slot, history


def test_start_limit_burst_within_interval_fails() -> None:
    """More than burst starts within interval turn the crash loop into FAILED, logged as start_limit_hit."""
    unit = make_unit(start=Start.EAGER, start_limit=StartLimit(burst=3, interval=10.0))
    slot, history = crash_quickly(unit, 10, spacing=0.5)
    assert sum(Spawn() in actions for actions in history) == 3
    assert slot.state is SlotState.FAILED
    assert slot.deadline is None
    assert "start_limit_hit" in logged(history[-1])


def test_start_limit_window_slides() -> None:
    """Starts spread wider than the interval never hit the start limit."""
    unit = make_unit(start=Start.EAGER, restart_delay=20.0, restart_delay_max=20.0,
                     start_limit=StartLimit(burst=2, interval=10.0))
    slot, history = crash_quickly(unit, 6, spacing=1.0)
    assert all(Spawn() in actions for actions in history)
    assert slot.state is SlotState.STARTING


def test_start_limit_on_readiness_fails_on_demand_unit() -> None:
    """An on-demand unit hits the start limit on the readiness that would exceed it."""
    unit = make_unit(start_limit=StartLimit(burst=2, interval=60.0))
    slot, now = Slot(), 0.0
    for pid in (1, 2):
        slot, actions = step(unit, slot, Readiness(), now)
        assert actions == [Spawn()]
        slot, _ = last(unit, slot, [(now, Spawned(pid)), (now + 1, Exited(pid, Exit(code=0)))])
        now += 2
    slot, actions = step(unit, slot, Readiness(), now)
    assert slot.state is SlotState.FAILED
    assert effects(actions) == []
    assert not polls(slot)


@pytest.mark.parametrize(("operator", "state"), [
    (True, SlotState.STARTING),
    (False, SlotState.FAILED),
])
def test_operator_start_clears_start_limit(operator: bool, state: SlotState) -> None:
    """Only an operator's start forgets the recent starts; an automatic start of a FAILED unit hits the limit again."""
    unit = make_unit(start=Start.EAGER, start_limit=StartLimit(burst=3, interval=10.0))
    slot, _ = crash_quickly(unit, 10, spacing=0.5)
    assert slot.state is SlotState.FAILED
    slot, _ = step(unit, slot, StartRequest(operator=operator), 5.0)
    assert slot.state is state


def test_operator_start_of_on_demand_unit_hit_by_start_limit_listens_again() -> None:
    """An operator start of an on-demand service that hit start_limit resumes polling; the next readiness spawns."""
    unit = make_unit(start_limit=StartLimit(burst=1, interval=60.0))
    slot, _ = last(unit, Slot(), [(0.0, Readiness()), (0.0, Spawned(1)), (1.0, Exited(1, Exit(code=0))),
                                  (2.0, Readiness())])
    assert slot.state is SlotState.FAILED
    slot, _ = step(unit, slot, StartRequest(operator=True), 3.0)
    assert polls(slot)
    slot, actions = step(unit, slot, Readiness(), 3.5)
    assert actions == [Spawn()]


# ---------------------------------------------------------------- stopping


def test_operator_stop_signals_then_settles_stopped() -> None:
    """An operator stop sends stop_signal with a stop_timeout deadline; the exit leaves the slot STOPPED."""
    unit = make_unit(process=Process(exec=("/bin/x",), stop_signal=int(signal.SIGQUIT), stop_timeout=4.0))
    (stopping, a1), (stopped, a2) = run(unit, running(unit), [
        (10.0, StopRequest()), (11.0, Exited(PID, Exit(signal=int(signal.SIGQUIT)))),
    ])
    assert stopping.state is SlotState.STOPPING
    assert stopping.deadline == 14.0
    assert effects(a1) == [Kill(PID, signal.SIGQUIT)]
    assert stopped.state is SlotState.STOPPED
    assert stopped.pid is None
    assert stopped.deadline is None
    assert not polls(stopped)
    assert effects(a2) == []


def test_stop_escalates_to_sigkill_after_stop_timeout() -> None:
    """A process that ignores the stop signal for stop_timeout gets SIGKILL and no further deadline."""
    unit = make_unit()
    slot, actions = last(unit, running(unit), [(0.0, StopRequest()), (10.0, Timer())])
    assert slot.state is SlotState.STOPPING
    assert slot.deadline is None
    assert effects(actions) == [Kill(PID, signal.SIGKILL)]
    assert logged(actions) == ["child_killed"]
    slot, _ = step(unit, slot, Exited(PID, Exit(signal=int(signal.SIGKILL))), 10.5)
    assert slot.state is SlotState.STOPPED


def test_stop_exit_is_not_a_failure() -> None:
    """A process killed by our own stop does not count as a failure, whatever its exit status."""
    unit = make_unit()
    slot, _ = last(unit, running(unit), [
        (0.0, StopRequest()), (10.0, Timer()), (10.1, Exited(PID, Exit(signal=int(signal.SIGKILL)))),
    ])
    assert slot.failures == 0


def test_stop_restart_spawns_after_exit() -> None:
    """StopRequest(After.RESTART) stops the process and spawns a new one once it has exited."""
    unit = make_unit()
    slot = replace(running(unit), failures=2)
    (stopping, a1), (restarted, a2) = run(unit, slot, [
        (1.0, StopRequest(After.RESTART)), (1.5, Exited(PID, Exit(signal=int(signal.SIGTERM)))),
    ])
    assert stopping.state is SlotState.STOPPING
    assert effects(a1) == [Kill(PID, signal.SIGTERM)]
    assert restarted.state is SlotState.STARTING
    assert restarted.failures == 0
    assert effects(a2) == [Spawn()]


def test_stop_during_stopping_overrides_restart() -> None:
    """A plain stop while a restart is under way cancels the restart: the exit settles STOPPED."""
    unit = make_unit()
    slot, _ = last(unit, running(unit), [
        (1.0, StopRequest(After.RESTART)), (1.1, StopRequest(After.STOP)), (1.5, Exited(PID, Exit(code=0))),
    ])
    assert slot.state is SlotState.STOPPED


def test_restart_during_stop_does_not_override_stop() -> None:
    """A restart requested while a stop is under way does not revive the unit."""
    unit = make_unit()
    slot, actions = last(unit, running(unit), [
        (1.0, StopRequest(After.STOP)), (1.1, StopRequest(After.RESTART)),
    ])
    assert slot.after is After.STOP
    assert actions == []


def test_stop_before_spawn_confirmed_settles_and_kills_late_spawn() -> None:
    """Stopping a slot whose spawn is not yet confirmed settles STOPPED at once; the late Spawned is killed."""
    unit = make_unit()
    slot, actions = last(unit, Slot(), [(0.0, Readiness()), (0.1, StopRequest())])
    assert slot.state is SlotState.STOPPED
    assert actions == []
    slot2, actions = step(unit, slot, Spawned(PID), 0.2)
    assert slot2 == slot
    assert actions == [Kill(PID, signal.SIGKILL)]


@pytest.mark.parametrize("state", [SlotState.IDLE, SlotState.BACKOFF, SlotState.FAILED])
def test_stop_when_nothing_runs_is_immediate(state: SlotState) -> None:
    """Stopping a slot with no process settles STOPPED at once, dropping any back-off deadline."""
    unit = make_unit()
    slot, actions = step(unit, Slot(state=state, deadline=5.0 if state is SlotState.BACKOFF else None),
                         StopRequest(), 1.0)
    assert slot.state is SlotState.STOPPED
    assert slot.deadline is None
    assert actions == []


def test_stopped_operator_start_on_demand_resumes_polling() -> None:
    """An operator start of a stopped on-demand service resumes listening rather than spawning."""
    unit = make_unit()
    slot, actions = step(unit, Slot(state=SlotState.STOPPED), StartRequest(operator=True), 0.0)
    assert polls(slot)
    assert effects(actions) == []


# ---------------------------------------------------------------- no-ops


@pytest.mark.parametrize("now", [0.0, 9.999])
def test_stale_timer_is_a_noop(now: float) -> None:
    """A Timer that fires before the slot's deadline changes nothing."""
    unit = make_unit()
    slot, _ = step(unit, running(unit), StopRequest(), 0.0)
    assert slot.deadline == 10.0
    assert step(unit, slot, Timer(), now) == (slot, [])


@pytest.mark.parametrize("slot", [
    Slot(),
    Slot(state=SlotState.RUNNING, pid=PID),
    Slot(state=SlotState.STOPPING, pid=PID, deadline=None),
])
def test_timer_without_deadline_is_a_noop(slot: Slot) -> None:
    """A Timer for a slot that has no deadline changes nothing."""
    assert step(make_unit(), slot, Timer(), 1000.0) == (slot, [])


@pytest.mark.parametrize("state", [SlotState.RUNNING, SlotState.STOPPING])
def test_exit_of_foreign_pid_is_a_noop(state: SlotState) -> None:
    """An Exited for a pid the slot does not own (an earlier process, a stray child) changes nothing."""
    slot = Slot(state=state, pid=PID, started_at=0.0, deadline=5.0)
    assert step(make_unit(), slot, Exited(PID + 1, CRASH), 1.0) == (slot, [])


def test_start_request_while_running_is_a_noop() -> None:
    """A start of a slot whose process is alive does nothing."""
    unit = make_unit()
    slot = running(unit)
    assert step(unit, slot, StartRequest(operator=True), 1.0) == (slot, [])


# ---------------------------------------------------------------- watchdog


def test_watchdog_armed_on_running_and_extended_by_ping() -> None:
    """With a watchdog the RUNNING slot gets a deadline, and every WATCHDOG=1 pushes it forward."""
    unit = make_unit(watchdog=5.0)
    (started, _), (pinged, actions) = run(unit, Slot(), [
        (0.0, Readiness()), (1.0, Spawned(PID)), (4.0, WatchdogPing()),
    ])[1:]
    assert started.deadline == 6.0
    assert pinged.deadline == 9.0
    assert actions == []


def test_watchdog_armed_when_notify_service_is_ready() -> None:
    """A notify service's watchdog deadline replaces the start timeout once READY=1 arrives."""
    unit = make_unit(ready=Ready.NOTIFY, watchdog=5.0, start_timeout=90.0)
    slot, _ = last(unit, Slot(), [(0.0, Readiness()), (0.0, Spawned(PID)), (2.0, NotifyReady())])
    assert slot.deadline == 7.0


def test_watchdog_ping_while_starting_is_ignored() -> None:
    """WATCHDOG=1 before READY=1 does not extend the start timeout."""
    unit = make_unit(ready=Ready.NOTIFY, watchdog=5.0, start_timeout=30.0)
    slot, _ = last(unit, Slot(), [(0.0, Readiness()), (0.0, Spawned(PID))])
    assert step(unit, slot, WatchdogPing(), 1.0) == (slot, [])


def test_watchdog_ping_without_watchdog_is_ignored() -> None:
    """WATCHDOG=1 from a unit without a watchdog arms nothing."""
    unit = make_unit()
    slot = running(unit)
    assert step(unit, slot, WatchdogPing(), 1.0) == (slot, [])


def test_watchdog_timeout_aborts_and_counts_as_failure() -> None:
    """A missed watchdog sends SIGABRT, escalates like a stop, and the exit backs off as a failure."""
    unit = make_unit(watchdog=5.0, process=Process(exec=("/bin/x",), stop_timeout=2.0))
    trace = run(unit, Slot(), [
        (0.0, Readiness()), (0.0, Spawned(PID)), (3.0, WatchdogPing()),
        (8.0, Timer()),
        (10.0, Timer()),
        (10.1, Exited(PID, Exit(signal=int(signal.SIGKILL)))),
    ])
    (aborted, a1), (killed, a2), (after, _) = trace[3:]
    assert aborted.state is SlotState.STOPPING
    assert aborted.after is After.FAIL
    assert aborted.deadline == 10.0
    assert effects(a1) == [Kill(PID, signal.SIGABRT)]
    assert logged(a1) == ["watchdog_timeout"]
    assert killed.deadline is None
    assert effects(a2) == [Kill(PID, signal.SIGKILL)]
    assert after.state is SlotState.BACKOFF
    assert after.failures == 1


def test_watchdog_stale_timer_after_ping_is_a_noop() -> None:
    """A Timer armed for the old watchdog deadline is ignored once a ping moved the deadline."""
    unit = make_unit(watchdog=5.0)
    slot, _ = last(unit, Slot(), [(0.0, Readiness()), (0.0, Spawned(PID)), (4.0, WatchdogPing())])
    assert step(unit, slot, Timer(), 5.0) == (slot, [])


# ---------------------------------------------------------------- crash loop


def spawns_in_crash_loop(unit: Unit, seconds: float, lifetime: float) -> tuple[int, Slot]:
    """Drive a slot whose every process fails after ``lifetime``, with a client always waiting, for ``seconds``."""
    slot, now, pid, spawns = Slot(), 0.0, 1000, 0
    actions: list[Action] = []
    while now < seconds:
        if Spawn() in actions:
            spawns += 1
            pid += 1
            slot, actions = step(unit, slot, Spawned(pid), now)
        elif slot.state is SlotState.IDLE:
            slot, actions = step(unit, slot, Readiness(), now)
        elif slot.state is SlotState.RUNNING:
            now += lifetime
            slot, actions = step(unit, slot, Exited(pid, CRASH), now)
        elif slot.state is SlotState.BACKOFF:
            assert slot.deadline is not None and slot.deadline > now
            now = slot.deadline
            slot, actions = step(unit, slot, Timer(), now)
        else:
            pytest.fail(f"crash loop stuck in {slot.state}")
    return spawns, slot


@pytest.mark.parametrize("start", [Start.ON_DEMAND, Start.EAGER])
@pytest.mark.parametrize("lifetime", [0.0, 0.05, 1.0])
def test_crash_loop_is_bounded_and_never_gives_up(start: Start, lifetime: float) -> None:
    """Ten minutes of an always-crashing program cost at most one spawn per capped delay plus the doubling steps."""
    unit = make_unit(start=start, restart_delay=0.1, restart_delay_max=30.0)
    spawns, slot = spawns_in_crash_loop(unit, 600.0, lifetime)
    doubling = math.ceil(math.log2(unit.restart_delay_max / unit.restart_delay)) + 1
    ceiling = 600.0 / unit.restart_delay_max + doubling + 1
    assert spawns <= ceiling
    assert spawns >= 600.0 / (unit.restart_delay_max + lifetime) - 1  # it keeps trying
    assert slot.state is not SlotState.FAILED


def test_start_timeouts_never_reset_the_backoff() -> None:
    """A notify service that hangs until start_timeout each time keeps backing off: time not ready earns no reset."""
    from supervisor.lifecycle import Exit, Exited, Readiness, Slot, SlotState, Spawned, Timer, step
    from supervisor.model import Process, Ready, Unit

    unit = Unit(name="hang", listen=(), process=Process(exec=("/bin/true",)), ready=Ready.NOTIFY,
                start_timeout=100.0, restart_reset=60.0, restart_delay=1.0, restart_delay_max=1000.0)
    slot, now, pid = Slot(), 0.0, 100
    delays = []
    for _ in range(3):
        slot, _a = step(unit, slot, Readiness(), now)
        slot, _a = step(unit, slot, Spawned(pid), now)
        now += unit.start_timeout
        slot, _a = step(unit, slot, Timer(), now)  # start timeout: stop signal
        slot, _a = step(unit, slot, Exited(pid, Exit(signal=15)), now)
        assert slot.state is SlotState.BACKOFF
        assert slot.deadline is not None
        delays.append(slot.deadline - now)
        now = slot.deadline
        slot, _a = step(unit, slot, Timer(), now)
        pid += 1
    assert delays == [1.0, 2.0, 4.0]


@pytest.mark.parametrize(("unit", "stored", "state"), [
    (make_unit(), True, SlotState.STARTING),
    (make_unit(), False, SlotState.IDLE),
    (make_unit(start=Start.EAGER), False, SlotState.STARTING),
], ids=["on-demand-stored", "on-demand-empty", "eager-empty"])
def test_backoff_end_starts_a_unit_with_stored_fds(unit: Unit, stored: bool, state: SlotState) -> None:
    """After a failure's back-off a unit with fds in its store starts at once; without, on-demand listens."""
    slot, _ = step(unit, running(unit), Exited(PID, CRASH), 1.0)
    assert slot.deadline is not None
    slot, actions = step(unit, slot, Timer(stored=stored), slot.deadline)
    assert slot.state is state
    assert (actions == [Spawn()]) == (state is SlotState.STARTING)


@pytest.mark.parametrize("unit", [
    make_unit(restart=Restart.ALWAYS, restart_delay=0.1, restart_delay_max=30.0),
    make_unit(mode=Mode.POOL, workers=2, restart_delay=0.1, restart_delay_max=30.0),
], ids=["restart-always", "pool"])
def test_clean_exit_at_once_backs_off_like_a_failure(unit: Unit) -> None:
    """A process that exits cleanly at once, again and again, waits twice as long each time up to the cap."""
    slot, now, delays = running(unit), 0.0, []
    for _ in range(12):
        slot, _ = step(unit, slot, Exited(PID, Exit(code=0)), now)
        assert slot.state is SlotState.BACKOFF and slot.deadline is not None
        delays.append(round(slot.deadline - now, 6))
        now = slot.deadline
        slot, actions = step(unit, slot, Timer(), now)
        assert actions == [Spawn()]
        slot, _ = step(unit, slot, Spawned(PID), now)
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8]
    assert delays[-1] == 30.0
    # Twelve spawns take minutes, not 1.2 s.
    assert now > 60


def test_clean_exit_after_a_long_run_respawns_after_the_first_delay() -> None:
    """restart: always after a run of restart_reset or more starts over from restart_delay."""
    unit = make_unit(restart=Restart.ALWAYS, restart_reset=60.0)
    slot = replace(running(unit, now=0.0), failures=5)
    slot, _ = step(unit, slot, Exited(PID, Exit(code=0)), 100.0)
    assert slot.failures == 1
    assert slot.deadline == pytest.approx(100.0 + unit.restart_delay)


# ---------------------------------------------------------------- drain (accept mode's stop)


def test_drain_signals_every_child_and_kills_the_rest_at_the_stop_timeout() -> None:
    """Stop: the stop signal to each child now; SIGKILL (logged) at stop_timeout to whoever is left."""
    unit = make_unit()
    drain, actions = lifecycle.drain_begin(unit, lifecycle.Drain(), [11, 12], 100.0)
    assert actions == [lifecycle.Kill(11, unit.process.stop_signal), lifecycle.Kill(12, unit.process.stop_signal)]
    assert drain.deadline == 100.0 + unit.process.stop_timeout
    again, _ = lifecycle.drain_begin(unit, drain, [11, 12], 105.0)  # a second stop does not push the deadline
    assert again.deadline == drain.deadline
    drain, actions = lifecycle.drain_timer([12])
    assert drain.deadline is None
    assert actions == [lifecycle.Log("child_killed", (("pid", 12),)), lifecycle.Kill(12, signal.SIGKILL)]


def test_drain_is_off_when_the_last_child_exits() -> None:
    unit = make_unit()
    drain, _ = lifecycle.drain_begin(unit, lifecycle.Drain(), [11, 12], 0.0)
    assert lifecycle.drain_exited(drain, remaining=1) == drain
    assert lifecycle.drain_exited(drain, remaining=0).deadline is None
    assert lifecycle.drain_begin(unit, lifecycle.Drain(), [], 0.0) == (lifecycle.Drain(), [])
