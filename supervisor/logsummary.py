"""Bounded log volume for events a hostile peer can repeat at will.

A remote client can reconnect past its limit a hundred thousand times a
second, a child can flood its notify socket, a missing binary fails every
spawn. Each such event is worth one line, not one line *per occurrence*: a
flood must not fill the disk or cost the daemon its CPU in JSON rendering.

Rule: per key (event name, unit, reason) the first occurrence in a window is
logged in full, at once. Every later one in the same window is only counted.
When the window ends, one ``<event>_summary`` line carries the count of what was
suppressed (``suppressed=N``, ``window=1.0``) and the key's fields, and the next
occurrence opens a new window. So a single event is logged exactly as before, a
flood costs one line per key per second, and the counts stay exact (counters
for status and metrics are kept by the callers, not here).

The clock and timer come from the loop the summary is given; nothing here
reads the wall clock, so tests can drive it with a fake ``call_later``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

WINDOW = 1.0


class _Loop(Protocol):
    def call_later(self, delay: float, callback: Callable[[], object], /) -> Any: ...


@dataclass(slots=True)
class _Window:
    level: str
    fields: dict[str, Any]
    suppressed: int = 0


@dataclass(slots=True)
class LogSummary:
    """Logs the first of each (event, reason) per window in full and summarizes the rest.

    Args:
        log: the bound logger to write to (already bound with ``unit=...``).
        loop: anything with ``call_later`` (the event loop).
        window: seconds per window.
    """

    log: Any
    loop: _Loop
    window: float = WINDOW
    _open: dict[tuple[str, str], _Window] = field(default_factory=dict)

    def emit(self, event: str, *, level: str = "info", reason: str = "", **fields: Any) -> None:
        """Log ``event`` now, or count it if its key already logged in this window."""
        key = (event, reason)
        win = self._open.get(key)
        if win is not None:
            win.suppressed += 1
            return
        if reason:
            fields["reason"] = reason
        getattr(self.log, level)(event, **fields)
        self._open[key] = _Window(level, {"reason": reason} if reason else {})
        self.loop.call_later(self.window, lambda: self._close(key))

    def _close(self, key: tuple[str, str]) -> None:
        win = self._open.pop(key, None)
        if win is not None and win.suppressed:
            getattr(self.log, win.level)(f"{key[0]}_summary", suppressed=win.suppressed,
                                         window=self.window, **win.fields)

    def flush(self) -> None:
        """Write every pending summary now (at shutdown or unit removal)."""
        for key in list(self._open):
            self._close(key)
