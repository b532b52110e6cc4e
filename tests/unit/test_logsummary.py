"""The log summary: one line per key per window, exact suppressed counts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from structlog.testing import capture_logs

from supervisor.logsummary import LogSummary


class FakeLoop:
    def __init__(self) -> None:
        self.timers: list[Callable[[], object]] = []

    def call_later(self, delay: float, callback: Callable[[], object], /) -> Any:
        self.timers.append(callback)

    def fire(self) -> None:
        timers, self.timers = self.timers, []
        for t in timers:
            t()


def test_flood_is_one_line_plus_one_summary_per_window() -> None:
    """10,000 refusals of one reason log the first in full and one summary with the exact rest."""
    loop = FakeLoop()
    with capture_logs() as logs:
        s = LogSummary(structlog.get_logger().bind(unit="u"), loop)
        for i in range(10_000):
            s.emit("connection_refused", reason="deny", remote=f"r{i}")
        loop.fire()
    assert [e["event"] for e in logs] == ["connection_refused", "connection_refused_summary"]
    assert logs[0]["remote"] == "r0" and logs[0]["reason"] == "deny"
    assert logs[1]["suppressed"] == 9_999 and logs[1]["reason"] == "deny"


def test_reasons_are_separate_keys_and_a_lone_event_has_no_summary() -> None:
    """Each reason gets its own first line; a window with one event writes no summary."""
    loop = FakeLoop()
    with capture_logs() as logs:
        s = LogSummary(structlog.get_logger(), loop)
        s.emit("connection_refused", reason="deny")
        s.emit("connection_refused", reason="per_source")
        s.emit("connection_refused", reason="per_source")
        loop.fire()
        s.emit("connection_refused", reason="deny")
    assert [(e["event"], e.get("reason")) for e in logs] == [
        ("connection_refused", "deny"), ("connection_refused", "per_source"),
        ("connection_refused_summary", "per_source"), ("connection_refused", "deny")]
