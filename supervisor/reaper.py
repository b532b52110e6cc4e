"""Reaping children on the event loop: one signalfd for all of them.

Theory of operation
-------------------
uvloop reserves ``SIGCHLD`` handlers for its own subprocess support, a pidfd
per child costs an fd per connection (the resource that runs out first under
a flood), and a reaper thread costs a thread wake-up and a GIL hand-off per
child. Instead ``SIGCHLD`` is blocked in the daemon's threads and delivered
through a ``signalfd`` (``_spawn.sigchld_fd``) that the loop polls like any
socket. When it is readable, one call into C (``_spawn.reap``) drains every queued
signal and collects every exited child with ``waitpid(-1, WNOHANG)`` (signals
coalesce, so one wake-up may stand for many exits; the loop of reads and
waits costs no Python per system call); each ``(pid, status)`` goes to
``dispatch``, which finds the owner in O(1).

A child may be reaped before its spawner registered it (the accept path can
spawn from a helper thread); ``dispatch`` keeps such early exits until the
registration arrives (see ``Daemon.watch_child``).
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable

from supervisor import _spawn
from supervisor.lifecycle import Exit


class Reaper:
    def __init__(self, loop: asyncio.AbstractEventLoop, dispatch: Callable[[int, int], None]) -> None:
        self._loop = loop
        self._dispatch = dispatch
        self._fd = _spawn.sigchld_fd()
        loop.add_reader(self._fd, self.reap)

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def reap(self) -> None:
        """Drain the signalfd, then collect every exited child."""
        dispatch = self._dispatch
        for pid, status in _spawn.reap(self._fd):
            dispatch(pid, status)


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
