"""Parsers for the scalar value types of the configuration.

Theory of operation: each function takes a plain Python value as YAML resolved
it (``str``, ``int``, ``float``, ``bool``, ``None``, ...) and returns the typed
value the model wants, or raises ``ValueError`` whose message says what is
wrong and what would be right. They know nothing about files or key paths: the
config layer adds the location. They are pure and total over their input.

Two YAML 1.1 traps are handled on purpose. ``bool`` is a subclass of ``int``
in Python, so every numeric parser refuses booleans explicitly. And an
unquoted ``0660`` is the octal integer 432 while ``660`` is decimal 660: a file
mode given as a number is therefore always refused, with the hint to quote it.

Every value is range-checked here, at parse time, so that what ``check``
accepts the daemon can apply: durations are finite and at most
``MAX_DURATION`` (a year: ``loop.call_at`` and the kernel's timers take it);
positive ones at least a microsecond (``WATCHDOG_USEC`` must not round to 0);
sizes and rlimits at most ``MAX_SIZE``. Messages never render more than
``_SHOWN`` characters of a value, and never a huge number in full.
"""

from __future__ import annotations

import math
import re
import signal
from fractions import Fraction

INFINITY = -1  # rlimit value meaning RLIM_INFINITY in the model
MAX_DURATION = 365 * 86400.0  # seconds
MIN_POSITIVE_DURATION = 1e-6  # one microsecond
MAX_SIZE = 2**63 - 1  # what rlim_t and off_t hold
_SHOWN = 60  # characters of a value shown in a message
_MAX_DIGITS = 40  # digits of a size string: more is too large whatever the unit

_DURATION_UNITS = {
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(us|ms|sec|s|min|m|h|d)?")
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_OCTAL = re.compile(r"(?:0o|0)?([0-7]{1,4})")
_INFINITY_WORDS = ("infinity", "unlimited")


def describe(value: object) -> str:
    """How a value reads in an error message: ``string 'x'``, ``number 5``, ``a list``."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int | float):
        return f"number {show(value)}"
    if isinstance(value, str):
        return f"string {show(value)}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"{type(value).__name__} {show(value)}"


def show(value: object) -> str:
    """``repr(value)`` cut to a readable length; a huge int by its digit count (repr may even refuse it)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 3 * _SHOWN:
        return f"of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def parse_bool(value: object) -> bool:
    """A real YAML boolean (``true``/``false``); a quoted "true" is refused."""
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected true or false, got {describe(value)}")


def parse_int(value: object, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer within ``[minimum, maximum]`` (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {describe(value)}")
    _check_range(value, minimum, maximum)
    return value


def _float(value: int | float) -> float:
    """``float(value)`` where an int too large for a float is infinity, not OverflowError."""
    if isinstance(value, int) and value.bit_length() > 1000:
        return math.inf if value > 0 else -math.inf
    return float(value)


def parse_number(
    value: object, *, minimum: float | None = None, positive: bool = False, maximum: float | None = None
) -> float:
    """A finite int or float, at least ``minimum``, greater than zero if ``positive``, at most ``maximum``."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"expected a number, got {describe(value)}")
    number = _float(value)
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {show(value)}")
    if positive and number <= 0:
        raise ValueError(f"must be greater than 0, got {show(value)}")
    if minimum is not None and number < minimum:
        raise ValueError(f"must be at least {minimum:g}, got {show(value)}")
    if maximum is not None and number > maximum:
        raise ValueError(f"must be at most {maximum:g}, got {show(value)}")
    return number


def _check_range(value: int, minimum: int | None, maximum: int | None) -> None:
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        span = f"{minimum}-{maximum}" if minimum >= 0 else f"{minimum} to {maximum}"
        raise ValueError(f"{show(value)} is out of range ({span})")
    if minimum is not None and value < minimum:
        raise ValueError(f"must be at least {minimum}, got {show(value)}")
    if maximum is not None and value > maximum:
        raise ValueError(f"must be at most {maximum}, got {show(value)}")


def parse_duration(value: object, *, positive: bool = False) -> float:
    """Seconds: a number, or a string such as ``250ms``, ``10s``, ``2m``, ``1h``, ``1m30s``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = _float(value)
        if math.isnan(seconds) or (isinstance(value, float) and math.isinf(value)):
            raise ValueError(f"expected a finite duration, got {show(value)}")
    elif isinstance(value, str):
        seconds = _parse_duration_text(value)
    else:
        raise ValueError(f"expected a duration (seconds, or a string like 250ms, 10s, 2m), got {describe(value)}")
    if seconds < 0:
        raise ValueError(f"duration must not be negative, got {show(value)}")
    if seconds > MAX_DURATION:
        raise ValueError(f"duration {show(value)} is too long: the maximum is {MAX_DURATION:g}s (365 days)")
    if positive and seconds == 0:
        raise ValueError("duration must be greater than 0")
    if positive and seconds < MIN_POSITIVE_DURATION:
        raise ValueError(f"duration {show(value)} is too short: the minimum is 1us")
    return seconds


def _parse_duration_text(text: str) -> float:
    stripped = text.strip()
    total = 0.0
    position = 0
    while position < len(stripped):
        match = _DURATION_PART.match(stripped, position)
        # A unit may only be omitted on a lone number: "1m30" is ambiguous.
        if match is None or (match.group(2) is None and (position > 0 or match.end() < len(stripped))):
            raise ValueError(
                f"invalid duration {show(text)}: expected seconds or a number with a unit (250ms, 10s, 2m, 1h)"
            )
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
        position = match.end()
        while position < len(stripped) and stripped[position] == " ":
            position += 1
    if not stripped:
        raise ValueError("invalid duration '': expected seconds or a number with a unit (250ms, 10s, 2m, 1h)")
    return total


def parse_size(value: object, *, maximum: int = MAX_SIZE) -> int:
    """Bytes: an integer, or a string such as ``64K``, ``4M``, ``1G`` (base 1024), at most ``maximum``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size (bytes, or a string like 64K, 4M), got {describe(value)}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match is None:
            raise ValueError(f"invalid size {show(value)}: expected bytes or a number with a unit (64K, 4M, 1G)")
        if len(match.group(1)) > _MAX_DIGITS:
            raise ValueError(f"size {show(value)} is too large: the maximum is {maximum}")
        # Exact arithmetic: a float would turn a long string into infinity.
        size = int(Fraction(match.group(1)) * _SIZE_FACTORS[match.group(2).upper()])
    else:
        raise ValueError(f"expected a size (bytes, or a string like 64K, 4M), got {describe(value)}")
    if size < 0:
        raise ValueError(f"size must not be negative, got {show(value)}")
    if size > maximum:
        raise ValueError(f"size {show(value)} is too large: the maximum is {maximum}")
    return size


def parse_mode(value: object, *, key: str = "mode", text: str | None = None, maximum: int = 0o7777) -> int:
    """A file mode (or umask) from a quoted octal string such as ``"0660"``.

    Args:
        value: the resolved YAML value.
        key: the key name, used in the "quote it" hint.
        text: the scalar's source text, so the hint can repeat what was written.
        maximum: the largest allowed mode (0o777 for a umask).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        written = text if text and text.isdigit() and len(text) <= 5 else "0660"
        if not written.startswith("0"):
            written = "0" + written
        raise ValueError(f'a file mode must be a quoted octal string; quote it: {key}: "{written}"')
    if not isinstance(value, str):
        raise ValueError(f'expected a quoted octal string like "0660", got {describe(value)}')
    match = _OCTAL.fullmatch(value.strip())
    if match is None:
        raise ValueError(f'invalid file mode {show(value)}: expected an octal string like "0660"')
    mode = int(match.group(1), 8)
    if mode > maximum:
        raise ValueError(f"file mode {show(value)} is out of range (0-{maximum:o})")
    return mode


def parse_signal(value: object) -> int:
    """A signal number from ``SIGTERM``, ``TERM`` or a number."""
    if isinstance(value, bool):
        raise ValueError(f"expected a signal name like SIGTERM, got {describe(value)}")
    if isinstance(value, int):
        if not 1 <= value <= signal.SIGRTMAX:
            raise ValueError(f"signal {show(value)} is out of range (1-{int(signal.SIGRTMAX)})")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a signal name like SIGTERM, got {describe(value)}")
    name = value.strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ValueError(f"unknown signal {show(value)}") from None


def parse_rlimit_value(value: object) -> int:
    """One rlimit value: an integer, a size string, or ``infinity`` (returned as -1)."""
    if isinstance(value, str) and value.strip().lower() in _INFINITY_WORDS:
        return INFINITY
    try:
        return parse_size(value)
    except ValueError as exc:
        if "too large" in str(exc):
            raise
        raise ValueError(f"expected a number, a size like 64K, or infinity, got {describe(value)}") from None


def parse_rlimit(value: object) -> tuple[int, int]:
    """An rlimit as ``(soft, hard)``: one value for both, or a ``{soft, hard}`` mapping."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"soft", "hard"})
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r}; expected soft and hard")
        if "soft" not in value or "hard" not in value:
            raise ValueError("needs both soft and hard")
        soft, hard = parse_rlimit_value(value["soft"]), parse_rlimit_value(value["hard"])
        check_rlimit_order(soft, hard)
        return soft, hard
    single = parse_rlimit_value(value)
    return single, single


def check_rlimit_order(soft: int, hard: int) -> None:
    """Refuse a soft limit above the hard one (-1 is infinity)."""
    if hard != INFINITY and (soft == INFINITY or soft > hard):
        raise ValueError("soft limit is above the hard limit")
