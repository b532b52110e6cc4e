"""The control socket: newline-delimited JSON, one request and one reply per line.

Theory of operation
-------------------
The daemon listens on a unix stream socket (``control.socket``, mode
``control.mode``). Each peer is checked with ``SO_PEERCRED`` as it connects:
only root and the daemon's own uid are answered; anybody else gets one error
reply and a log line. A request is one JSON object on one line::

    {"cmd": "status" | "start" | "stop" | "restart" | "reload" | "reexec", "unit": NAME?}

and the reply is ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``; a
failed reload adds ``"errors"`` (every problem, one line each) and ``"reason"``
(``invalid_config`` or ``bind_failed``).
A malformed, oversized (over ``MAX_REQUEST`` bytes) or unknown request gets an
error reply; an oversized one also closes that connection. Nothing a client
sends can raise into the daemon: each connection is its own task, owned by
the server, and every failure is turned into a reply.

Local clients are bounded too: at most ``MAX_CONNECTIONS`` are served at once
(one more is closed as soon as it is accepted, and the refusals are logged as
one summarized ``control_refused`` line per second, so a flood costs neither
fds nor disk), and a connection that has not sent a complete request line
within ``idle_timeout`` seconds is closed, so a held-open connection cannot
keep its slot forever.

This module is the transport and the request grammar only: ``parse_request``
turns a line into a typed ``Request`` (or the error ``Reply``), and the server
hands each request to the ``handle`` coroutine it was given; what a command
does is the daemon's (``Daemon.handle``).

``request`` is the client side, used by the CLI: plain blocking sockets, no
event loop, so ``sockvisor status`` starts fast.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypedDict, cast

from supervisor import fsnodes, sockets
from supervisor.errors import BindError, ControlError
from supervisor.log import Logger
from supervisor.logsummary import LogSummary
from supervisor.status import DaemonStatus, UnitStatus

MAX_REQUEST = 64 * 1024
MAX_CONNECTIONS = 32  # control connections served at once; one more is closed at once
IDLE_TIMEOUT = 10.0  # seconds a connection may take to send one complete request line


class Command(enum.Enum):
    STATUS = "status"
    START = "start"
    STOP = "stop"
    RESTART = "restart"
    RELOAD = "reload"
    REEXEC = "reexec"


COMMANDS = tuple(c.value for c in Command)
#: Commands that act on one unit and so need its name.
UNIT_COMMANDS = frozenset({Command.START, Command.STOP, Command.RESTART})


@dataclass(frozen=True, slots=True)
class Request:
    command: Command
    unit: str | None = None
    # The requesting connection's fd (set by the server, never parsed): a re-exec hands it to the
    # new image, which answers on it.
    peer: int = -1


class Reply(TypedDict, total=False):
    """One reply line. ``ok`` always; the rest by command (see the module docstring and SPEC)."""

    pid: int  # reexec: the daemon's pid (unchanged), its version and re-exec count
    version: str
    reexecs: int

    ok: bool
    error: str
    reason: str
    errors: list[str]
    units: list[UnitStatus]
    unit: UnitStatus
    daemon: DaemonStatus
    added: list[str]
    changed: list[str]
    removed: list[str]
    failed: list[str]


def failure(error: str) -> Reply:
    return Reply(ok=False, error=error)


def parse_request(line: bytes) -> Request | Reply:
    """One request line -> a ``Request``, or the error ``Reply`` for it. Pure; never raises."""
    try:
        req = json.loads(line)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: [[[[...
        return failure("malformed request: not a JSON object")
    if not isinstance(req, dict):
        return failure("malformed request: not a JSON object")
    cmd, unit = req.get("cmd"), req.get("unit")
    try:
        command = Command(cmd)
    except (ValueError, TypeError):
        return failure(f"unknown command {cmd!r} (one of {', '.join(COMMANDS)})")
    if unit is not None and not isinstance(unit, str):
        return failure("unit must be a string")
    if unit is None and command in UNIT_COMMANDS:
        return failure(f"{command.value} needs a unit name")
    return Request(command, unit)


Handler = Callable[[Request], Awaitable[Reply]]


class ControlServer:
    """Serves the control socket at ``path``: one task per connection, owned here and cancelled on close."""

    def __init__(self, path: str, mode: int, log: Logger, handle: Handler, *,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self._handle = handle
        self.idle_timeout = idle_timeout
        self.path = path
        self.mode = mode
        self.log = log.bind(component="control")
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._node: tuple[int, int] | None = None
        self._refusals: LogSummary | None = None

    async def start(self, adopt: tuple[int, tuple[int, int] | None] | None = None) -> None:
        """Bind the control socket (or ``adopt`` the (fd, node) a previous image bound).

        A live daemon already answering on it is an error, a stale node is replaced.

        The node goes through ``fsnodes`` like every unit socket: parents walked
        from ``/`` without following planted links (and made 0755 where
        missing), only a stale socket of ours replaced (a regular file or
        anyone else's node is left alone and is an error), mode set on the
        very node bound, never more open than ``control.mode`` even for a moment.
        """
        self._refusals = LogSummary(self.log, asyncio.get_running_loop())
        if adopt is not None:  # the listening socket a previous image of the daemon bound (re-exec)
            fd, self._node = adopt
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
            self._server = await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_REQUEST)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._node = fsnodes.bind_socket(sock, self.path, mode=self.mode, directory_mode=0o755)
        except fsnodes.PathError as exc:
            sock.close()
            reason = exc.reason
            if "in use by a running process" in reason:
                reason = "another sockvisor is running on this control socket"
            raise BindError("control", self.path, reason) from exc
        try:
            self._server = await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_REQUEST, backlog=1024)
        except OSError as exc:
            sock.close()
            fsnodes.remove_node(self.path, self._node)
            raise BindError("control", self.path, exc.strerror or str(exc)) from exc

    def listening(self) -> tuple[int, tuple[int, int] | None] | None:
        """(fd, node) of the listening socket, for a re-exec to hand over."""
        sockets_ = getattr(self._server, "sockets", None) if self._server is not None else None
        if not sockets_:
            return None
        return int(sockets_[0].fileno()), self._node

    async def close(self) -> None:
        if self._refusals is not None:
            self._refusals.flush()
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await self._server.wait_closed()
            if self._node is not None:
                # Only while the path still holds the node we bound (never a successor's).
                fsnodes.remove_node(self.path, self._node)

    def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tasks) >= MAX_CONNECTIONS:
            # Over the cap: close before reading anything, so a flood holds no fd of ours.
            writer.close()
            if self._refusals is not None:
                self._refusals.emit("control_refused", level="warning", reason="too_many_connections")
            return
        task = asyncio.ensure_future(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            _pid, uid, _gid = sockets.peer_credentials(sock.fileno())
            if uid not in (0, os.getuid()):
                self.log.warning("control_refused", uid=uid)
                await self._reply(writer, failure("permission denied: only root or the daemon's user"))
                return
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), self.idle_timeout)
                except TimeoutError:
                    self.log.info("control_idle_closed", timeout=self.idle_timeout)
                    return
                except (asyncio.LimitOverrunError, ValueError):
                    await self._reply(writer, failure(f"request too large (max {MAX_REQUEST} bytes)"))
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                reply = await self.handle(line, sock.fileno())
                await self._reply(writer, reply)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # nothing a client does may take the daemon down
            self.log.exception("control_error")
        finally:
            writer.close()

    async def _reply(self, writer: asyncio.StreamWriter, reply: Reply) -> None:
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()

    async def handle(self, line: bytes, peer: int = -1) -> Reply:
        """One request line -> one reply; never raises for anything a client sent."""
        req = parse_request(line)
        if not isinstance(req, Request):
            return req
        req = dataclasses.replace(req, peer=peer)
        try:
            return await self._handle(req)
        except Exception as exc:  # a bug behind one command must not take the daemon (or the client) down
            self.log.exception("control_error", command=req.command.value, unit=req.unit)
            return failure(f"internal error: {exc}")


def request(path: str, req: dict[str, str | None], *, timeout: float = 30.0) -> Reply:
    """Send one request to the daemon at ``path`` and return its reply; ControlError if unreachable.

    A daemon that refuses the peer replies at once and closes without reading
    the request, so sending it may fail (EPIPE) or the close may reset the
    connection after the reply arrived; either way the reply already queued
    here is read and returned, so the caller always sees the refusal reason.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    buf = b""
    try:
        try:
            sock.connect(path)
        except OSError as exc:
            raise ControlError(f"cannot reach the daemon at {path}: {exc.strerror or exc} (is it running?)") from exc
        sent_error: OSError | None = None
        try:
            sock.sendall(json.dumps(req).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError) as exc:
            sent_error = exc  # the daemon closed early: its reply (a refusal) may be waiting
        while not buf.endswith(b"\n"):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError as exc:
                sent_error = sent_error or exc
                break
            if not chunk:
                break
            buf += chunk
        if not buf and sent_error is not None:
            raise ControlError(f"control socket {path}: {sent_error.strerror or sent_error}")
    except TimeoutError as exc:
        raise ControlError(f"the daemon at {path} did not answer within {timeout:g}s") from exc
    except OSError as exc:
        raise ControlError(f"control socket {path}: {exc.strerror or exc}") from exc
    finally:
        sock.close()
    try:
        reply = json.loads(buf)
    except ValueError as exc:
        raise ControlError(f"the daemon at {path} sent a malformed reply") from exc
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ControlError(f"the daemon at {path} sent a malformed reply")
    return cast(Reply, reply)
