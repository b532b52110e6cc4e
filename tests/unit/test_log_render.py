"""The JSON line renderer: ``json.dumps(event, default=repr)``'s text, and direct lines equal to structlog's."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator

import pytest
import structlog

from supervisor import log
from supervisor.model import LogFormat

VALUES: list[object] = ["plain", "é ☃ \n \" \\ \x00", "", 0, -7, 10**300, 0.25, 1e300, math.inf, math.nan, True,
                        False, None, [1, "a"], {"k": [None]}, object(), 3 + 4j, b"bytes"]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_each_value_renders_as_json_dumps(value: object) -> None:
    event = {"unit": "u", "field": value, "event": "e"}
    assert log._encode(event) == json.dumps(event, default=repr)


def test_an_integer_too_long_for_str_is_named_not_raised() -> None:
    """json.dumps raises for a 5,000-digit integer; a log line says what it was instead."""
    with pytest.raises(ValueError):
        json.dumps(10**5000)
    assert json.loads(log._encode({"n": 10**5000}))["n"] == "<16610-bit integer>"


def test_a_key_that_is_no_string_falls_back_to_json() -> None:
    event = {1: "one", "event": "e"}
    assert log._encode(event) == json.dumps(event, default=repr)  # type: ignore[arg-type]


@pytest.fixture
def pipe_writer() -> Iterator[tuple[int, log.LogWriter]]:
    r, w = os.pipe()
    writer = log.LogWriter(w)
    os.close(w)
    yield r, writer
    os.close(r)
    os.close(writer.fd)
    structlog.reset_defaults()
    log._direct = None


def lines(fd: int) -> list[str]:
    return os.read(fd, 1 << 16).decode().splitlines()


@pytest.mark.parametrize("priorities", [False, True])
def test_connection_lines_are_structlogs_lines(pipe_writer: tuple[int, log.LogWriter], priorities: bool) -> None:
    """``ConnectionLines`` writes what ``logger.info`` writes (the timestamp aside), journal prefix included."""
    r, writer = pipe_writer
    log.configure(LogFormat.JSON, "info", writer=writer, priorities=priorities)
    logger = log.get_logger(unit="web\"é")
    conn = log.ConnectionLines(logger)
    conn.accepted("[::1]:80", 12)
    logger.info("connection_accepted", remote="[::1]:80", pid=12)
    conn.exited(12, "pid=3,uid=0", "SIGKILL", 0.001234)
    logger.info("child_exited", pid=12, remote="pid=3,uid=0", status="SIGKILL", duration=0.001234)
    got = lines(r)
    assert len(got) == 4
    stamp = re.compile(r'"timestamp": "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"')
    assert all(stamp.search(line) for line in got)
    assert stamp.sub("T", got[0]) == stamp.sub("T", got[1])
    assert stamp.sub("T", got[2]) == stamp.sub("T", got[3])
    assert got[0].startswith("<6>{") == priorities
    assert json.loads(got[2].removeprefix("<6>"))["unit"] == "web\"é"


def test_connection_lines_follow_the_level_and_format(pipe_writer: tuple[int, log.LogWriter]) -> None:
    """Above info nothing is written; in the console format the lines go through structlog."""
    r, writer = pipe_writer
    log.configure(LogFormat.JSON, "warning", writer=writer)
    conn = log.ConnectionLines(log.get_logger(unit="u"))
    conn.accepted("1.2.3.4:5", 6)
    conn.exited(6, "1.2.3.4:5", "exit 0", 0.5)
    log.get_logger().warning("marker")
    assert [json.loads(line)["event"] for line in lines(r)] == ["marker"]
    log.configure(LogFormat.CONSOLE, "info", writer=writer)
    log.ConnectionLines(log.get_logger(unit="u")).accepted("1.2.3.4:5", 6)
    (line,) = lines(r)
    assert "connection_accepted" in line and "remote=1.2.3.4:5" in line and not line.startswith("{")
