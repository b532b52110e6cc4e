"""Logging: structlog configured once, events with stable snake_case names.

Every line the daemon writes is one event (``unit_started``, ``child_exited``,
``connection_refused``, ...) with fields such as ``unit``, ``pid``, ``remote``,
``status`` and ``duration``. JSON is the default when stderr is not a terminal
(journald, files, tests), a console renderer when it is.

``configure`` is the one place that touches structlog's global state; the rest
of the code calls ``get_logger()`` and binds its context (``unit=...``) once.

The daemon's own lines go through a :class:`LogWriter`: children inherit fd 2,
so the daemon writes through a *private* open file description of the same
pipe, tty or socket (non-blocking, whatever a child does to its flags), and a
reader that stops reading fills a bounded queue instead of blocking the event
loop. Lines that do not fit are dropped and counted; the count is logged as
``log_lines_dropped`` once the reader catches up.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import select
import socket
import stat
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import FilteringBoundLogger

from supervisor.model import LogFormat

#: The logger type every module passes around (``get_logger()`` and its ``bind``).
Logger = FilteringBoundLogger

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

#: Bytes of log kept while the reader is slow; past it, whole lines are dropped and counted.
QUEUE_LIMIT = 1 << 20
#: How long shutdown waits for a slow reader to take what is queued.
FINAL_FLUSH_SECONDS = 1.0


class LogWriter:
    """Non-blocking, bounded, order-keeping writer of log lines to ``fd`` (stderr).

    A regular file is written through a dup (shared offset; a file never blocks);
    a socket (journald's stream) through ``send(MSG_DONTWAIT)``; anything else
    (pipe, tty, /dev/null) through a fresh open of ``/proc/self/fd/N`` with
    ``O_NONBLOCK``, a description no child shares. Thread-safe: offload threads log too.
    """

    def __init__(self, fd: int = 2, *, limit: int = QUEUE_LIMIT) -> None:
        self._limit = limit
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self._loop: Any = None
        self._armed = False
        self._sock: socket.socket | None = None
        mode = os.fstat(fd).st_mode
        if stat.S_ISSOCK(mode):
            self._sock = socket.socket(fileno=os.dup(fd))
            self.fd = self._sock.fileno()
        elif stat.S_ISREG(mode):
            self.fd = os.dup(fd)
        else:
            try:
                self.fd = os.open(f"/proc/self/fd/{fd}",
                                  os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
            except OSError:  # no /proc: share the description, still never block on it
                self.fd = os.dup(fd)
                os.set_blocking(self.fd, False)
        os.set_inheritable(self.fd, False)

    # ------------------------------------------------------------ writing
    def _write(self, data: bytes | memoryview) -> int:
        if self._sock is not None:
            return self._sock.send(data, socket.MSG_DONTWAIT)
        return os.write(self.fd, data)

    def _push(self, data: bytes) -> bool:
        """Write what the fd takes now, queue the rest; False if nothing more can go out now."""
        try:
            n = self._write(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:  # the reader is gone (EPIPE) or the fd is broken: nothing to wait for
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.dropped += 1
                return True
            n = 0
        if n < len(data):
            self._queue.appendleft(data[n:])
            self._queued += len(data) - n
            return False
        return True

    def emit(self, line: str) -> None:
        data = (line + "\n").encode("utf-8", "backslashreplace")
        with self._lock:
            if not self._queue:
                if self._push(data):
                    return
            elif self._queued + len(data) > self._limit:
                self.dropped += 1
                return
            else:
                self._queue.append(data)
                self._queued += len(data)
            self._arm()

    def _arm(self) -> None:
        if self._armed or self._loop is None:
            return
        self._armed = True
        self._loop.call_soon_threadsafe(self._loop.add_writer, self.fd, self._drain)

    def _drain(self) -> None:
        """Loop callback while the fd is writable: move queued bytes out, report drops once empty."""
        report = 0
        with self._lock:
            while self._queue:
                data = self._queue.popleft()
                self._queued -= len(data)
                if not self._push(data):
                    return
            self._loop.remove_writer(self.fd)
            self._armed = False
            report, self.dropped = self.dropped, 0
        if report:
            get_logger().warning("log_lines_dropped", count=report)

    # ------------------------------------------------------------ lifecycle
    def attach(self, loop: Any) -> None:
        """Drain through ``loop`` from now on (the daemon's loop; before it, lines queue)."""
        with self._lock:
            self._loop = loop
            if self._queue:
                self._arm()

    def close(self, timeout: float = FINAL_FLUSH_SECONDS) -> None:
        """Detach from the loop and give a slow reader ``timeout`` seconds to take the rest."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._loop is not None and self._armed:
                with contextlib.suppress(RuntimeError, ValueError):  # the loop is already closed
                    self._loop.remove_writer(self.fd)
            self._loop, self._armed = None, False
            if self.dropped:
                note = f'{{"event": "log_lines_dropped", "count": {self.dropped}, "level": "warning"}}\n'
                self._queue.append(note.encode())
                self.dropped = 0
            while self._queue:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([], [self.fd], [], left)[1]:
                    break
                data = self._queue.popleft()
                self._queued -= len(data)
                self._push(data)


#: syslog priorities (sd-daemon(3)'s ``<N>`` prefixes) of structlog's method names.
PRIORITIES = {"debug": 7, "info": 6, "msg": 6, "log": 6, "warning": 4, "warn": 4, "error": 3, "err": 3,
              "exception": 3, "critical": 2, "fatal": 2, "failure": 3}


def under_journal(environ: Mapping[str, str], fd: int = 2) -> bool:
    """Whether ``fd`` is the journal's stream: ``JOURNAL_STREAM`` (``DEV:INODE``) names it (systemd.exec(5))."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(fd)
        return (int(dev), int(ino)) == (st.st_dev, st.st_ino)
    except (ValueError, OSError):
        return False


class _SinkLogger:
    """The structlog logger: hands each rendered line to the writer in one piece.

    Under the journal each line starts with its syslog priority (``<6>`` for
    info, ``<4>`` warning, ``<3>`` error, ...), which journald strips and files
    as the entry's PRIORITY, so ``journalctl -p warning`` works; the JSON stays.
    """

    def __init__(self, writer: LogWriter, *, priorities: bool = False) -> None:
        self._writer = writer
        for name, priority in PRIORITIES.items():
            prefix = f"<{priority}>" if priorities else ""
            setattr(self, name, self._method(prefix))

    def _method(self, prefix: str) -> Any:
        emit = self._writer.emit
        return lambda message: emit(prefix + message)


_LEVEL_NAMES = {"warn": "warning", "exception": "error", "msg": "info", "log": "info", "err": "error",
                "fatal": "critical", "failure": "error"}
_encode_any = json.JSONEncoder(default=repr).encode
_quote = json.encoder.encode_basestring_ascii


def _value(value: Any) -> str:
    kind = type(value)
    if kind is str:
        return str(_quote(value))
    if kind is int:
        try:
            return int.__repr__(value)
        except ValueError:  # past sys.get_int_max_str_digits(): a log line must not raise
            return str(_quote(f"<{value.bit_length()}-bit integer>"))
    return str(_encode_any(value))


def _encode(event: Mapping[str, Any]) -> str:
    """``json.dumps(event, default=repr)`` for a flat event, field by field (its encoder is set up per call)."""
    try:
        return "{" + ", ".join([f"{_quote(k)}: {_value(v)}" for k, v in event.items()]) + "}"
    except TypeError:  # a key that is not a string
        return str(_encode_any(event))


class _Clock:
    """``2026-12-05T10:00:00.123456Z`` for now, formatting the seconds only when they change."""

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def __call__(self) -> str:
        now = time.time()
        second = int(now)
        if second != self.second:
            self.second = second
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self.prefix}.{int((now - second) * 1_000_000):06d}Z"


def _json_line(clock: _Clock) -> Any:
    """The JSON format's whole processor chain in one step (level, timestamp, traceback, render).

    The same line as structlog's add_log_level, TimeStamper(iso, utc), format_exc_info and
    JSONRenderer, at a third of the cost: two of these run per connection in accept mode
    with ``log_connections``.
    """
    def render(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        event["level"] = _LEVEL_NAMES.get(method, method)
        event["timestamp"] = clock()
        if "exc_info" in event:
            event = structlog.processors.format_exc_info(logger, method, event)
        return _encode(event)
    return render


# Set by configure when lines are JSON to a LogWriter: (its emit, the clock, the journal prefix of info).
_direct: tuple[Any, _Clock, str] | None = None


class ConnectionLines:
    """The two lines accept mode writes per connection with ``log_connections``, rendered directly.

    ``accepted(remote, pid)`` and ``exited(pid, remote, status, duration)`` write exactly what
    ``logger.info("connection_accepted", remote=..., pid=...)`` and ``logger.info("child_exited",
    pid=..., remote=..., status=..., duration=...)`` would (context, fields, event, level,
    timestamp), as one f-string each instead of structlog's call chain; they are those calls
    where lines are not JSON to the daemon's writer or info is filtered out.
    """

    __slots__ = ("accepted", "exited")

    def __init__(self, logger: Logger) -> None:
        if _direct is None or not logger.is_enabled_for(logging.INFO):
            info = logger.info
            self.accepted: Any = lambda remote, pid: info("connection_accepted", remote=remote, pid=pid)
            self.exited: Any = lambda pid, remote, status, duration: info(
                "child_exited", pid=pid, remote=remote, status=status, duration=duration)
            return
        emit, clock, prefix = _direct
        head = prefix + "{" + "".join([f"{_quote(k)}: {_value(v)}, " for k, v in structlog.get_context(logger).items()])
        quote = _quote

        def accepted(remote: str, pid: int) -> None:
            emit(f'{head}"remote": {quote(remote)}, "pid": {pid}, "event": "connection_accepted", '
                 f'"level": "info", "timestamp": "{clock()}"}}')

        def exited(pid: int, remote: str, status: str, duration: float) -> None:
            emit(f'{head}"pid": {pid}, "remote": {quote(remote)}, "status": {quote(status)}, '
                 f'"duration": {duration!r}, "event": "child_exited", "level": "info", "timestamp": "{clock()}"}}')

        self.accepted = accepted
        self.exited = exited


def configure(fmt: LogFormat | None = None, level: str = "info", stream: TextIO | None = None,
              writer: LogWriter | None = None, priorities: bool = False) -> None:
    """Configure structlog for the process: JSON or console lines on ``stream`` (stderr) or ``writer``."""
    out = stream if stream is not None else sys.stderr
    if fmt is None:
        fmt = LogFormat.CONSOLE if out.isatty() else LogFormat.JSON
    global _direct
    _direct = None
    processors: list[Any]
    if fmt is LogFormat.JSON:
        clock = _Clock()
        processors = [_json_line(clock)]
        if writer is not None:
            _direct = (writer.emit, clock, f"<{PRIORITIES['info']}>" if priorities else "")
    else:
        processors = [structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True),
                      structlog.processors.format_exc_info, structlog.dev.ConsoleRenderer(colors=False)]
    factory: Any
    if writer is not None:
        sink = _SinkLogger(writer, priorities=priorities)
        factory = lambda *_args: sink  # noqa: E731
    else:
        factory = structlog.PrintLoggerFactory(out)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


def get_logger(**context: Any) -> Logger:
    """A bound logger with ``context`` attached to every event."""
    logger: Logger = structlog.get_logger().bind(**context)
    return logger
