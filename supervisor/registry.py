"""The daemon's units: one runtime per configured unit by name, and the removed ones winding down.

Reload and the control dispatch work on this registry, never on the daemon: a
unit is *added* (a runtime of its mode, built on the shared ``Host``),
*replaced* (its mode changed: the old runtime retires), or *retired* (removed
from the config: it stops polling and stops its children; its sockets are
closed by ``sweep`` once its last child is gone).
"""

from __future__ import annotations

from collections.abc import Iterator

from supervisor import sockets
from supervisor.accept import AcceptRuntime
from supervisor.builtins import DatagramRuntime
from supervisor.log import Logger
from supervisor.model import Mode, Unit
from supervisor.pool import PoolRuntime
from supervisor.proxy import ProxyRuntime
from supervisor.service import ServiceRuntime
from supervisor.units import Host, UnitRuntime

RUNTIMES: dict[Mode, type[UnitRuntime]] = {
    Mode.SERVICE: ServiceRuntime,
    Mode.POOL: PoolRuntime,
    Mode.ACCEPT: AcceptRuntime,
    Mode.PROXY: ProxyRuntime,
}


def runtime_type(unit: Unit) -> type[UnitRuntime]:
    """The runtime class a unit runs in: its mode's, or the daemon's own datagram answerer for a builtin service."""
    if unit.mode is Mode.SERVICE and unit.builtin is not None:
        return DatagramRuntime
    return RUNTIMES[unit.mode]


class Registry:
    """Runtimes by unit name, in config order, plus the retiring ones."""

    def __init__(self, host: Host, log: Logger) -> None:
        self._host = host
        self._log = log
        self._units: dict[str, UnitRuntime] = {}
        self.retiring: list[UnitRuntime] = []
        self._sweeping = False

    def get(self, name: str) -> UnitRuntime | None:
        return self._units.get(name)

    def __iter__(self) -> Iterator[UnitRuntime]:
        return iter(list(self._units.values()))

    def __len__(self) -> int:
        return len(self._units)

    def names(self) -> list[str]:
        return list(self._units)

    def everything(self) -> list[UnitRuntime]:
        """Every runtime, configured or retiring (shutdown stops and closes them all)."""
        return [*self._units.values(), *self.retiring]

    def add(self, unit: Unit, bound: list[sockets.Bound]) -> UnitRuntime:
        runtime = runtime_type(unit)(self._host, unit, bound)
        self._units[unit.name] = runtime
        self._log.info("unit_started", unit=unit.name, mode=unit.mode.value,
                       listen=[b.listen.display for b in bound], enabled=unit.enabled)
        return runtime

    def replace(self, unit: Unit, bound: list[sockets.Bound]) -> UnitRuntime:
        """A new runtime for ``unit`` (its mode changed); the old one retires with what it still holds."""
        old = self._units.pop(unit.name)
        self.retire(old)
        successor = self.add(unit, bound)
        successor.last_exit = old.last_exit  # the unit's history outlives its mode
        return successor

    def remove(self, name: str) -> None:
        """``name`` left the configuration: its runtime retires."""
        self.retire(self._units.pop(name))

    def retire(self, runtime: UnitRuntime) -> None:
        runtime.retire()
        self.retiring.append(runtime)
        self.sweep()

    def sweep(self) -> None:
        """Close the sockets of retired runtimes whose last child is gone."""
        # busy() may take in the reaper's records, whose exits sweep again: once at a time.
        if self.retiring and not self._sweeping:
            self._sweeping = True
            try:
                done = [rt for rt in self.retiring if not rt.busy()]
                for rt in done:
                    self.retiring.remove(rt)
                    rt.close(remove=True)
                    self._log.info("unit_removed", unit=rt.unit.name)
            finally:
                self._sweeping = False
