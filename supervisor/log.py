"""Logging: structlog configured once, events with stable snake_case names.

Every line the daemon writes is one event (``unit_started``, ``child_exited``,
``connection_refused``, ...) with fields such as ``unit``, ``pid``, ``remote``,
``status`` and ``duration``. JSON is the default when stderr is not a terminal
(journald, files, tests), a console renderer when it is.

``configure`` is the one place that touches structlog's global state; the rest
of the code calls ``get_logger()`` and binds its context (``unit=...``) once.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from supervisor.model import LogFormat

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(fmt: LogFormat | None = None, level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog for the process: JSON or console lines on ``stream`` (stderr)."""
    out = stream if stream is not None else sys.stderr
    if fmt is None:
        fmt = LogFormat.CONSOLE if out.isatty() else LogFormat.JSON
    renderer: Any
    if fmt is LogFormat.JSON:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )


def get_logger(**context: Any) -> Any:
    """A bound logger with ``context`` attached to every event."""
    return structlog.get_logger().bind(**context)
