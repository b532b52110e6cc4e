"""A unit's whole process tree is the unit's: one cgroup v2 per process slot.

Theory of operation
-------------------
A service that forks and ``setsid()``s leaves its process group, so the stop
signal (sent to the group) misses it and it keeps serving the unit's port
after the unit says ``stopped``. A cgroup cannot be left by a process. Where
a cgroup v2 hierarchy is writable (the pure v2 mount, or the hybrid layout's
``unified`` mount, found in ``/proc/self/mountinfo``), the daemon makes
``sockvisor/`` under its own cgroup (under systemd: the service's, which
``Delegate=yes`` gives it) and one child cgroup per slot process
(``UNIT.SLOT``: the service, each pool worker, a proxy backend). The new
process is moved in as soon as it is spawned. When the slot's main process
has exited, whatever is left in its cgroup gets the unit's stop signal and,
after ``stop_timeout``, ``cgroup.kill`` (SIGKILL to every member at once; or
SIGKILL one by one on kernels before 5.14), as systemd's
``KillMode=control-group`` does. Status counts the processes of each unit.

No controller is enabled, so the "no internal processes" rule does not
apply and the daemon stays in its own cgroup. Per-connection children of
accept mode are not put in cgroups (a cgroup per connection would cost the
accept path a mkdir, a write and an rmdir); the subreaper covers them.

Not covered: a process forked in the microseconds between the spawn and the
write to ``cgroup.procs`` (the spawner would need ``CLONE_INTO_CGROUP``); and,
where no hierarchy is writable, everything except what the subreaper gives
(orphans are reaped and stopped at shutdown, but a ``setsid()`` grandchild of
a unit that stops survives the unit until the daemon exits).
"""

from __future__ import annotations

import contextlib
import os
import signal

_MARK = "sockvisor"


def _v2_mount(mountinfo: str) -> str | None:
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if sep and right.split()[:1] == ["cgroup2"]:
            fields = left.split()
            if len(fields) >= 5:
                return fields[4].replace("\\040", " ")
    return None


def _own_path(proc_cgroup: str) -> str | None:
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def find_base() -> tuple[str | None, str]:
    """(the directory for the daemon's unit cgroups, or None; why none is usable, or where it is)."""
    try:
        with open("/proc/self/mountinfo") as f:
            mount = _v2_mount(f.read())
        with open("/proc/self/cgroup") as f:
            own = _own_path(f.read())
    except OSError as exc:
        return None, f"cannot read /proc: {exc.strerror}"
    if mount is None:
        return None, "no cgroup v2 hierarchy is mounted"
    if own is None:
        return None, "the daemon is in no cgroup v2 cgroup"
    parent = os.path.normpath(mount + "/" + own.lstrip("/"))
    base = os.path.join(parent, _MARK)
    try:
        os.mkdir(base, 0o755)
    except FileExistsError:
        pass
    except OSError as exc:
        return None, f"cannot create {base}: {exc.strerror}"
    if not os.access(os.path.join(base, "cgroup.procs"), os.W_OK):
        return None, f"{base}/cgroup.procs is not writable"
    return base, base


class Group:
    """One slot's cgroup: ``UNIT.SLOT`` under the daemon's base."""

    __slots__ = ("failed", "path")

    def __init__(self, base: str, unit: str, slot: int) -> None:
        self.path = os.path.join(base, f"{unit}.{slot}")
        self.failed: str | None = None

    def add(self, pid: int) -> bool:
        """Move ``pid`` in (creating the cgroup). False (and ``failed`` says why) when the kernel refuses."""
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.path, 0o755)
            fd = os.open(os.path.join(self.path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, str(pid).encode())
            finally:
                os.close(fd)
        except ProcessLookupError:
            return True  # already gone: nothing to hold
        except OSError as exc:
            self.failed = f"{self.path}: {exc.strerror}"
            return False
        return True

    def pids(self) -> list[int]:
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                return [int(p) for p in f.read().split()]
        except (OSError, ValueError):
            return []

    def signal(self, sig: int, *, spare: int | None = None) -> list[int]:
        """Send ``sig`` to every member (but ``spare``); returns who got it."""
        sent = []
        for pid in self.pids():
            if pid == spare:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
                sent.append(pid)
        return sent

    def kill(self) -> None:
        """SIGKILL every member at once (cgroup.kill, Linux 5.14), or one by one."""
        try:
            fd = os.open(os.path.join(self.path, "cgroup.kill"), os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"1")
            finally:
                os.close(fd)
        except OSError:
            self.signal(signal.SIGKILL)

    def remove(self) -> None:
        """Remove the cgroup if it is empty (it is kept, and reused, while anything is left in it)."""
        with contextlib.suppress(OSError):
            os.rmdir(self.path)


def remove_base(base: str) -> None:
    """At shutdown: remove every empty unit cgroup, then the base (left in place while anything remains)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(base):
            path = os.path.join(base, name)
            if os.path.isdir(path):
                with contextlib.suppress(OSError):
                    os.rmdir(path)
    with contextlib.suppress(OSError):
        os.rmdir(base)
