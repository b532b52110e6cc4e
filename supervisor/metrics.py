"""Prometheus metrics: ``GET /metrics`` on the daemon's own loop, read at scrape time.

Theory of operation
-------------------
Nothing is counted for the metrics: the runtimes already keep their counters
for ``status`` (accepted, refused by reason, spawns, exits by outcome, pauses
by cause, ...), and a custom collector turns one status snapshot into metric
families when Prometheus scrapes. The accept path pays nothing.
``prometheus_client`` provides the families and the text exposition format
(and the process collector's ``process_*``); the HTTP side is a minimal
HTTP/1.x responder on an asyncio server, so no thread is started.

Naming follows Prometheus' conventions: the ``sockvisor_`` prefix, base units
(seconds), ``_total`` on counters, the label ``unit`` and never a pid.
Label values that can occur are all emitted (zero where nothing happened yet),
so ``rate()`` and alerts work from the first scrape.

The endpoint answers ``GET``/``HEAD /metrics`` (a query string is ignored),
404 to any other path and 405 to any other method; a request head over
``MAX_HEAD`` bytes or slower than ``TIMEOUT`` seconds is closed; at most
``MAX_CONNECTIONS`` are served at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from supervisor import sockets
from supervisor.lifecycle import SlotState
from supervisor.log import Logger
from supervisor.status import DaemonCounters, UnitStatus

VERSION = "0.1.0"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_HEAD = 8192
TIMEOUT = 5.0
MAX_CONNECTIONS = 16

STATES = tuple(s.value for s in SlotState)  # listening, starting, running, stopping, backoff, stopped, failed
REFUSAL_REASONS = ("deny", "per_source", "access_times", "spawn_failed", "backend_unavailable", "stopping")
EXIT_OUTCOMES = ("success", "failure", "signal")
PAUSE_CAUSES = ("rate", "max_connections", "resources")
RELOAD_RESULTS = ("success", "invalid_config", "bind_failed")

Snapshot = Callable[[], tuple[list[UnitStatus], DaemonCounters]]


class SockvisorCollector(Collector):
    """Turns one snapshot of the daemon's status into metric families, at scrape time."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        units, daemon = self._snapshot()
        yield InfoMetricFamily("sockvisor_build", "sockvisor's version", value={"version": VERSION})

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["unit", *labels])

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=["unit", *labels])

        state = gauge("sockvisor_unit_state", "1 for the unit's current state", ("state",))
        started = gauge("sockvisor_unit_start_time_seconds", "When the unit's runtime started (Unix time)")
        accepted = counter("sockvisor_connections_accepted", "Connections accepted and handed to a child")
        active = gauge("sockvisor_connections_active", "Connections being served now")
        refused = counter("sockvisor_connections_refused", "Connections refused, by reason", ("reason",))
        children = gauge("sockvisor_children", "Child processes running now")
        spawns = counter("sockvisor_spawns", "Processes started")
        spawn_failures = counter("sockvisor_spawn_failures", "Spawns that failed before the program ran")
        exits = counter("sockvisor_exits", "Child exits, by outcome", ("outcome",))
        restarts = counter("sockvisor_restarts", "Restarts after a failure")
        paused = gauge("sockvisor_accepting_paused", "1 while accepting is paused, by cause", ("cause",))
        pauses = counter("sockvisor_accepting_pauses", "Times accepting paused, by cause", ("cause",))
        fd_store = gauge("sockvisor_fd_store_fds", "fds held in the unit's fd store")
        dropped = counter("sockvisor_notify_dropped", "Notify messages dropped, by reason", ("reason",))
        proxy_bytes = counter("sockvisor_proxy_bytes", "Bytes forwarded by a proxy unit, by direction (in: from "
                              "clients to the backend)", ("direction",))
        proxy_datagrams = counter("sockvisor_proxy_datagrams", "Datagrams forwarded by a proxy unit, by direction",
                                  ("direction",))
        backend_starts = counter("sockvisor_backend_starts", "Backend starts caused by a client while it was down")
        backend_up = gauge("sockvisor_backend_up", "1 while the proxy's backend process runs (or is external)")
        cold = HistogramMetricFamily("sockvisor_backend_cold_start_seconds",
                                     "First waiting client accepted to first connect to the backend that succeeded",
                                     labels=["unit"])
        for u in units:
            name = u["name"]
            for s in STATES:
                state.add_metric([name, s], 1.0 if u["state"] == s else 0.0)
            started.add_metric([name], u["started_at"])
            conns = u["connections"]
            accepted.add_metric([name], conns["accepted"])
            active.add_metric([name], conns["active"])
            by_reason = conns["refused_by_reason"]
            for reason in (*REFUSAL_REASONS, *sorted(set(by_reason) - set(REFUSAL_REASONS))):
                refused.add_metric([name, reason], by_reason.get(reason, 0))
            children.add_metric([name], len(u["pids"]))
            spawns.add_metric([name], u["spawns"])
            spawn_failures.add_metric([name], u["spawn_failures"])
            for outcome in EXIT_OUTCOMES:
                exits.add_metric([name, outcome], u["exits"].get(outcome, 0))
            restarts.add_metric([name], u["restarts"])
            for cause in PAUSE_CAUSES:
                paused.add_metric([name, cause], 1.0 if u["paused"] == cause else 0.0)
                pauses.add_metric([name, cause], u["pauses"].get(cause, 0))
            fd_store.add_metric([name], len(u["fd_store"]))
            for reason, count in sorted(u["notify"]["dropped"].items()):
                dropped.add_metric([name, reason], count)
            proxy = u.get("proxy")
            if proxy is not None:
                for direction in ("in", "out"):
                    proxy_bytes.add_metric([name, direction], proxy["bytes"][direction])
                    proxy_datagrams.add_metric([name, direction], proxy["datagrams"][direction])
                backend_starts.add_metric([name], proxy["cold_starts"])
                backend_up.add_metric([name], 1.0 if proxy["backend"]["state"] in ("running", "external") else 0.0)
                h = proxy["cold_start_seconds"]
                cumulative, buckets = 0, []
                for bound, count in zip([*map(str, h["buckets"]), "+Inf"], h["counts"], strict=True):
                    cumulative += count
                    buckets.append((bound, cumulative))
                cold.add_metric([name], buckets, h["sum"])
        yield from (state, started, accepted, active, refused, children, spawns, spawn_failures, exits, restarts,
                    paused, pauses, fd_store, dropped, proxy_bytes, proxy_datagrams, backend_starts, backend_up, cold)
        reloads = CounterMetricFamily("sockvisor_reloads", "Configuration reloads, by result", labels=["result"])
        for result in RELOAD_RESULTS:
            reloads.add_metric([result], daemon["reloads"].get(result, 0))
        yield reloads
        last = daemon["last_reload_success"]
        if last is not None:
            yield GaugeMetricFamily("sockvisor_last_reload_success_timestamp_seconds",
                                    "When the configuration was last loaded successfully (Unix time)", value=last)
        yield CounterMetricFamily("sockvisor_reexecs", "Same-pid re-executions of the daemon", value=daemon["reexecs"])


def registry_for(snapshot: Snapshot) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SockvisorCollector(snapshot))
    ProcessCollector(registry=registry)
    return registry


class MetricsServer:
    """``GET /metrics`` on ``bound`` (a listening socket of ``sockets.bind``), served on the running loop."""

    def __init__(self, bound: sockets.Bound, registry: CollectorRegistry, log: Logger) -> None:
        self.bound = bound
        self._registry = registry
        self._log = log.bind(component="metrics")
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        assert self.bound.sock is not None
        self.bound.sock.setblocking(False)
        self._server = await asyncio.start_server(self._client, sock=self.bound.sock, limit=MAX_HEAD)
        self._log.info("metrics_listening", listen=self.bound.listen.display)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        self.bound.close(remove=True)

    def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tasks) >= MAX_CONNECTIONS:
            writer.close()
            return
        task = asyncio.ensure_future(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            status, body = self.answer(head)
            writer.write(b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: "
                         + (CONTENT_TYPE.encode() if status.startswith("200") else b"text/plain")
                         + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                         + (b"" if head.startswith(b"HEAD ") else body))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass  # a slow, oversized or vanished client: closed, nothing else
        except asyncio.CancelledError:
            pass
        except Exception:  # nothing a scraper sends may take the daemon down
            self._log.exception("metrics_error")
        finally:
            writer.close()

    def answer(self, head: bytes) -> tuple[str, bytes]:
        """The status line and body for one request head; pure apart from the scrape itself."""
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return "400 Bad Request", b"bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"only GET\n"
        if target != b"/metrics":
            return "404 Not Found", b"not found: try /metrics\n"
        return "200 OK", generate_latest(self._registry)
