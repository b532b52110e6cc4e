"""A slot's process gets a cgroup of its own, or none (logged) when that is refused.

``SlotDriver`` on a real ``UnitRuntime`` and ``Host`` (a loop that is never run, a
``watch_child`` that only records), with a real cgroup v2 base (``cgroups.find_base()``)
and real ``sleep`` children spawned by the real ``spawn_slot``. The one fake is a
spawner wrapped around it that refuses the way the C extension does:
``SpawnError("cgroup", errno)`` for a spawn with a cgroup fd, or a spawn that fails
outright. (Where clone3 cannot place the child, the extension has it join the cgroup
itself: tests/integration/test_spawn.py and test_cgroups.py run that under a seccomp filter.)
Every test kills and reaps its children and removes its cgroups (``UNIT.N`` directories of
its own unit name), also when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import signal
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from supervisor import cgroups, config, lifecycle, service
from supervisor.errors import SpawnError
from supervisor.service import SlotDriver
from supervisor.spawn import Offload, spawn_child
from supervisor.units import Host, UnitRuntime
from tests.conftest import wait_for


@pytest.fixture
def base() -> str:
    path, why = cgroups.find_base()
    if path is None:
        pytest.skip(f"no writable cgroup v2 hierarchy here: {why}")
    return path


def own_cgroup(pid: int) -> str:
    """The cgroup v2 path of ``pid`` (the ``0::`` line of /proc/PID/cgroup)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"{pid} is in no cgroup v2 cgroup")


def members(group: cgroups.Group) -> list[int]:
    return [int(p) for p in Path(group.path, "cgroup.procs").read_text().split()]


class Spawner:
    """``service.spawn_slot`` that refuses as told, recording the cgroup argument of each call."""

    def __init__(self, harness: Harness, *, with_fd: SpawnError | None = None, without_fd: SpawnError | None = None,
                 remove_group: bool = False) -> None:
        self.harness = harness
        self.with_fd = with_fd  # raised by every spawn with a cgroup fd
        self.without_fd = without_fd  # raised by every spawn without one
        self.remove_group = remove_group  # rmdir the unit's (still empty) cgroups before a spawn with a fd
        self.calls: list[int | None] = []

    def __call__(self, rt: UnitRuntime, index: int, fds: list[int], cgroup: int | None) -> int:
        self.calls.append(cgroup)
        if cgroup is not None and self.with_fd is not None:
            raise self.with_fd
        if cgroup is None and self.without_fd is not None:
            raise self.without_fd
        if cgroup is not None and self.remove_group:
            for path in self.harness.group_dirs():
                os.rmdir(path)
        pid = service.spawn_slot(rt, index, fds, cgroup)
        self.harness.pids.append(pid)
        return pid


def refused(stage: str, code: int) -> SpawnError:
    return SpawnError(stage, code, os.strerror(code))


class Harness:
    """One service unit (``sleep 30``) on a real runtime, with the slot drivers a test makes."""

    def __init__(self, base: str, logs: list[MutableMapping[str, Any]]) -> None:
        self.base = base
        self.logs = logs
        self.name = f"cgt-{os.getpid()}-{os.urandom(3).hex()}"
        self.pids: list[int] = []  # every child started, killed and reaped at the end
        self.watched: dict[int, Any] = {}
        (self.unit,) = config.load_units_from_text(
            f"name: {self.name}\nlisten: [{{tcp: '127.0.0.1:1'}}]\nmode: service\nstart: eager\n"
            "exec: [sleep, '30']\n", "slot_cgroups.yaml")
        self.loop = asyncio.new_event_loop()
        self.offload: Offload[Any] = Offload(self.loop)
        host = Host(self.loop, structlog.get_logger(), dict(os.environ), self.watched.__setitem__, self.offload,
                    cgroup_base=lambda: base)
        self.rt = UnitRuntime(host, self.unit, [])
        self.drivers: list[SlotDriver] = []

    def driver(self, spawner: Spawner | None = None) -> SlotDriver:
        d = SlotDriver(self.rt, 0, fds=lambda _i: [], changed=lambda _d: None,
                       spawner=spawner or Spawner(self))
        self.drivers.append(d)
        return d

    def start(self, spawner: Spawner | None = None) -> SlotDriver:
        """A driver, started (an eager unit's start request: one spawn)."""
        d = self.driver(spawner)
        d.feed(lifecycle.StartRequest())
        return d

    def group_dirs(self) -> list[str]:
        """This unit's cgroups under the base (``NAME.N``)."""
        return sorted(os.path.join(self.base, n) for n in os.listdir(self.base) if n.startswith(self.name + "."))

    def warnings(self) -> list[MutableMapping[str, Any]]:
        return [e for e in self.logs if e["event"] == "cgroup_failed"]

    def close(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        for d in self.drivers:
            d.cancel()
        self.rt.close()
        self.offload.close()
        self.loop.close()
        for path in self.group_dirs():

            def gone(path: str = path) -> bool:
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    return True
                except OSError:
                    return False  # the reaped child may take a moment to leave
                return True

            wait_for(gone, timeout=5, what=f"{path} removed")


@pytest.fixture
def harness(base: str) -> Iterator[Harness]:
    with capture_logs() as logs:
        h = Harness(base, logs)
        try:
            yield h
        finally:
            h.close()


def assert_in_own_group(h: Harness, d: SlotDriver) -> cgroups.Group:
    """The slot's process is the one member of the slot's new cgroup, which the runtime tracks."""
    pid = d.slot.pid
    group = d._group
    assert pid is not None and group is not None
    assert h.watched.keys() >= {pid}
    assert h.rt.cgroups.count(group) == 1
    assert os.path.dirname(group.path) == h.base and os.path.basename(group.path).startswith(h.name + ".")
    assert members(group) == [pid]
    assert os.path.basename(own_cgroup(pid)) == os.path.basename(group.path)
    return group


def test_a_slot_process_is_born_in_its_own_new_cgroup(harness: Harness) -> None:
    spawner = Spawner(harness)
    d = harness.start(spawner)
    assert d.slot.state is lifecycle.SlotState.RUNNING and harness.rt.spawns == 1
    assert len(spawner.calls) == 1 and spawner.calls[0] is not None  # one spawn, with the cgroup's fd
    group = assert_in_own_group(harness, d)
    assert harness.group_dirs() == [group.path]
    assert harness.warnings() == []


@pytest.mark.parametrize("refusal", [errno.EBUSY, errno.ENOSYS])
def test_a_cgroup_refusal_is_logged_and_the_process_starts_without_one(harness: Harness, refusal: int) -> None:
    spawner = Spawner(harness, with_fd=refused("cgroup", refusal))
    d = harness.start(spawner)
    assert len(spawner.calls) == 2 and spawner.calls[0] is not None and spawner.calls[1] is None
    pid = d.slot.pid
    assert pid is not None and pid in harness.watched and harness.rt.spawns == 1
    assert d._group is None and harness.rt.cgroups == [] and harness.group_dirs() == []
    assert own_cgroup(pid) == own_cgroup(os.getpid())  # where the daemon is: no cgroup of its own
    (warning,) = harness.warnings()
    assert warning["log_level"] == "warning" and warning["unit"] == harness.name
    assert warning["error"].startswith(os.path.join(harness.base, harness.name + "."))
    assert warning["error"].endswith(f": {os.strerror(refusal)}")


@pytest.mark.parametrize("with_fd", [refused("execve", errno.ENOENT), refused("cgroup", errno.EBUSY),
                                     refused("cgroup", errno.ENOSYS)],
                         ids=["born-in", "after-a-refusal", "after-an-enosys"])
def test_a_spawn_failure_leaves_no_cgroup(harness: Harness, with_fd: SpawnError) -> None:
    """The spawn itself fails (with the fd, or without it after a refusal): the new cgroup is removed."""
    spawner = Spawner(harness, with_fd=with_fd, without_fd=refused("execve", errno.ENOENT))
    d = harness.start(spawner)
    assert spawner.calls[0] is not None
    assert spawner.calls[1:] == ([] if with_fd.stage == "execve" else [None])
    assert harness.rt.spawn_failures == 1 and harness.rt.spawns == 0
    assert d.slot.pid is None and d._group is None and harness.rt.cgroups == []
    assert harness.group_dirs() == []
    assert harness.watched == {} and harness.pids == []


def test_a_cgroup_removed_under_the_spawn_is_a_real_refusal(harness: Harness) -> None:
    """The unit's new cgroup is gone by the time the (real) spawn uses its fd: the kernel refuses,
    the refusal is logged, and the process starts where the daemon is."""
    spawner = Spawner(harness, remove_group=True)
    d = harness.start(spawner)
    assert len(spawner.calls) == 2 and spawner.calls[0] is not None and spawner.calls[1] is None
    pid = d.slot.pid
    assert pid is not None and pid in harness.watched and harness.rt.spawns == 1
    assert d._group is None and harness.rt.cgroups == [] and harness.group_dirs() == []
    assert own_cgroup(pid) == own_cgroup(os.getpid())
    (warning,) = harness.warnings()
    assert warning["error"].startswith(os.path.join(harness.base, harness.name + "."))


def test_group_of_finds_the_cgroup_a_process_was_born_in_and_adopt_tracks_it(harness: Harness) -> None:
    group = cgroups.Group.create(harness.base, harness.name)
    fd = group.open()
    try:
        pid = spawn_child(harness.rt.prepared(), [-1, -1, 2], listen_pid=False, cgroup=fd)
    finally:
        os.close(fd)
    harness.pids.append(pid)
    found = cgroups.Group.of(harness.base, pid)
    assert found is not None and found.path == group.path and members(found) == [pid]
    assert cgroups.Group.of(harness.base, os.getpid()) is None  # outside the base
    assert cgroups.Group.of(harness.base, 2**22 + 1) is None  # no such process
    # A re-exec's slot with this pid: the new driver watches it and tracks its cgroup.
    d = harness.driver()
    d.adopt(dataclasses.replace(d.slot, state=lifecycle.SlotState.RUNNING, pid=pid))
    assert pid in harness.watched
    assert d._group is not None and d._group.path == group.path
    assert [g.path for g in harness.rt.cgroups] == [group.path]


def test_group_of_finds_the_slot_of_a_process_in_a_cgroup_of_its_own_inside(harness: Harness) -> None:
    """A slot's process that made its own sub-cgroup (a service that delegates) is still found after a re-exec."""
    group = cgroups.Group.create(harness.base, harness.name)
    inner = os.path.join(group.path, "inner")
    os.mkdir(inner)
    fd = cgroups.Group(inner).open()
    try:
        pid = spawn_child(harness.rt.prepared(), [-1, -1, 2], listen_pid=False, cgroup=fd)
    finally:
        os.close(fd)
    try:
        found = cgroups.Group.of(harness.base, pid)
        assert found is not None and found.path == group.path
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.rmdir(inner)
