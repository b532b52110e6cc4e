"""Reload: re-read the configuration and apply it as a diff, never dropping a listener.

Theory of operation
-------------------
1. Load and validate the whole configuration. Any problem: log every error,
   change nothing, raise ``ConfigError`` (the control reply carries the errors).
2. Plan (pure, ``plan``): for every new unit, which of its listen entries are
   *kept* (an old entry of the same unit, or of a unit with the same name, is
   equal: its fd is reused, never closed, never re-bound), *retuned* (same kind
   and address, options differ: applied in place where the kernel allows),
   or *new* (bound). Old entries not claimed are closed.
3. Bind every new entry before touching anything running. A bind failure
   closes what this reload bound and raises ``BindError``: the old config keeps
   running, untouched.
4. Commit: unchanged units are left alone; changed units get their new
   settings (the next spawn uses them) and socket set; new units start;
   removed units *retire*: they stop polling, their children are stopped
   (service, pool) or allowed to finish their connection (accept), and their
   sockets are closed once the last child is gone.

Because kept listeners are never closed and new ones are bound before old ones
go, a client of an unchanged unit cannot see a refused connection during a
reload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from supervisor import config as configuration
from supervisor import sockets
from supervisor.errors import BindError, ConfigError
from supervisor.model import Listen, Unit

if TYPE_CHECKING:
    from supervisor.daemon import Daemon
    from supervisor.units import UnitRuntime

# Options that can change on a bound socket without re-binding it.
RETUNABLE = frozenset({
    "name", "backlog", "receive_buffer", "send_buffer", "nodelay", "keepalive", "keepalive_time",
    "keepalive_interval", "keepalive_probes", "defer_accept", "mark", "ip_tos", "ip_ttl", "priority",
    "broadcast", "pass_credentials", "mode", "user", "group", "remove_on_stop", "symlinks", "directory_mode",
})


def retunable(old: Listen, new: Listen) -> bool:
    """Same kind and address, and every differing option can be set on the bound socket."""
    if old.kind is not new.kind or old.address != new.address:
        return False
    changed = {f for f in Listen.__dataclass_fields__ if getattr(old, f) != getattr(new, f)} - {"location"}
    return changed <= RETUNABLE


@dataclass
class UnitPlan:
    unit: Unit
    old: Unit | None
    # per new listen entry: index of the old bound to reuse (kept or retuned), or None to bind
    reuse: list[int | None]


def plan(old_units: dict[str, Unit], new_units: tuple[Unit, ...]) -> tuple[list[UnitPlan], list[str]]:
    """Pure diff: a plan per new unit, and the names of units to retire."""
    plans: list[UnitPlan] = []
    for unit in new_units:
        old = old_units.get(unit.name)
        reuse: list[int | None] = []
        if old is not None and old.enabled and unit.enabled:
            claimed: set[int] = set()
            for listen in unit.listen:
                pick = next((i for i, o in enumerate(old.listen) if i not in claimed and o == listen), None)
                if pick is None:
                    pick = next((i for i, o in enumerate(old.listen)
                                 if i not in claimed and retunable(o, listen)), None)
                if pick is not None:
                    claimed.add(pick)
                reuse.append(pick)
        else:
            reuse = [None] * len(unit.listen)
        plans.append(UnitPlan(unit, old, reuse))
    names = {u.name for u in new_units}
    retire = [name for name in old_units if name not in names]
    return plans, retire


def apply(daemon: Daemon) -> dict[str, Any]:
    """Reload ``daemon``'s configuration; returns a summary. Raises ConfigError/BindError, changing nothing."""
    log = daemon.log
    try:
        new = configuration.load_config(daemon.config_path, environ=daemon.environ)
    except ConfigError as exc:
        log.error("reload_failed", errors=[str(p) for p in exc.problems])
        raise
    old_units = {name: rt.unit for name, rt in daemon.units.items()}
    plans, retire = plan(old_units, new.units)

    # Bind everything new first; roll back on any failure.
    fresh: dict[str, list[sockets.Bound | None]] = {}
    try:
        for p in plans:
            if not p.unit.enabled:
                fresh[p.unit.name] = []
                continue
            if p.old is not None and p.old == p.unit:
                continue
            fresh[p.unit.name] = [
                sockets.bind(listen, unit=p.unit.name) if reuse is None else None
                for listen, reuse in zip(p.unit.listen, p.reuse, strict=True)
            ]
    except BindError as exc:
        for bounds in fresh.values():
            for b in bounds:
                if b is not None:
                    b.close(remove=True)
        log.error("reload_failed", errors=[str(exc)])
        raise

    changed: list[str] = []
    added: list[str] = []
    for p in plans:
        name = p.unit.name
        runtime = daemon.units.get(name)
        if runtime is not None and p.old == p.unit:
            continue
        new_bound: list[sockets.Bound] = []
        reused: set[int] = set()
        for listen, reuse, made in zip(p.unit.listen, p.reuse, fresh.get(name, []), strict=False):
            if made is not None:
                new_bound.append(made)
                continue
            assert runtime is not None and reuse is not None
            b = runtime.bound[reuse]
            if b.listen != listen:
                sockets.retune(b, listen)
            reused.add(reuse)
            new_bound.append(b)
        if runtime is None:
            daemon.add_unit(p.unit, new_bound).activate()
            added.append(name)
            continue
        leftovers = [b for i, b in enumerate(runtime.bound) if i not in reused]
        if runtime.unit.mode is p.unit.mode:
            _update(daemon, runtime, p.unit, new_bound)
        else:
            daemon.units.pop(name)
            runtime.bound = []
            _retire(daemon, runtime)
            daemon.add_unit(p.unit, new_bound).activate()
        for b in leftovers:
            b.close(remove=True)
        changed.append(name)
    for name in retire:
        _retire(daemon, daemon.units.pop(name))
    daemon.config = new
    summary = {"added": added, "changed": changed, "removed": retire}
    log.info("reloaded", **summary)
    return summary


def _update(daemon: Daemon, runtime: UnitRuntime, unit: Unit, bound: list[sockets.Bound]) -> None:
    """Give a running unit its new settings; live children keep theirs, the next spawn uses the new ones."""
    was_polling = runtime.polling
    runtime.poll(False)
    runtime.bound = bound
    runtime.unit = unit
    runtime.set_blocking()
    runtime.reconfigured()
    if unit.enabled and not runtime.stopped_by_operator:
        if was_polling or not runtime.pids():
            runtime.activate()
    elif not unit.enabled:
        runtime.operator_stop()


def _retire(daemon: Daemon, runtime: UnitRuntime) -> None:
    """Stop a removed unit; its sockets are closed when its last child is gone."""
    runtime.retire()
    daemon.retiring.append(runtime)
    daemon.sweep_retired()
