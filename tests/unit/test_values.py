"""Scalar value parsers: durations, sizes, modes, booleans, signals, rlimits."""

from __future__ import annotations

import signal

import pytest

from supervisor import values


@pytest.mark.parametrize(
    ("given", "seconds"),
    [
        (10, 10.0),
        (1.5, 1.5),
        (0, 0.0),
        ("250ms", 0.25),
        ("10s", 10.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("1m30s", 90.0),
        ("1m 30s", 90.0),
        ("7", 7.0),
        ("500us", 0.0005),
        ("1d", 86400.0),
    ],
)
def test_duration_accepts_numbers_and_unit_strings(given: object, seconds: float) -> None:
    """A duration is seconds as a number or a string with units, summed when compound."""
    assert values.parse_duration(given) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("soon", "invalid duration 'soon': expected seconds or a number with a unit (250ms, 10s, 2m, 1h)"),
        ("10 parsecs", "invalid duration '10 parsecs': expected seconds or a number with a unit (250ms, 10s, 2m, 1h)"),
        ("1m30", "invalid duration '1m30': expected seconds or a number with a unit (250ms, 10s, 2m, 1h)"),
        ("", "invalid duration '': expected seconds or a number with a unit (250ms, 10s, 2m, 1h)"),
        (-1, "duration must not be negative, got -1"),
        (True, "expected a duration (seconds, or a string like 250ms, 10s, 2m), got boolean true"),
        ([1], "expected a duration (seconds, or a string like 250ms, 10s, 2m), got a list"),
        (float("inf"), "expected a finite duration, got inf"),
    ],
)
def test_duration_refuses_garbage(given: object, message: str) -> None:
    """Malformed, negative, boolean and infinite durations are refused with a precise message."""
    with pytest.raises(ValueError) as raised:
        values.parse_duration(given)
    assert str(raised.value) == message


def test_duration_positive_refuses_zero() -> None:
    """With positive=True a zero duration is refused."""
    with pytest.raises(ValueError, match="greater than 0"):
        values.parse_duration("0s", positive=True)


@pytest.mark.parametrize(
    ("given", "size"),
    [(4096, 4096), ("64K", 65536), ("4M", 4 << 20), ("1G", 1 << 30), ("64k", 65536), ("2MB", 2 << 20), ("512", 512)],
)
def test_size_is_base_1024(given: object, size: int) -> None:
    """Sizes are bytes or K/M/G suffixed strings in base 1024."""
    assert values.parse_size(given) == size


@pytest.mark.parametrize("given", ["64Q", "lots", True, None, -5])
def test_size_refuses_garbage(given: object) -> None:
    """Unknown units, non-numbers, booleans and negative sizes are refused."""
    with pytest.raises(ValueError):
        values.parse_size(given)


@pytest.mark.parametrize(("given", "mode"), [("0660", 0o660), ("660", 0o660), ("0o600", 0o600), ("1777", 0o1777)])
def test_mode_reads_quoted_octal(given: str, mode: int) -> None:
    """A quoted mode string is read as octal, with or without the leading 0."""
    assert values.parse_mode(given) == mode


@pytest.mark.parametrize(("given", "text"), [(0o660, "0660"), (660, "660"), (432, None)])
def test_mode_refuses_unquoted_numbers_with_hint(given: int, text: str | None) -> None:
    """YAML's octal 0660 (432) and decimal 660 are both refused with the hint to quote."""
    with pytest.raises(ValueError) as raised:
        values.parse_mode(given, text=text)
    assert str(raised.value) == 'a file mode must be a quoted octal string; quote it: mode: "0660"'


@pytest.mark.parametrize("given", ["0999", "rw-r--r--", "77777", True])
def test_mode_refuses_non_octal(given: object) -> None:
    """Strings that are not octal, too large, or booleans are not modes."""
    with pytest.raises(ValueError):
        values.parse_mode(given)


def test_umask_maximum_is_enforced() -> None:
    """A maximum (0o777 for umask) bounds the mode."""
    with pytest.raises(ValueError, match="out of range"):
        values.parse_mode("1777", key="umask", maximum=0o777)


@pytest.mark.parametrize(("given", "expected"), [(True, True), (False, False)])
def test_bool_accepts_real_booleans(given: bool, expected: bool) -> None:
    """Real YAML booleans pass through."""
    assert values.parse_bool(given) is expected


@pytest.mark.parametrize("given", ["true", "yes", 1, 0, None])
def test_bool_refuses_lookalikes(given: object) -> None:
    """Quoted strings and numbers are not booleans."""
    with pytest.raises(ValueError, match="expected true or false"):
        values.parse_bool(given)


@pytest.mark.parametrize(
    ("given", "number"),
    [("SIGTERM", signal.SIGTERM), ("TERM", signal.SIGTERM), ("sigint", signal.SIGINT), ("HUP", signal.SIGHUP), (9, 9)],
)
def test_signal_names_and_numbers(given: object, number: int) -> None:
    """Signals are SIGNAME, NAME (any case) or a number."""
    assert values.parse_signal(given) == number


@pytest.mark.parametrize(
    ("given", "message"),
    [("SIGFOO", "unknown signal 'SIGFOO'"), (0, "signal 0 is out of range"), (True, "expected a signal name")],
)
def test_signal_refuses_unknown(given: object, message: str) -> None:
    """Unknown names, signal 0 and booleans are refused."""
    with pytest.raises(ValueError, match=message):
        values.parse_signal(given)


@pytest.mark.parametrize(
    ("given", "pair"),
    [
        (1024, (1024, 1024)),
        ("64K", (65536, 65536)),
        ("infinity", (-1, -1)),
        ({"soft": 1024, "hard": "infinity"}, (1024, -1)),
        ({"soft": "1K", "hard": 2048}, (1024, 2048)),
    ],
)
def test_rlimit_single_or_pair(given: object, pair: tuple[int, int]) -> None:
    """An rlimit is one value for both limits or a {soft, hard} mapping; infinity is -1."""
    assert values.parse_rlimit(given) == pair


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"soft": 10, "hard": 5}, "soft limit is above the hard limit"),
        ({"soft": "infinity", "hard": 5}, "soft limit is above the hard limit"),
        ({"soft": 10}, "needs both soft and hard"),
        ({"soft": 1, "hard": 2, "max": 3}, "unknown key 'max'"),
        ("lots", "expected a number, a size like 64K, or infinity"),
    ],
)
def test_rlimit_refuses_inconsistent(given: object, message: str) -> None:
    """A soft limit above the hard one, missing halves, extra keys and garbage are refused."""
    with pytest.raises(ValueError, match=message):
        values.parse_rlimit(given)


@pytest.mark.parametrize(
    ("minimum", "maximum", "given", "message"),
    [
        (1, 65535, 70000, "70000 is out of range (1-65535)"),
        (-20, 19, 30, "30 is out of range (-20 to 19)"),
        (1, None, 0, "must be at least 1, got 0"),
        (None, None, True, "expected an integer, got boolean true"),
        (None, None, "5", "expected an integer, got string '5'"),
    ],
)
def test_int_ranges(minimum: int | None, maximum: int | None, given: object, message: str) -> None:
    """Integers are checked against their range and booleans are not integers."""
    with pytest.raises(ValueError) as raised:
        values.parse_int(given, minimum=minimum, maximum=maximum)
    assert str(raised.value) == message
