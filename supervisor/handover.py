"""What one daemon image hands to the next across a same-pid ``execve`` (``sockvisor reexec``).

Theory of operation
-------------------
``execve`` keeps the pid, the children (they stay ours to reap), the signal
mask and every fd without ``FD_CLOEXEC``; it loses everything else. The old
image writes a ``State`` as JSON into a memfd, clears ``FD_CLOEXEC`` on exactly
the fds the state names (listeners, notify sockets, fd stores, the control
socket, the requester's connection) and on the memfd, and names the memfd in
``SOCKVISOR_HANDOVER_FD``. The new image reads it before it binds anything and
hands each unit runtime its part (``UnitHandover``) through ``Host.handover``.

The format is versioned and tolerant: unknown fields are ignored, missing ones
take their defaults, so an older or newer image reads what it understands. A
state that cannot be read at all (``HandoverError``) makes the new image start
fresh, adopting every inherited listening socket by address (as ``LISTEN_FDS``)
and stopping the old children it cannot place (SPEC 12).

Times: slot deadlines and start times are the loop's monotonic clock
(``CLOCK_MONOTONIC``, the same in both images); wall times are wall times.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from supervisor.errors import SockvisorError
from supervisor.lifecycle import After, Exit, Slot, SlotState

ENV = "SOCKVISOR_HANDOVER_FD"
FORMAT = "sockvisor-handover"
VERSION = 1
MAX_STATE = 64 * 1024 * 1024  # bytes read from the memfd at most


class HandoverError(SockvisorError):
    """The state from the previous image cannot be read."""


class Conn(NamedTuple):
    """An accept-mode child and its connection, as the new image's policy and log need them."""

    pid: int
    remote: str  # the connection's log text (host:port, [v6]:port, pid=N,uid=N)
    host: str | None  # the peer as the policy counted it (None: not counted per source)
    uid: int | None
    started: float  # when it was accepted, on the loop's monotonic clock (see Times above)


@dataclass(slots=True)
class UnitHandover:
    """One unit's part: its fds by listen entry, notify socket, fd store, counters and processes."""

    name: str
    mode: str
    life: str = "enabled"
    listen: dict[str, int] = field(default_factory=dict)  # listen display -> fd
    nodes: dict[str, tuple[int, int]] = field(default_factory=dict)  # listen display -> its node's (dev, ino)
    extras: dict[str, list[int]] = field(default_factory=dict)  # pool: listen display -> per-slot fds 1..
    notify: tuple[str, int] | None = None  # (address, fd)
    fd_store: list[tuple[str, int]] = field(default_factory=list)
    counters: dict[str, Any] = field(default_factory=dict)
    slots: list[Slot] = field(default_factory=list)
    strays: list[int] = field(default_factory=list)  # children without a slot (surges, an older image's accept mode)
    conns: list[Conn] = field(default_factory=list)  # accept mode: each connection's child

    def fds(self) -> list[int]:
        out = list(self.listen.values())
        out += [fd for fds in self.extras.values() for fd in fds]
        out += [fd for _, fd in self.fd_store]
        if self.notify is not None:
            out.append(self.notify[1])
        return out


@dataclass(slots=True)
class State:
    """Everything handed over: the daemon's own fds and counters, and every unit's part."""

    units: dict[str, UnitHandover] = field(default_factory=dict)
    control: tuple[int, tuple[int, int] | None] | None = None  # (listening fd, node (dev, ino))
    requester: int | None = None  # the control connection that asked; the new image answers it
    started_at: float = 0.0
    counters: dict[str, Any] = field(default_factory=dict)
    children: list[int] = field(default_factory=list)  # every child pid the old image knew

    def fds(self) -> list[int]:
        out = [fd for unit in self.units.values() for fd in unit.fds()]
        if self.control is not None:
            out.append(self.control[0])
        if self.requester is not None:
            out.append(self.requester)
        return out


# ---------------------------------------------------------------- slots


def slot_to_json(slot: Slot) -> dict[str, Any]:
    return {
        "state": slot.state.value, "pid": slot.pid, "started_at": slot.started_at, "ready_at": slot.ready_at,
        "deadline": slot.deadline, "after": slot.after.value, "failures": slot.failures,
        "restarts": slot.restarts, "start_times": list(slot.start_times),
        "last_exit": None if slot.last_exit is None else [slot.last_exit.code, slot.last_exit.signal],
        "stop_signal_sent": slot.stop_signal_sent,
    }  # fmt: skip


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _pid(value: Any) -> int | None:
    """A pid, or None: Linux pids are below 2**22 (pid_max); anything past a C int is no pid."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31 else None


def _int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def slot_from_json(data: Any) -> Slot:
    """A slot back from ``slot_to_json``; unknown or malformed fields take the defaults."""
    if not isinstance(data, dict):
        return Slot()
    try:
        state = SlotState(data.get("state"))
    except ValueError:
        state = SlotState.IDLE
    try:
        after = After(data.get("after"))
    except ValueError:
        after = After.STOP
    pid = data.get("pid")
    last = data.get("last_exit")
    last_exit = None
    if isinstance(last, list) and len(last) == 2:
        last_exit = Exit(code=last[0] if isinstance(last[0], int) else None,
                         signal=last[1] if isinstance(last[1], int) else None)
    times = data.get("start_times")
    return Slot(
        state=state,
        pid=_pid(pid),
        started_at=_number(data.get("started_at")),
        ready_at=_number(data.get("ready_at")),
        deadline=_number(data.get("deadline")),
        after=after,
        failures=_int(data.get("failures")),
        restarts=_int(data.get("restarts")),
        start_times=tuple(t for t in (_number(x) for x in times) if t is not None) if isinstance(times, list) else (),
        last_exit=last_exit,
        stop_signal_sent=data.get("stop_signal_sent") is True,
    )


# ---------------------------------------------------------------- the document


def to_json(state: State) -> bytes:
    units = []
    for u in state.units.values():
        units.append({
            "name": u.name, "mode": u.mode, "life": u.life, "listen": u.listen, "nodes": u.nodes, "extras": u.extras,
            "notify": list(u.notify) if u.notify else None, "fd_store": [list(e) for e in u.fd_store],
            "counters": u.counters, "slots": [slot_to_json(s) for s in u.slots], "strays": u.strays,
            "conns": [list(c) for c in u.conns],
        })  # fmt: skip
    doc = {
        "format": FORMAT, "version": VERSION, "started_at": state.started_at, "counters": state.counters,
        "control": None if state.control is None else [state.control[0], state.control[1]],
        "requester": state.requester, "children": state.children, "units": units,
    }  # fmt: skip
    return json.dumps(doc).encode()


def _dict(value: Any) -> dict[str, Any]:
    return {k: v for k, v in value.items() if isinstance(k, str)} if isinstance(value, dict) else {}


def _fd(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31 else None


def _conn(value: Any) -> Conn | None:
    if not isinstance(value, list) or len(value) != 5:
        return None
    pid, remote, host, uid, started = value
    if _pid(pid) is None or not isinstance(remote, str):
        return None
    if host is not None and not isinstance(host, str):
        return None
    if uid is not None and (not isinstance(uid, int) or isinstance(uid, bool) or not 0 <= uid < 2**32):
        return None
    started = _number(started)
    return Conn(pid, remote, host, uid, started if started is not None else time.monotonic())


def from_json(raw: bytes) -> State:
    """Parse a handover document. Raises HandoverError when it is not one (unknown fields are fine)."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise HandoverError(f"the handover state is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise HandoverError("the handover state is not a sockvisor handover document")
    version = doc.get("version")
    if not isinstance(version, int) or version < 1:
        raise HandoverError(f"unknown handover version {version!r}")
    state = State(started_at=_number(doc.get("started_at")) or 0.0,
                  counters=_dict(doc.get("counters")),
                  requester=_fd(doc.get("requester")),
                  children=[p for p in _list(doc.get("children")) if _pid(p) is not None])
    control = doc.get("control")
    if isinstance(control, list) and len(control) == 2 and _fd(control[0]) is not None:
        node = control[1]
        state.control = (control[0], (node[0], node[1]) if isinstance(node, list) and len(node) == 2 else None)
    for entry in _list(doc.get("units")):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            continue
        u = UnitHandover(name=entry["name"], mode=str(entry.get("mode", "")), life=str(entry.get("life", "enabled")))
        listen = entry.get("listen")
        if isinstance(listen, dict):
            u.listen = {k: v for k, v in listen.items() if isinstance(k, str) and _fd(v) is not None}
        nodes = entry.get("nodes")
        if isinstance(nodes, dict):
            u.nodes = {k: (v[0], v[1]) for k, v in nodes.items()
                       if isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v)}
        extras = entry.get("extras")
        if isinstance(extras, dict):
            u.extras = {k: [fd for fd in v if _fd(fd) is not None] for k, v in extras.items()
                        if isinstance(k, str) and isinstance(v, list)}
        notify = entry.get("notify")
        if isinstance(notify, list) and len(notify) == 2 and isinstance(notify[0], str) and _fd(notify[1]) is not None:
            u.notify = (notify[0], notify[1])
        u.fd_store = [(e[0], e[1]) for e in _list(entry.get("fd_store"))
                      if isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and _fd(e[1]) is not None]
        u.counters = _dict(entry.get("counters"))
        u.slots = [slot_from_json(s) for s in _list(entry.get("slots"))]
        u.strays = [p for p in _list(entry.get("strays")) if _pid(p) is not None]
        u.conns = [c for c in (_conn(e) for e in _list(entry.get("conns"))) if c is not None]
        state.units[u.name] = u
    return state


# ---------------------------------------------------------------- the memfd


def write_memfd(state: State) -> int:
    """The state in a sealed-size memfd, positioned at 0, inheritable; the caller closes it."""
    fd = os.memfd_create("sockvisor-handover", 0)
    try:
        data = to_json(state)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
        os.set_inheritable(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def take(environ: dict[str, str]) -> State | None:
    """The state the previous image left (and forget the variable), None on a fresh start.

    Raises:
        HandoverError: the variable is set but the state cannot be read.
    """
    value = environ.pop(ENV, None)
    os.environ.pop(ENV, None)
    if value is None:
        return None
    if not value.isdigit() or len(value) > 9:
        raise HandoverError(f"{ENV}={value[:20]!r} is not an fd number")
    fd = int(value)
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_STATE:
                raise HandoverError(f"the handover state is over {MAX_STATE} bytes")
            chunks.append(chunk)
    except OSError as exc:
        raise HandoverError(f"cannot read the handover state from fd {fd}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return from_json(b"".join(chunks))
