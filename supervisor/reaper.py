"""Reaping children: one thread for all of them, never one per child.

Theory of operation
-------------------
uvloop reserves ``SIGCHLD`` for its own subprocess support (``add_signal_handler``
refuses it), and a pidfd per child costs an fd per connection, which is the
one resource that runs out first under a flood. So a single thread blocks in
``waitpid(-1, 0)``: the kernel wakes it once per exited child, and it posts
``(pid, status)`` to the event loop with ``call_soon_threadsafe``; the owner is
found in O(1) by pid there. When the daemon has no children ``waitpid``
fails with ECHILD and the thread sleeps on a condition until ``expect()``
says a child was spawned. The thread never touches daemon state.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable


class Reaper:
    def __init__(self, loop: asyncio.AbstractEventLoop, dispatch: Callable[[int, int], None]) -> None:
        self._loop = loop
        self._dispatch = dispatch
        self._cond = threading.Condition()
        self._pending = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="sockvisor-reaper", daemon=True)
        self._thread.start()

    def expect(self) -> None:
        """A child was just spawned: make sure the thread is waiting for it (cheap when it already is)."""
        if not self._pending:
            with self._cond:
                self._pending = True
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        while not self._closed:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                with self._cond:
                    while not self._pending and not self._closed:
                        self._cond.wait()
                    self._pending = False
                continue
            except InterruptedError:
                continue
            try:
                self._loop.call_soon_threadsafe(self._dispatch, pid, status)
            except RuntimeError:  # the loop is closed: the daemon is exiting
                return
