"""Every error sockvisor raises on purpose.

Only the CLI turns these into messages and exit codes (``ConfigError`` and
``UsageError`` exit 2, everything else 1). Config errors carry their location so
that a message always reads ``file:line:column: key.path: what is wrong``.
"""

from __future__ import annotations

from dataclasses import dataclass

MESSAGE_MAX = 300  # characters of a problem's message (and of its key path) that are printed


@dataclass(frozen=True, slots=True)
class Location:
    """Where something was written: 1-based line and column in a file."""

    file: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        if self.line <= 0:
            return self.file
        return f"{self.file}:{self.line}:{self.column}"


def _one_line(text: str) -> str:
    """``text`` with every control character (newline, tab, NUL ...) shown escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass(frozen=True, slots=True)
class Problem:
    """One configuration problem: where, which key, what is wrong."""

    location: Location | None
    path: str
    message: str

    def __str__(self) -> str:
        head = f"{self.location}: " if self.location is not None else ""
        path = _one_line(self.path)
        if len(path) > MESSAGE_MAX:
            path = path[: MESSAGE_MAX - 3] + "..."
        key = f"{path}: " if path else ""
        # One line, of bounded length, whatever value a message quoted (an alias
        # bomb, a 10,000-character address, a key with a newline in it): the
        # message is for a human.
        message = _one_line(self.message)
        if len(message) > MESSAGE_MAX:
            message = message[: MESSAGE_MAX - 3] + "..."
        return f"{head}{key}{message}"


class SockvisorError(Exception):
    """Base of every error sockvisor raises deliberately."""


class UsageError(SockvisorError):
    """The command line was wrong (exit 2)."""


class ConfigError(SockvisorError):
    """The configuration is invalid; holds every problem found in one pass (exit 2)."""

    def __init__(self, problems: list[Problem] | tuple[Problem, ...]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class BindError(SockvisorError):
    """A listen entry could not be bound; names the unit, the address and, when known, where it was written (exit 1)."""

    def __init__(self, unit: str, address: str, reason: str, location: Location | None = None) -> None:
        self.unit = unit
        self.address = address
        self.reason = reason
        self.location = location
        # Located like a config problem when the listen entry came from a file, so an
        # administrator goes straight to the line that names the address.
        where = f"{location}: " if location is not None else ""
        super().__init__(f"{where}unit {unit}: cannot bind {address}: {reason}")

    def at(self, location: Location) -> BindError:
        """The same error, located at the listen entry (kept if already located)."""
        if self.location is not None:
            return self
        return BindError(self.unit, self.address, self.reason, location)


class FdBudgetError(SockvisorError):
    """The configuration needs more fds than ``RLIMIT_NOFILE`` allows (exit 1)."""


class SpawnError(SockvisorError):
    """A child could not be started (exec failed, bad user, ...)."""

    def __init__(self, stage: str, errno: int, strerror: str) -> None:
        self.stage = stage
        self.errno = errno
        super().__init__(f"{stage}: {strerror}")


class ControlError(SockvisorError):
    """The control socket could not be reached or refused a request (exit 1)."""
