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


def test_pool_units_list_their_workers_and_roll_under_the_table() -> None:
    """A pool unit's workers (slot, pid, state, age, restarts) and its roll appear below the table."""
    from supervisor.cli import format_status

    unit = {"name": "web", "mode": "pool", "state": "running", "listen": ["tcp:127.0.0.1:80"], "pids": [10, 11],
            "connections": {}, "restarts": 0,
            "workers": [{"slot": 0, "pid": 10, "state": "running", "age": 5.0, "restarts": 0, "role": "worker"},
                        {"slot": 0, "pid": 11, "state": "starting", "age": 0.1, "restarts": 0, "role": "surge"}],
            "roll": {"state": "rolling", "replaced": 0, "total": 2}}
    text = format_status([unit])
    assert "web workers:\n  slot 0: pid 10 running age 5.0s restarts 0\n" in text
    assert "  slot 0: pid 11 starting age 0.1s restarts 0 (surge)\n  roll: rolling 0/2" in text


def test_refusals_by_reason_and_a_pause_are_shown_under_the_table() -> None:
    """status prints each unit's refusals by reason and the cause accepting is paused for (SPEC 8, 11)."""
    u = unit(mode="accept", connections={"active": 1, "accepted": 5, "refused": 4,
                                         "refused_by_reason": {"per_source": 1, "deny": 3}}, paused="rate")
    lines = format_status([u, unit(name="quiet")]).splitlines()
    assert lines[3:] == ["web refused: deny 3, per_source 1", "web accepting paused: rate"]
