"""Reaping children: one thread of the C extension reaps them all, the loop dispatches.

Theory of operation
-------------------
uvloop reserves ``SIGCHLD`` handlers for its own subprocess support, and a
pidfd per child costs an fd per connection (the resource that runs out first
under a flood). ``SIGCHLD`` is blocked in every thread of the daemon and
delivered through a ``signalfd`` that the hub thread of ``_spawn`` ("the hub"
in ``_spawn.c``) waits on: it collects every exited child with
``waitpid(-1, WNOHANG)`` (signals coalesce, so one wake-up may stand for many
exits) and files ``(pid, status, when)``. The loop is woken through an
eventfd and ``reap`` drains what was filed; each ``(pid, status)`` goes to
``dispatch``, which finds the owner in O(1).

The same thread serves accept mode's bulk units (``engine``): it accepts and
spawns for them as Python grants, and their records come out of the same
drain, the accepts before the exits. Those records (and their children's
exits) may wait up to 20 ms so that one wake-up of the loop carries many
connections; every other exit wakes the loop at once. ``exit_time`` is the
loop time at which the exit being dispatched happened (a drain may come late).

A pid reaped by the thread and not yet dispatched is never signalled:
``signal_child`` checks, under the hub's lock, that its exit is not filed.

A child may be reaped before its spawner registered it (the accept path can
spawn from a helper thread); ``dispatch`` keeps such early exits until the
registration arrives (see ``Daemon.watch_child``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import Callable
from typing import Protocol

from supervisor import _spawn
from supervisor.lifecycle import Exit


class Lane(Protocol):
    """What owns an engine: it hears of the accepts, then (after the exits) settles its grant."""

    def took(self, accepted: list[tuple[int, float, str]], failures: list[tuple[str, int, str]], err: int) -> None:
        ...

    def settle(self) -> None:
        ...


class Reaper:
    def __init__(self, loop: asyncio.AbstractEventLoop, dispatch: Callable[[int, int], None],
                 on_watchdog: Callable[[int, int], None] | None = None) -> None:
        self._loop = loop
        self._dispatch = dispatch
        self._on_watchdog = on_watchdog  # (new, total) children the spawn watchdog killed
        self._watchdog_kills = _spawn.watchdog_kills()
        self._fd = _spawn.hub_open()
        self._lanes: dict[_spawn.Engine, Lane] = {}
        self._draining = False
        self._frozen = False  # after freeze(): drains only dispatch; nothing more is reaped
        self.exit_time: float | None = None  # while dispatching: when that child exited (loop time)
        loop.add_reader(self._fd, self._woken)

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            for engine in self._lanes:
                engine.close()
            self._lanes.clear()
            _spawn.hub_close()
            self._fd = -1

    def engine(self, lane: Lane) -> _spawn.Engine:
        """A new engine on the hub for ``lane`` (accept mode's bulk path)."""
        engine = _spawn.Engine()
        self._lanes[engine] = lane
        return engine

    def release(self, engine: _spawn.Engine) -> None:
        """The engine leaves the hub; its children still running are reaped like any other."""
        self._lanes.pop(engine, None)
        engine.close()

    def freeze(self) -> None:
        """Before a re-exec: stop the thread, then take in everything it did (the state is final).

        Until ``thaw``, nothing is reaped, not even by ``reap()``: a child that exits after this is
        still a child when the next image lists what it takes over.
        """
        _spawn.hub_pause(True)
        self.reap()
        self._frozen = True

    def thaw(self) -> None:
        """The re-exec failed: start the thread again."""
        self._frozen = False
        _spawn.hub_pause(False)

    def _woken(self) -> None:
        self._take(False)

    def reap(self) -> None:
        """Collect every exited child now, and dispatch everything filed (a no-op while dispatching)."""
        self._take(True)

    def _take(self, collect: bool) -> None:
        if self._draining or self._fd < 0:
            return
        self._draining = True
        try:
            batches, exits = _spawn.hub_drain(collect and not self._frozen)
            lanes = self._lanes
            touched = []
            for engine, accepted, failures, err in batches:
                lane = lanes.get(engine)
                if lane is not None:
                    lane.took(accepted, failures, err)
                    touched.append(lane)
            if exits:
                dispatch = self._dispatch
                ago = self._loop.time() - time.monotonic()
                for pid, status, when in exits:
                    self.exit_time = when + ago
                    dispatch(pid, status)
                self.exit_time = None
                touched = list(lanes.values())
                # A child the watchdog killed exits like any other: say why, once per drain.
                kills = _spawn.watchdog_kills()
                if kills != self._watchdog_kills and self._on_watchdog is not None:
                    self._on_watchdog(kills - self._watchdog_kills, kills)
                self._watchdog_kills = kills
            for lane in touched:
                lane.settle()
        finally:
            self._draining = False


def signal_child(pid: int, sig: int, *, group: bool = True) -> bool:
    """Signal ``pid``'s process group (or the pid alone; a group that is gone falls back to the pid).

    Not sent (False) when the pid is gone: already reaped, or no such process.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        return _spawn.signal_child(pid, sig, group)
    return False


@functools.lru_cache(maxsize=256)  # statuses repeat (0, 1, a few signals) and an Exit is immutable
def exit_of(status: int) -> Exit:
    """A ``waitpid`` status as the lifecycle's ``Exit`` (code, or the signal that killed it)."""
    if os.WIFSIGNALED(status):
        return Exit(signal=os.WTERMSIG(status))
    return Exit(code=os.WEXITSTATUS(status))


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper(on: bool = True) -> bool:
    """Make the daemon a child subreaper (prctl): orphans of its children are reparented to it, not to init.

    Returns whether the kernel accepted it.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0) == 0)


def own_children() -> list[int]:
    """The daemon's live children right now (its own and adopted orphans), from /proc."""
    pids: list[int] = []
    task_dir = f"/proc/{os.getpid()}/task"
    try:
        tasks = os.listdir(task_dir)
    except OSError:
        return pids
    for task in tasks:
        try:
            with open(f"{task_dir}/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            continue
    return pids
