"""The status table the CLI prints: columns, placeholders and alignment, from status dicts alone."""

from __future__ import annotations

from typing import Any

from supervisor.cli import format_status


def unit(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "web", "mode": "service", "state": "listening", "listen": ["tcp:127.0.0.1:8080"], "pids": [],
        "connections": {"active": 0, "accepted": 0, "refused": 0}, "restarts": 0, "status": "", "last_exit": None,
    }
    return {**base, **over}


def test_header_and_placeholders() -> None:
    """An idle unit prints dashes for pids, last exit and status under a fixed header."""
    header, row = format_status([unit()]).splitlines()
    assert header.split("  ")[0] == "UNIT"
    assert [c for c in header.split("  ") if c][-2:] == ["LAST EXIT", "STATUS"]
    assert row.split() == ["web", "service", "listening", "tcp:127.0.0.1:8080", "-", "0", "0", "0", "0", "-", "-"]


def test_counters_last_exit_and_many_pids() -> None:
    """Counters, the last exit with its pid, and at most four pids (then an ellipsis) are shown."""
    u = unit(mode="accept", state="running", pids=[11, 12, 13, 14, 15], listen=["tcp:[::]:80", "unix:/run/a"],
             connections={"active": 5, "accepted": 90, "refused": 3}, restarts=2,
             last_exit={"pid": 9, "status": "SIGTERM", "at": 1.0}, status="busy")
    row = format_status([u]).splitlines()[1]
    assert "tcp:[::]:80,unix:/run/a" in row
    assert "11,12,13,14..." in row
    assert row.split()[5:9] == ["5", "90", "3", "2"]
    assert row.endswith("SIGTERM (pid 9)  busy")


def test_columns_align_across_rows() -> None:
    """Every column starts at the same offset in every row, whatever the width of the values."""
    lines = format_status([unit(name="a"), unit(name="a-much-longer-name", state="backoff")]).splitlines()
    offsets = {line.index(word) for line, word in zip(lines, ("MODE", "service", "service"), strict=True)}
    assert len(offsets) == 1


def test_no_units_prints_the_header_only() -> None:
    """With no units configured the table is just its header."""
    assert format_status([]).splitlines()[0].startswith("UNIT")
    assert len(format_status([]).splitlines()) == 1
