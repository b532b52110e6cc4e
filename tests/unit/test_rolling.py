"""The rolling-restart planner, driven event by event with virtual time.

Each test builds a pool ``Unit``, begins a roll and feeds ``step`` what the
surges and the old processes do, asserting on the actions: which surge starts
when, which slot is promoted when, and how the roll ends. No loop, no process.
"""

from __future__ import annotations

import socket

import pytest

from supervisor.model import InetAddress, Listen, ListenKind, Mode, Process, Ready, Unit
from supervisor.rolling import (
    Action,
    Cancel,
    CancelSurge,
    Event,
    Log,
    OldGone,
    Phase,
    Promote,
    Resize,
    RestartRequest,
    Roll,
    RollState,
    StartSurge,
    SurgeFailed,
    SurgeRunning,
    Timer,
    begin,
    step,
)


def make_unit(**overrides: object) -> Unit:
    listen = Listen(ListenKind.TCP, InetAddress("127.0.0.1", 8080, socket.AF_INET), name="web")
    fields: dict[str, object] = {"name": "web", "listen": (listen,), "process": Process(exec=("/bin/true",)),
                                 "mode": Mode.POOL, "workers": 3, "settle": 1.0, "max_surge": 1}
    fields.update(overrides)
    return Unit(**fields)  # type: ignore[arg-type]


def core(actions: list[Action]) -> list[Action]:
    """The actions without the log lines."""
    return [a for a in actions if not isinstance(a, Log)]


def logs(actions: list[Action]) -> list[str]:
    return [a.event for a in actions if isinstance(a, Log)]


def run(unit: Unit, roll: Roll, script: list[tuple[float, Event]]) -> tuple[Roll, list[Action]]:
    out: list[Action] = []
    for now, event in script:
        roll, actions = step(unit, roll, event, now)
        out += actions
    return roll, out


def test_begin_starts_one_surge_per_max_surge() -> None:
    """A roll starts surges for the first max_surge slots only, and logs roll_started."""
    roll, actions = begin(make_unit(), (0, 1, 2), 0.0)
    assert core(actions) == [StartSurge(0)]
    assert logs(actions) == ["roll_started"]
    roll, actions = begin(make_unit(max_surge=2), (0, 1, 2), 0.0)
    assert core(actions) == [StartSurge(0), StartSurge(1)]
    assert roll.pending == (2,)


def test_empty_roll_finishes_at_once() -> None:
    """With no running worker there is nothing to replace: the roll finishes immediately."""
    roll, actions = begin(make_unit(), (), 5.0)
    assert roll.state is RollState.FINISHED
    assert logs(actions) == ["roll_started", "roll_finished"]


def test_exec_mode_promotes_after_settle_then_waits_for_the_old_exit() -> None:
    """ready: exec promotes a running surge once settle has passed; the next surge starts after the old exit."""
    unit = make_unit(settle=0.5)
    roll, _ = begin(unit, (0, 1), 0.0)
    roll, actions = step(unit, roll, SurgeRunning(0), 0.1)
    assert actions == [] and roll.deadline == pytest.approx(0.6)
    roll, actions = step(unit, roll, Timer(), 0.59)  # early timer: nothing
    assert actions == []
    roll, actions = step(unit, roll, Timer(), 0.6)
    assert actions == [Promote(0)]
    assert roll.deadline is None
    roll, actions = step(unit, roll, SurgeRunning(1), 0.7)  # not started yet: ignored
    assert actions == []
    roll, actions = step(unit, roll, OldGone(0), 0.8)
    assert actions == [StartSurge(1)]


def test_notify_mode_promotes_on_ready_without_settle() -> None:
    """ready: notify promotes the surge as soon as it is running (READY=1), with no settle wait."""
    unit = make_unit(ready=Ready.NOTIFY, workers=2)
    roll, _ = begin(unit, (0, 1), 0.0)
    roll, actions = run(unit, roll, [(0.2, SurgeRunning(0)), (0.3, OldGone(0)), (0.4, SurgeRunning(1)),
                                     (0.5, OldGone(1))])
    assert core(actions) == [Promote(0), StartSurge(1), Promote(1)]
    assert logs(actions) == ["roll_finished"]
    assert roll.state is RollState.FINISHED
    assert roll.replaced == (0, 1)


def test_retiring_old_process_counts_against_max_surge() -> None:
    """A promoted slot whose old process has not exited yet still occupies a surge place."""
    unit = make_unit(ready=Ready.NOTIFY, max_surge=1)
    roll, _ = begin(unit, (0, 1, 2), 0.0)
    roll, actions = step(unit, roll, SurgeRunning(0), 0.1)
    assert actions == [Promote(0)]
    assert [s.phase for s in roll.steps] == [Phase.RETIRING]
    assert roll.pending == (1, 2)


def test_surge_failure_aborts_cancels_other_surges_and_keeps_retiring_steps() -> None:
    """A surge that fails aborts the roll, cancels surges still starting, and logs roll_aborted with the reason."""
    unit = make_unit(ready=Ready.NOTIFY, max_surge=2, workers=4)
    roll, _ = begin(unit, (0, 1, 2, 3), 0.0)
    roll, a1 = step(unit, roll, SurgeRunning(0), 0.1)
    assert a1 == [Promote(0)]
    roll, a2 = step(unit, roll, SurgeFailed(1, "exited (exit 3)"), 0.2)
    # Slot 0 goes on retiring its old process; the failed surge of slot 1 is cleaned up; 2 and 3 never start.
    assert core(a2) == [CancelSurge(1)]
    assert [s.slot for s in roll.steps] == [0]
    assert logs(a2) == ["roll_aborted"]
    fields = dict(next(a for a in a2 if isinstance(a, Log)).fields)
    assert fields == {"slot": 1, "reason": "exited (exit 3)", "replaced": 1, "remaining": 3}
    assert roll.state is RollState.ABORTED and roll.reason == "exited (exit 3)" and roll.failed_slot == 1
    # Nothing applies after the abort.
    assert step(unit, roll, OldGone(0), 0.3) == (roll, [])


def test_abort_cancels_the_surges_that_did_not_fail() -> None:
    """With two surges starting, the failure of one cancels both (the failed one is cleaned up too)."""
    unit = make_unit(ready=Ready.NOTIFY, max_surge=2)
    roll, _ = begin(unit, (0, 1, 2), 0.0)
    roll, actions = step(unit, roll, SurgeFailed(0, "start timeout"), 1.0)
    assert core(actions) == [CancelSurge(0), CancelSurge(1)]
    assert roll.pending == () and roll.steps == ()


def test_failure_of_a_promoted_slot_is_not_a_surge_failure() -> None:
    """Once a surge took its slot over, its later failure is the slot's business, not the roll's."""
    unit = make_unit(ready=Ready.NOTIFY)
    roll, _ = begin(unit, (0, 1), 0.0)
    roll, _ = step(unit, roll, SurgeRunning(0), 0.1)
    roll2, actions = step(unit, roll, SurgeFailed(0, "exited (exit 1)"), 0.2)
    assert (roll2, actions) == (roll, [])


def test_restart_during_a_roll_is_queued_once() -> None:
    """A restart while rolling sets `again` (logged once); an abort drops it."""
    unit = make_unit()
    roll, _ = begin(unit, (0,), 0.0)
    roll, actions = step(unit, roll, RestartRequest(), 0.1)
    assert roll.again and logs(actions) == ["roll_queued"]
    roll, actions = step(unit, roll, RestartRequest(), 0.2)
    assert actions == []
    roll, _ = step(unit, roll, Cancel("stopped"), 0.3)
    assert roll.state is RollState.ABORTED and not roll.again


def test_cancel_stops_starting_surges() -> None:
    """An operator stop or shutdown cancels the surge that is still starting."""
    unit = make_unit()
    roll, _ = begin(unit, (0, 1), 0.0)
    roll, actions = step(unit, roll, Cancel("shutdown"), 0.1)
    assert core(actions) == [CancelSurge(0)]
    assert roll.reason == "shutdown"


def test_resize_drops_slots_that_no_longer_exist() -> None:
    """A reload that shrinks the pool drops pending slots above the new size and cancels their surges."""
    unit = make_unit(ready=Ready.NOTIFY, max_surge=2, workers=4)
    roll, _ = begin(unit, (0, 1, 2, 3), 0.0)
    roll, actions = step(unit, roll, Resize(1), 0.1)
    assert core(actions) == [CancelSurge(1)]
    assert roll.pending == () and roll.total == 1
    roll, actions = run(unit, roll, [(0.2, SurgeRunning(0)), (0.3, OldGone(0))])
    assert core(actions) == [Promote(0)]
    assert roll.state is RollState.FINISHED


@pytest.mark.parametrize("settle", [0.0, -1.0])
def test_no_settle_promotes_at_once(settle: float) -> None:
    """settle: 0 promotes an exec-mode surge as soon as it runs."""
    unit = make_unit(settle=settle)
    roll, _ = begin(unit, (0,), 0.0)
    _, actions = step(unit, roll, SurgeRunning(0), 0.1)
    assert actions == [Promote(0)]


def test_events_for_unknown_slots_change_nothing() -> None:
    """Stale events (a slot not in flight) leave the roll as it is."""
    unit = make_unit()
    roll, _ = begin(unit, (0, 1), 0.0)
    for event in (SurgeRunning(1), SurgeFailed(1, "x"), OldGone(0), OldGone(1), Timer()):
        assert step(unit, roll, event, 0.5) == (roll, [])
