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
(``UNIT.N``: the service, each pool worker, a proxy backend; N counts up).
When the slot's main process
has exited, whatever is left in its cgroup gets the unit's stop signal and,
after ``stop_timeout``, ``cgroup.kill`` (SIGKILL to every member at once; or
SIGKILL one by one on kernels before 5.14), as systemd's
``KillMode=control-group`` does. Status counts the processes of each unit.

No controller is enabled, so the "no internal processes" rule does not
apply and the daemon stays in its own cgroup. Per-connection children of
accept mode are not put in cgroups (a cgroup per connection would cost the
accept path a mkdir, a write and an rmdir); the subreaper covers them.

A slot process is born in its cgroup (``clone3(CLONE_INTO_CGROUP)``, see
``_spawn.c``): nothing it forks can start outside, and the daemon's loop does not
wait for a migration (writing a pid to ``cgroup.procs`` waits for an RCU grace
period, 10-30 ms). Where that clone is refused (a kernel before 5.7, an
architecture the spawner has no entry for), the pid is written after the spawn.

Not covered: with that fallback, a process forked in the microseconds
between the spawn and the write to ``cgroup.procs``; and, where no hierarchy
is writable, everything except what the subreaper gives (orphans are reaped
and stopped at shutdown, but a ``setsid()`` grandchild of a unit that stops
survives the unit until the daemon exits).
"""

from __future__ import annotations

import contextlib
import os
import signal

from supervisor.reaper import signal_child

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
    """One slot process's cgroup: ``UNIT.N`` under the daemon's base (N counts up, skipping names in use)."""

    __slots__ = ("failed", "path")

    _serial = 0  # the last N handed out by this daemon image

    def __init__(self, path: str) -> None:
        self.path = path
        self.failed: str | None = None

    @classmethod
    def create(cls, base: str, unit: str) -> Group:
        """A new, empty cgroup for the next process of ``unit`` (OSError when the kernel refuses)."""
        while True:
            cls._serial += 1
            path = os.path.join(base, f"{unit}.{cls._serial}")
            try:
                os.mkdir(path, 0o755)
            except FileExistsError:
                continue  # left by a previous image of the daemon (re-exec), still holding something
            return cls(path)

    @classmethod
    def of(cls, base: str, pid: int) -> Group | None:
        """The cgroup under ``base`` that ``pid`` is in (a process adopted across a re-exec), or None."""
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                own = _own_path(f.read())
        except OSError:
            return None
        if own is None:
            return None
        # The slot's cgroup is the ancestor of ``own`` (``own`` itself, or one a child of the slot
        # made inside it) whose parent is ``base``: ``base`` ends with that parent's path.
        node = own
        while node not in ("/", ""):  # "": a path without a leading slash would otherwise loop forever
            parent = os.path.dirname(node)
            if base.endswith(parent):
                path = os.path.join(base, os.path.basename(node))
                return cls(path) if os.path.isdir(path) else None
            node = parent
        return None

    def open(self) -> int:
        """A directory fd for ``clone3(CLONE_INTO_CGROUP)`` (the caller closes it)."""
        return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

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
            if signal_child(pid, sig, group=False):
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
