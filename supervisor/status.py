"""The shape of ``status``: what a runtime reports, the control socket sends and the CLI formats.

Plain typed dictionaries (they travel as JSON); the fields are SPEC section 3's
``status --json`` and section 8's refusal reasons.
"""

from __future__ import annotations

from typing import NotRequired, TypedDict


class Connections(TypedDict):
    active: int
    accepted: int
    refused: int
    refused_by_reason: dict[str, int]


class LastExit(TypedDict):
    pid: int
    status: str  # "exit 0", "SIGKILL", ...
    at: float  # wall time


class NotifyCounters(TypedDict):
    dropped: dict[str, int]  # by reason
    paused: int  # times the socket was left unread for the rate


class WorkerStatus(TypedDict):
    slot: int
    pid: int | None
    state: str
    age: float | None
    restarts: int
    role: str  # worker, surge, retiring


class RollStatus(TypedDict):
    state: str
    replaced: int
    total: int
    age: float
    reason: NotRequired[str | None]
    slot: NotRequired[int | None]


class BackendStatus(TypedDict):
    state: str  # the backend process's slot state, or "external" (no exec: someone else runs it)
    pid: int | None
    address: str | None  # the unit's backend (listen entries may name their own)
    reachable: bool  # a connect succeeded since it (re)started


class ColdStarts(TypedDict):
    buckets: list[float]  # upper bounds in seconds, as a Prometheus histogram's "le"
    counts: list[int]  # per bucket (not cumulative), one more than buckets (+Inf)
    sum: float


class ProxyStatus(TypedDict):
    """mode: proxy: the backend and the forwarding counters."""

    backend: BackendStatus
    connections: int  # forwarded now
    waiting: int  # accepted, waiting for the backend
    flows: int  # udp client flows
    bytes: dict[str, int]  # "in": client to backend, "out": backend to client (delivered)
    datagrams: dict[str, int]
    cold_starts: int  # backend starts caused by a client while it was down
    cold_start_seconds: ColdStarts  # first client accepted to first connect that succeeded


class UnitStatus(TypedDict):
    """One unit in ``status`` (the control reply, ``status --json``, and what the CLI formats)."""

    name: str
    mode: str
    state: str
    listen: list[str]
    pids: list[int]
    connections: Connections
    restarts: int
    status: str  # the last STATUS= the unit's process sent
    description: str
    last_exit: LastExit | None
    notify: NotifyCounters
    fd_store: list[str]  # names, in store order
    spawns: int  # processes started
    spawn_failures: int  # spawns that failed before exec
    exits: dict[str, int]  # by outcome: success, failure, signal
    pauses: dict[str, int]  # times accepting paused, by cause: rate, max_connections, resources
    paused: str | None  # the cause accepting is paused for now (accept mode), or None
    started_at: float  # wall time the unit's runtime was made (start or reload)
    workers: NotRequired[list[WorkerStatus]]  # pool mode
    roll: NotRequired[RollStatus]  # pool mode, during and after a rolling restart
    proxy: NotRequired[ProxyStatus]  # proxy mode
    processes: NotRequired[int]  # every process in the unit's cgroups (where cgroups are in use)


class DaemonStatus(TypedDict):
    pid: int
    version: str
    started: float  # wall time this daemon (pid) started
    summary: str
    reloads: dict[str, int]  # by result: success, invalid_config, bind_failed
    last_reload_success: float | None
    reexecs: int


class DaemonCounters(TypedDict):
    """What the daemon itself counts, for metrics and ``status --json``."""

    reloads: dict[str, int]  # by result: success, invalid_config, bind_failed
    last_reload_success: float | None  # wall time of the last good reload (or of the start)
    reexecs: int
