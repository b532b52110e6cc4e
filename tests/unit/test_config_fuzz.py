"""Hostile configuration text: only located ConfigError lines come out, quickly, never a traceback.

The property-based part (hypothesis) mutates valid unit files and generates
YAML documents; it is bounded to a few seconds. The long run (100,000 inputs)
is ``bench/fuzz_config.py``.
"""

from __future__ import annotations

import re
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.config import load_config, load_units_from_text
from supervisor.errors import ConfigError

LOCATED = re.compile(r"[^\n:]+:\d+:\d+: [^\n]+")
VALID = (
    "name: web\nmode: accept\nlisten:\n  - tcp: 127.0.0.1:8080\n    backlog: 16\n    receive_buffer: 64K\n"
    "exec: [/bin/cat]\nstop_timeout: 10s\nrestart_delay: 250ms\nlimits: {nofile: 1024}\n"
    "rate: {per_second: 5}\nenvironment: {A: b}\n"
)
HOSTILE = [
    "[accept]", "9" * 400, "9" * 5000, "2001-02-30", "!!int 0xfff+f", "!!bool maybe", "!!timestamp x", ".inf",
    "'" + "9" * 400 + "K'", "\"\\0\"", "*nope", "[" * 300 + "]" * 300, "{a: 1}", "4294967296", "-1", "~",
]


def errors_of(text: str) -> list[str]:
    """The problem lines of loading ``text`` ([] if valid); any other exception fails the test."""
    try:
        load_units_from_text(text, "web.yaml")
    except ConfigError as exc:
        return [str(p) for p in exc.problems]
    return []


def assert_located(lines: list[str]) -> None:
    for line in lines:
        assert LOCATED.fullmatch(line), line
        assert len(line) < 1000, line[:200]


def bomb(levels: int, width: int = 9) -> str:
    out = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels + 1):
        out.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(out) + "\n"


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = VALID
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        how = draw(st.sampled_from(["insert", "delete", "value"]))
        if how == "insert":
            text = text[:at] + draw(st.text(max_size=8)) + text[at:]
        elif how == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 8)):]
        else:
            key = draw(st.sampled_from(["mode", "stop_timeout", "restart_delay", "workers", "nice", "exec",
                                        "limits", "rate", "listen", "user", "umask", "watchdog"]))
            value = draw(st.sampled_from(HOSTILE) | st.text(max_size=20).map(repr))
            text = re.sub(rf"(?m)^{key}:.*$", "", text) + f"\n{key}: {value}\n"
    return text


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_unit_files_give_only_located_errors(text: str) -> None:
    """A mutated valid unit file yields ConfigError with located one-line errors, or loads; nothing else."""
    assert_located(errors_of(text))


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["name", "mode", "listen", "exec", "stop_timeout", "limits", "rate",
                                        "workers", "environment", "user", "start_limit", "x"]),
                       yaml_values, max_size=8))
def test_generated_yaml_gives_only_located_errors(document: dict[str, object]) -> None:
    """Any YAML document built from generated values yields located errors or a valid config, never a traceback."""
    assert_located(errors_of(yaml.safe_dump(document)))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mode: [accept]\n", "web.yaml:3:7: mode: expected service, accept, pool or proxy, got a list"),
        ("stop_timeout: " + "9" * 400 + "\n",
         "web.yaml:3:15: stop_timeout: duration of about 401 digits is too long: "
         "the maximum is 3.1536e+07s (365 days)"),
        ("stop_timeout: " + "9" * 5000 + "\n", "web.yaml:3:15: stop_timeout: invalid value: not a valid int"),
        ("stop_timeout: 2001-02-30\n",
         "web.yaml:3:15: stop_timeout: invalid value: not a valid timestamp (day is out of range for month)"),
        ("environment: " + "[" * 500 + "]" * 500 + "\n", "web.yaml:3:77: invalid YAML: nested deeper than 64 levels"),
        ("nice: !!int 0xfff+f\n", "web.yaml:3:7: nice: invalid value: not a valid int"),
        ("restart_delay: .inf\n", "web.yaml:3:16: restart_delay: expected a finite duration, got inf"),
        ("restart_delay: '" + "9" * 400 + "s'\n", "web.yaml:3:16: restart_delay: duration '999"),
        ("watchdog: 1.0e-9\n", "web.yaml:3:11: watchdog: duration 1e-09 is too short: the minimum is 1us"),
        ("limits: {nofile: " + "9" * 30 + "}\n", "web.yaml:3:18: limits.nofile: size 999999999999999999999999999999"
         " is too large: the maximum is 9223372036854775807"),
        ("description: \x01\n", "web.yaml:3:14: invalid YAML: character U+0001 is not allowed"),
        ("exec: [\"/bin/a\\0b\"]\n", "web.yaml:3:8: exec[0]: must not contain a NUL character"),
        ("user: '99999999999'\n", "web.yaml:3:7: user: invalid id '99999999999' (0-4294967294)"),
        ("workers: 100000000\nmode: pool\n", "web.yaml:3:10: workers: 100000000 is out of range (1-4096)"),
    ],
    ids=["mode-list", "duration-400-digits", "duration-5000-digits", "timestamp", "nested-500", "bad-hex-int",
         "infinite-restart-delay", "duration-string-huge", "watchdog-too-short", "rlimit-huge", "control-char",
         "nul-in-exec", "uid-too-large", "workers-too-many"],
)
def test_each_reported_crash_is_one_located_error(text: str, expected: str) -> None:
    """Each input of issue 9 item 3 that used to raise now gives exactly one located error line."""
    base = "listen: [{tcp: 127.0.0.1:8080}]\nexec: [/bin/true]\n"
    if text.startswith("exec:"):
        base = "listen: [{tcp: 127.0.0.1:8080}]\nname: web\n"
    lines = errors_of(base + text)
    assert len(lines) == 1, lines
    assert lines[0].startswith(expected), lines[0]


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("receive_buffer: '" + "9" * 400 + "K'", "size '9999"),
        ("receive_buffer: 2G", "size '2G' is too large: the maximum is 2147483647"),
        ("send_buffer: 2147483648", "size 2147483648 is too large: the maximum is 2147483647"),
        ("mark: 2147483648", "2147483648 is out of range (0-2147483647)"),
        ("keepalive_time: 32768", "duration 32768 is too long: the maximum is 32767s"),
    ],
    ids=["size-too-large-for-float", "receive-buffer-over-int", "send-buffer-over-int", "mark-over-int",
         "keepalive-over-kernel-max"],
)
def test_socket_options_are_range_checked(listen: str, expected: str) -> None:
    """A socket option outside what setsockopt() takes is a located error at parse time, not a crash in run."""
    lines = errors_of(f"listen:\n  - tcp: 127.0.0.1:8080\n    {listen}\nexec: [/bin/true]\n")
    assert len(lines) == 1, lines
    assert lines[0].startswith("web.yaml:3:"), lines[0]
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("key", ["mode", "exec", "stop_timeout", "allow", "environment", "description"])
def test_alias_bomb_costs_linear_time_and_memory(key: str) -> None:
    """An 8-level alias bomb used where an error prints the value is refused in well under a second and 50 MB."""
    text = bomb(8) + f"listen: [{{tcp: 127.0.0.1:8080}}]\nexec: [/bin/true]\n{key}: *a8\n"
    if key == "exec":
        text = bomb(8) + "listen: [{tcp: 127.0.0.1:8080}]\nexec: *a8\n"
    tracemalloc.start()
    started = time.monotonic()
    try:
        lines = errors_of(text)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.monotonic() - started < 1.0
    assert peak < 50 * 2**20
    assert lines
    assert_located(lines)


def test_empty_unit_file_is_located_at_line_one(tmp_path: Path) -> None:
    """An empty unit file is reported as file:1:1."""
    (tmp_path / "sockets.d").mkdir()
    (tmp_path / "sockets.d" / "web.yaml").write_text("")
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert [str(p) for p in info.value.problems] == ["sockets.d/web.yaml:1:1: file is empty: expected a unit mapping"]


def test_undecodable_bytes_are_located(tmp_path: Path) -> None:
    """A byte that is not UTF-8 is reported at its line and column."""
    (tmp_path / "sockets.d").mkdir()
    (tmp_path / "sockets.d" / "web.yaml").write_bytes(b"exec: [/bin/true]\ndescription: \xff\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert [str(p) for p in info.value.problems] == [
        "sockets.d/web.yaml:2:14: not UTF-8 text (byte 0xff at offset 31)"
    ]


def test_control_character_after_multibyte_text_is_located_by_character() -> None:
    """A control character after non-ASCII text is located by characters, not by libyaml's byte offset."""
    lines = errors_of("description: ééé\x01\n")
    assert lines == ["web.yaml:1:17: invalid YAML: character U+0001 is not allowed "
                     "(control characters are not allowed)"]
