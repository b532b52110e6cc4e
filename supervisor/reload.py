"""Reload: re-read the configuration and apply it as a diff, never dropping a listener.

Theory of operation
-------------------
1. The daemon loads and validates the whole configuration first. Any problem:
   every error logged, nothing changed, ``ConfigError`` raised (the control
   reply carries the errors). ``apply`` gets a valid ``Config`` and the
   daemon's ``Registry``; it never sees the daemon.
2. Plan (pure, ``plan``): for every new unit, which of its listen entries are
   *kept* (an old entry of the same unit, or of a unit with the same name, is
   equal: its fd is reused, never closed, never re-bound), *retuned* (same kind
   and address, options differ: applied in place where the kernel allows),
   or *new* (bound). Old entries not claimed are closed.
3. Stage, reversibly, everything that can fail, before touching anything
   running: bind new entries, retune changed ones, and for an entry whose
   *bind-time* option changed (``reuse_port``, ``ipv6_only``, ...) on the
   same address, close the old socket and bind a new one (refused while a
   service or pool process holds that socket: the address would stay bound).
   Any failure undoes every step (fresh binds closed, retuned sockets
   retuned back, released entries re-bound) and raises ``BindError``: the old
   config keeps running.
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

from dataclasses import dataclass, field
from typing import TypedDict

from supervisor import sockets
from supervisor.errors import BindError
from supervisor.log import Logger
from supervisor.model import RETUNABLE_OPTIONS, Config, Listen, Unit
from supervisor.registry import Registry, runtime_type
from supervisor.units import UnitRuntime

# Options that can change on a bound socket without re-binding it.
RETUNABLE = RETUNABLE_OPTIONS  # every listen option that is not bind-time (model.LISTEN_OPTIONS)


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
    # per new listen entry to bind: index of an unclaimed old entry on the same kind and address,
    # which must be closed first (a bind-time option changed: the kernel will not bind the address twice)
    replace: list[int | None] = field(default_factory=list)


def _same_address(a: Listen, b: Listen) -> bool:
    return a.kind is b.kind and a.address == b.address


def plan(old_units: dict[str, Unit], new_units: tuple[Unit, ...]) -> tuple[list[UnitPlan], list[str]]:
    """Pure diff: a plan per new unit, and the names of units to retire."""
    plans: list[UnitPlan] = []
    for unit in new_units:
        old = old_units.get(unit.name)
        reuse: list[int | None] = []
        replace: list[int | None] = [None] * len(unit.listen)
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
            for j, listen in enumerate(unit.listen):
                if reuse[j] is None:
                    hit = next((i for i, o in enumerate(old.listen)
                                if i not in claimed and _same_address(o, listen)), None)
                    if hit is not None:
                        claimed.add(hit)
                        replace[j] = hit
        else:
            reuse = [None] * len(unit.listen)
        plans.append(UnitPlan(unit, old, reuse, replace))
    names = {u.name for u in new_units}
    retire = [name for name in old_units if name not in names]
    return plans, retire


@dataclass
class _Staged:
    """One changed or new unit after the reversible part of a reload: its new socket list, and how to undo it."""

    plan: UnitPlan
    runtime: UnitRuntime | None
    was_polling: bool
    bound: list[sockets.Bound | None]
    fresh: list[sockets.Bound] = field(default_factory=list)
    retuned: list[tuple[sockets.Bound, Listen]] = field(default_factory=list)
    # (index in runtime.bound, the old entry) of sockets closed to be re-bound with bind-time changes
    released: list[tuple[int, Listen]] = field(default_factory=list)

    def undo(self, log: Logger) -> None:
        """Put the running unit back as it was: close fresh binds, retune back, re-bind released entries."""
        for b in self.fresh:
            b.close(remove=True)
        for b, old in reversed(self.retuned):
            try:
                sockets.retune(b, old, unit=self.plan.unit.name)
            except BindError as exc:
                log.error("reload_rollback_failed", unit=self.plan.unit.name, error=str(exc))
        rt = self.runtime
        if rt is None:
            return
        rebound: dict[int, sockets.Bound] = {}
        for index, old in self.released:
            try:
                rebound[index] = sockets.bind(old, unit=rt.unit.name)
            except BindError as exc:
                log.error("reload_rollback_failed", unit=rt.unit.name, error=str(exc))
        if self.released:
            rt.rebind(rebound)
        if self.was_polling:
            rt.poll(True)


def _stage(p: UnitPlan, staged: _Staged) -> None:
    """Bind, retune and re-bind what ``p`` needs; everything done is recorded in ``staged`` for undo."""
    name = p.unit.name
    rt = staged.runtime
    for j, (listen, reuse) in enumerate(zip(p.unit.listen, p.reuse, strict=True)):
        if reuse is None and (not p.replace or p.replace[j] is None):
            b = sockets.bind(listen, unit=name)
            staged.fresh.append(b)
            staged.bound[j] = b
    for j, (listen, reuse) in enumerate(zip(p.unit.listen, p.reuse, strict=True)):
        if reuse is not None:
            assert rt is not None
            b = rt.bound[reuse]
            if b.listen != listen:
                old = b.listen
                sockets.retune(b, listen, unit=name)
                staged.retuned.append((b, old))
            staged.bound[j] = b
    for j, listen in enumerate(p.unit.listen):
        index = p.replace[j] if p.replace else None
        if index is None:
            continue
        assert rt is not None
        old_bound = rt.bound[index]
        if rt.pids() and rt.unit.mode.hands_over_listeners:
            # A running service holds its own copy of the socket: the address
            # stays bound whatever the daemon closes.
            raise BindError(name, listen.display,
                            "a bind-time option changed while the unit's processes hold the socket; "
                            f"stop the unit first (sockvisor stop {name})", listen.location)
        rt.poll(False)
        old_bound.close(remove=True)
        staged.released.append((index, old_bound.listen))
        b = sockets.bind(listen, unit=name)
        staged.fresh.append(b)
        staged.bound[j] = b


class ReloadSummary(TypedDict, total=False):
    """What a reload did, by unit name (the control reply and the ``reloaded`` log line)."""

    added: list[str]
    changed: list[str]
    removed: list[str]
    failed: list[str]


def apply(registry: Registry, new: Config, log: Logger) -> ReloadSummary:
    """Apply the valid configuration ``new`` to ``registry`` as a diff. Raises BindError, changing nothing."""
    old_units = {name: rt.unit for name in registry.names() if (rt := registry.get(name)) is not None}
    plans, retire = plan(old_units, new.units)

    # 1. Everything that can fail, reversibly: bind new entries, retune changed
    #    ones in place, re-bind entries whose bind-time options changed.
    staged: list[_Staged] = []
    try:
        for p in plans:
            runtime = registry.get(p.unit.name)
            if runtime is not None and p.old == p.unit:
                continue  # unchanged: not even looked at
            st = _Staged(p, runtime, runtime.polling if runtime is not None else False, [None] * len(p.unit.listen))
            staged.append(st)
            if p.unit.enabled:
                _stage(p, st)
    except Exception as exc:
        for st in reversed(staged):
            st.undo(log)
        if not isinstance(exc, BindError):  # whatever failed while staging is a bind failure of that unit
            unit = staged[-1].plan.unit if staged else None
            where = unit.listen[0] if unit is not None and unit.listen else None
            exc = BindError(unit.name if unit else "?", where.display if where else "?",
                            f"{type(exc).__name__}: {exc}")
        log.error("reload_failed", errors=[str(exc)])
        raise exc from None

    # 2. Commit: nothing below fails for a reason the config controls (values are
    #    range-checked at parse time, binds are done). Should an effect still fail
    #    (EMFILE creating a notify socket), that one unit is reported and the
    #    commit goes on: a reload is never left half applied across units.
    changed: list[str] = []
    added: list[str] = []
    failed: list[str] = []
    for st in staged:
        try:
            _commit(registry, st, added, changed, log)
        except Exception as exc:  # one unit's failure must not stop the others' commit
            failed.append(st.plan.unit.name)
            log.error("reload_commit_failed", unit=st.plan.unit.name, error=f"{type(exc).__name__}: {exc}")
    for name in retire:
        registry.remove(name)
    summary = ReloadSummary(added=added, changed=changed, removed=retire)
    if failed:
        summary["failed"] = failed
    log.info("reloaded", **summary)
    return summary


def _commit(registry: Registry, st: _Staged, added: list[str], changed: list[str], log: Logger) -> None:
    """Commit one staged unit: add it, update it in place, or replace its runtime (mode change)."""
    p, runtime = st.plan, st.runtime
    name = p.unit.name
    new_bound = [b for b in st.bound if b is not None]
    if runtime is None:
        registry.add(p.unit, new_bound).activate()
        added.append(name)
        return
    kept = {id(b) for b in new_bound}
    leftovers = [b for b in runtime.bound if id(b) not in kept and not b.closed]
    if type(runtime) is runtime_type(p.unit):
        if runtime.reconfigure(p.unit, new_bound, was_polling=st.was_polling):
            _activate(runtime, log)
        for b in leftovers:
            b.close(remove=True)
    else:
        # The old runtime retires with the sockets nobody took over; they
        # are closed when its last child is gone.
        runtime.keep_only(leftovers)
        registry.replace(p.unit, new_bound).activate()
    changed.append(name)


def _activate(runtime: UnitRuntime, log: Logger) -> None:
    """Start a committed unit; a failure is that unit's (logged), never a half-applied reload."""
    try:
        runtime.activate()
    except Exception as exc:
        log.exception("unit_activate_failed", unit=runtime.unit.name, error=str(exc))
