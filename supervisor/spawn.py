"""Starting children: a unit's process settings, prepared once, spawned many times.

Theory of operation
-------------------
In accept mode the daemon starts one child per connection and has to stay well under 100us of
CPU per child, so the work is split in two:

* ``prepare()`` runs once per unit (at start and on reload): it resolves the executable on
  the child's PATH, the user and groups to numbers, the rlimit names to resource numbers, and
  builds the child's base environment as encoded ``NAME=value`` bytes (SPEC section 4). Every
  lookup that can fail (an unknown user, a missing program) fails here, where the daemon can
  report it against the unit, instead of in a child.
* ``AcceptTemplate`` is accept mode's hot path: the prepared unit converted once more into the
  C extension's form, so that ``accept_spawn`` can accept a batch of queued connections and
  start one child each in a single call without the GIL (see "accept mode: batches" in
  ``_spawn.c``). It takes no decision: its caller passes the count its policy granted.
* ``spawn_child()`` is the general path: it appends the per-spawn variables the caller already
  encoded (``LISTEN_FDS``, ``LISTEN_FDNAMES``, ``REMOTE_*``) and makes one call into the C
  extension ``supervisor._spawn``, which vforks, arranges the fds, drops privileges, writes
  ``LISTEN_PID`` and ``WATCHDOG_PID`` (the child's own pid, which only the child can know) and
  execs. See the top
  of ``_spawn.c`` for why vfork and what the child may do.

The environment is built fresh from the configuration; the daemon's ``os.environ`` is only
read (for ``pass_environment``) and never mutated. The variables of the activation protocol
(``RESERVED_ENVIRONMENT``) belong to the daemon: a unit's ``environment`` or
``pass_environment`` cannot set them, so a child never sees two values for one name.

Nothing here waits for a child: the daemon reaps every child itself (SIGCHLD and
``waitpid(-1, WNOHANG)``). The one exception is a child that failed before exec, which the C
extension reaps before raising ``SpawnError``, so the daemon never sees its pid.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import grp
import os
import pwd
import resource
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, Protocol, TypeVar

from supervisor import _spawn, envfile
from supervisor.errors import SpawnError
from supervisor.model import DEFAULT_PATH, RESERVED_ENVIRONMENT, Process, Stderr

__all__ = [
    "CONNECTION",
    "RESERVED_ENVIRONMENT",
    "RLIMITS",
    "AcceptTemplate",
    "Credentials",
    "Prepared",
    "Remote",
    "listen_environment",
    "prepare",
    "resolve_credentials",
    "resolve_executable",
    "spawn_child",
    "stderr_fd",
]

# The `limits` keys of SPEC section 3 and the resource each one sets.
RLIMITS: Mapping[str, int] = {
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
    "as": resource.RLIMIT_AS,
    "cpu": resource.RLIMIT_CPU,
    "core": resource.RLIMIT_CORE,
    "fsize": resource.RLIMIT_FSIZE,
    "memlock": resource.RLIMIT_MEMLOCK,
    "stack": resource.RLIMIT_STACK,
}


def resolve_executable(name: str, path: str = DEFAULT_PATH) -> str:
    """Find the program ``name`` the way execvp would, once, so that each spawn is one execve.

    Args:
        name: ``exec[0]``. With a "/" it is used as given (a relative one is then resolved by
            the kernel against the child's working directory); otherwise it is searched for.
        path: the child's PATH, colon-separated; an empty entry means the current directory.

    Returns:
        The path to pass to execve.

    Raises:
        SpawnError: stage "execve", ENOENT, if no entry of ``path`` has an executable file
            called ``name``.
    """
    if "/" in name:
        return name
    if name:
        for directory in path.split(":"):
            candidate = os.path.join(directory or ".", name)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
    raise SpawnError("execve", errno.ENOENT, f"{name!r}: command not found in PATH={path}")


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who a child runs as: -1 or None keeps the daemon's own value."""

    uid: int = -1
    gid: int = -1
    # None: leave the supplementary groups alone; () clears them.
    groups: tuple[int, ...] | None = None


def _user(spec: str) -> tuple[int, int | None, str | None]:
    """(uid, primary gid, login name) of a user name or number; gid and name are None for a
    number without a passwd entry."""
    try:
        entry = pwd.getpwuid(int(spec)) if spec.isdigit() else pwd.getpwnam(spec)
    except KeyError:
        if spec.isdigit():
            return int(spec), None, None
        raise SpawnError("user", errno.ENOENT, f"unknown user {spec!r}") from None
    return entry.pw_uid, entry.pw_gid, entry.pw_name


def _group(spec: str) -> int:
    """The gid of a group name or number (a number needs no group entry)."""
    if spec.isdigit():
        return int(spec)
    try:
        return grp.getgrnam(spec).gr_gid
    except KeyError:
        raise SpawnError("user", errno.ENOENT, f"unknown group {spec!r}") from None


def resolve_credentials(process: Process) -> Credentials:
    """Turn ``user``, ``group`` and ``supplementary_groups`` into numbers for the child.

    ``user`` alone gives its uid, its primary gid and (when ``supplementary_groups`` is empty)
    all the groups it belongs to, as initgroups() would. ``group`` overrides the primary gid.
    Whenever a user or group is given, the supplementary groups are set too (to ``()`` if there
    are none) so that a child never keeps root's groups after dropping its uid.

    Raises:
        SpawnError: stage "user" for a name that does not exist, or a numeric user without a
            passwd entry and no ``group`` (its gid would otherwise stay the daemon's).
    """
    uid = gid = -1
    name: str | None = None
    if process.user is not None:
        uid, primary, name = _user(process.user)
        if primary is not None:
            gid = primary
        elif process.group is None:
            raise SpawnError("user", errno.ENOENT, f"user {process.user} has no passwd entry: set group too")
    if process.group is not None:
        gid = _group(process.group)

    groups: tuple[int, ...] | None = None
    if process.supplementary_groups:
        groups = tuple(_group(g) for g in process.supplementary_groups)
    elif name is not None:
        groups = tuple(os.getgrouplist(name, gid))
    elif process.user is not None or process.group is not None:
        groups = ()
    # Without CAP_SETGID setgroups() always fails, so a daemon that is not root only touches
    # the groups when the unit names some explicitly (and then gets a clear EPERM).
    if groups is not None and not process.supplementary_groups and os.geteuid() != 0:
        groups = None
    return Credentials(uid=uid, gid=gid, groups=groups)


def _pair(name: str, value: str) -> bytes:
    return os.fsencode(name) + b"=" + os.fsencode(value)


# uid, gid, groups, cwd, umask, nice, rlimits, setsid: the arguments of _spawn.spawn after listen_pid.
_Tail = tuple[int, int, tuple[int, ...] | None, bytes | None, int, int, tuple[tuple[int, int, int], ...], bool]


def _limit(value: int) -> int:
    return -1 if value == resource.RLIM_INFINITY else value


@dataclass(frozen=True, slots=True)
class Prepared:
    """Everything about a unit's children that does not change from one spawn to the next."""

    unit: str
    path: bytes  # resolved executable, for execve
    argv: tuple[bytes, ...]
    env: tuple[bytes, ...]  # the base environment; spawn_child adds the per-spawn variables
    credentials: Credentials
    cwd: bytes | None
    umask: int  # -1: unchanged
    nice: int  # 0: unchanged
    rlimits: tuple[tuple[int, int, int], ...]  # (resource, soft, hard), -1 = RLIM_INFINITY
    stderr: Stderr
    setsid: bool = True
    # The trailing arguments of _spawn.spawn, in order, so the hot path passes them in one go.
    _tail: _Tail = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        c = self.credentials
        tail: _Tail = (c.uid, c.gid, c.groups, self.cwd, self.umask, self.nice, self.rlimits, self.setsid)
        object.__setattr__(self, "_tail", tail)


def prepare(
    process: Process,
    *,
    unit: str,
    notify_socket: str | None,
    daemon_environ: Mapping[str, str],
    setsid: bool = True,
) -> Prepared:
    """Resolve a unit's process settings once, for any number of ``spawn_child`` calls.

    Args:
        process: the unit's process keys.
        unit: the unit's name, for ``SOCKVISOR_UNIT``.
        notify_socket: the path of the daemon's notify socket for this unit, if any.
        daemon_environ: the daemon's environment, read for ``pass_environment`` only.
        setsid: start each child in its own session and process group (so the daemon can
            signal the whole group); off only for tests and special cases.

    Returns:
        The prepared unit.

    Raises:
        SpawnError: stage "execve" if the program is not found on the child's PATH, "user" if
            a user or group does not exist, "setrlimit" for an unknown limit name.
    """
    if not process.exec:
        raise SpawnError("execve", errno.EINVAL, "exec is empty")

    # Later entries win; the daemon's own variables are written last so nothing overrides them.
    env: dict[str, str] = {"PATH": DEFAULT_PATH}
    for name in process.pass_environment:
        value = daemon_environ.get(name)
        if value is not None and name not in RESERVED_ENVIRONMENT:
            env[name] = value
    for ref in process.environment_files:  # after pass_environment, before environment (SPEC 8)
        try:
            pairs = envfile.parse(ref.content.decode("utf-8", "replace"))
        except envfile.EnvFileError:
            pairs = []  # the configuration checked it when it read the file
        for name, value in pairs:
            if name not in RESERVED_ENVIRONMENT:
                env[name] = value
    for name, value in process.environment:
        if name not in RESERVED_ENVIRONMENT:
            env[name] = value
    if notify_socket is not None:
        env["NOTIFY_SOCKET"] = notify_socket
    env["SOCKVISOR_UNIT"] = unit

    rlimits: list[tuple[int, int, int]] = []
    for limit_name, soft, hard in process.limits:
        res = RLIMITS.get(limit_name)
        if res is None:
            raise SpawnError("setrlimit", errno.EINVAL, f"unknown limit {limit_name!r}")
        rlimits.append((res, _limit(soft), _limit(hard)))

    program = resolve_executable(process.exec[0], env["PATH"])
    return Prepared(
        unit=unit,
        path=os.fsencode(program),
        argv=tuple(os.fsencode(arg) for arg in process.exec),
        env=tuple(_pair(name, value) for name, value in env.items()),
        credentials=resolve_credentials(process),
        cwd=None if process.working_directory is None else os.fsencode(process.working_directory),
        umask=-1 if process.umask is None else process.umask,
        nice=0 if process.nice is None else process.nice,
        rlimits=tuple(rlimits),
        stderr=process.stderr,
        setsid=setsid,
    )


def listen_environment(names: Sequence[str]) -> tuple[bytes, ...]:
    """``LISTEN_FDS`` and ``LISTEN_FDNAMES`` for fds 3.. named ``names``, ready for extra_env.

    ``LISTEN_PID`` is not here: only the child knows its pid (``spawn_child(listen_pid=True)``).
    """
    return (
        b"LISTEN_FDS=%d" % len(names),
        b"LISTEN_FDNAMES=" + os.fsencode(":".join(names)),
    )


def stderr_fd(prepared: Prepared, connection: int | None = None) -> int:
    """The source for the child's fd 2 under the unit's ``stderr`` policy.

    ``connection`` falls back to inheriting the daemon's stderr when there is no connection
    (service and pool mode).
    """
    if prepared.stderr is Stderr.NULL:
        return -1
    if prepared.stderr is Stderr.CONNECTION and connection is not None:
        return connection
    return 2


def spawn_child(
    prepared: Prepared,
    fds: Sequence[int],
    extra_env: Sequence[bytes] = (),
    *,
    listen_pid: bool,
    pid_vars: Sequence[bytes] = (),
    cgroup: int | None = None,
) -> int:
    """Start one child and return its pid, without waiting for it (the daemon reaps it).

    Args:
        prepared: the unit, from ``prepare``.
        fds: ``fds[i]`` becomes the child's fd i (-1: /dev/null); every other fd is closed.
            Accept mode with stdio: ``[conn, conn, stderr_fd(prepared, conn)]``; fds mode:
            ``[-1, -1, stderr_fd(prepared), listen1, listen2, ...]``.
        extra_env: per-spawn ``NAME=value`` bytes (``listen_environment(...)``, ``REMOTE_*``),
            none of them in the prepared environment.
        listen_pid: add ``LISTEN_PID=<the child's pid>``.
        pid_vars: more variable names to set to the child's pid, after ``LISTEN_PID``
            (``[b"WATCHDOG_PID"]``); none of them in the prepared environment.
        cgroup: a cgroup v2 directory fd the child is born in (``clone3(CLONE_INTO_CGROUP)``);
            where clone3 is refused (an old kernel, a seccomp profile), the child joins it as
            its first step, before its exec, so nothing the program forks starts outside.

    Returns:
        The child's pid; it has already exec'ed the program.

    Raises:
        SpawnError: the child could not be started; ``stage`` names the step that failed
            ("dup", "close", "setsid", "setgroups", "setgid", "setuid", "chdir", "setrlimit",
            "nice", "execve", or "fork" if no process could be created; "cgroup" if it could not
            be created in or join ``cgroup``, which a spawn without one may still do). No zombie is left.
    """
    env = (*extra_env, *prepared.env) if extra_env else prepared.env
    try:
        names: bool | Sequence[bytes] = listen_pid
        if pid_vars:
            names = (b"LISTEN_PID", *pid_vars) if listen_pid else pid_vars
        if cgroup is None:
            return _spawn.spawn(prepared.path, prepared.argv, env, fds, names, *prepared._tail)
        return _spawn.spawn(prepared.path, prepared.argv, env, fds, names, *prepared._tail, cgroup)
    except _spawn.SpawnFailure as failure:
        stage, err = failure.args
        raise SpawnError(stage, err, _describe(prepared, stage, err)) from None


# In an AcceptTemplate's fds: the accepted connection.
CONNECTION = -2


class Remote(enum.IntEnum):
    """Which peer variables an accepted connection's child gets (values shared with ``_spawn.c``)."""

    NONE = 0
    INET = 1  # REMOTE_ADDR, REMOTE_PORT
    UNIX = 2  # REMOTE_PID, REMOTE_UID, REMOTE_GID (SO_PEERCRED)


class Batch(NamedTuple):
    """What one ``AcceptTemplate.accept_spawn`` call did."""

    pids: list[int]  # the children started, in accept order
    remotes: list[str] | None  # their peers as log text, when asked for
    failures: list[tuple[SpawnError, str]]  # connections that got no child (already closed), with their peer
    errno: int  # 0, or the accept() error that stopped the batch for lack of a resource


@dataclass(frozen=True, slots=True)
class AcceptTemplate:
    """A prepared unit in the C extension's form, for accepting and spawning in batches."""

    prepared: Prepared
    native: _spawn.Template

    @classmethod
    def build(cls, prepared: Prepared, fds: Sequence[int], extra_env: Sequence[bytes] = (), *,
              listen_pid: bool, remote: Remote) -> AcceptTemplate:
        """Convert ``prepared`` once.

        Args:
            fds: as for ``spawn_child``, with ``CONNECTION`` where the accepted connection goes.
            extra_env: fixed per-connection variables (``LISTEN_FDS=1``, ...).
            listen_pid: add ``LISTEN_PID=<the child's pid>``.
            remote: the peer variables to add for each connection.
        """
        c = prepared.credentials
        native = _spawn.template(prepared.path, prepared.argv, (*extra_env, *prepared.env), fds, listen_pid,
                                 int(remote), c.uid, c.gid, c.groups, prepared.cwd, prepared.umask, prepared.nice,
                                 prepared.rlimits, prepared.setsid)
        return cls(prepared, native)

    def error(self, stage: str, code: int) -> SpawnError:
        """A child that failed at ``stage`` with errno ``code``, as the per-connection path reports it."""
        return SpawnError(stage, code, _describe(self.prepared, stage, code))

    def accept_spawn(self, listen_fd: int, budget: int, want_remote: bool) -> Batch:
        """Accept up to ``budget`` connections queued on the non-blocking ``listen_fd``, one child each.

        The daemon's copy of every connection is closed; a child that failed before exec has
        been reaped. ``want_remote`` asks for the peers as log text.
        """
        pids, remotes, failed, err = _spawn.accept_spawn(self.native, listen_fd, budget, want_remote)
        failures = [(SpawnError(stage, code, _describe(self.prepared, stage, code)), remote)
                    for stage, code, remote in failed]
        return Batch(pids, remotes, failures, err)


def _describe(prepared: Prepared, stage: str, err: int) -> str:
    """The strerror of a failed spawn, naming the path the step was about where there is one."""
    text = os.strerror(err)
    if stage == "execve":
        return f"{os.fsdecode(prepared.path)}: {text}"
    if stage == "chdir" and prepared.cwd is not None:
        return f"{os.fsdecode(prepared.cwd)}: {text}"
    return text


class SpawnJob(Protocol):
    """What the helper thread needs of a job: the connection fd (closed after the spawn) and the spawn."""

    @property
    def fd(self) -> int: ...

    def spawn(self) -> int: ...


J = TypeVar("J", bound=SpawnJob)


class Offload(Generic[J]):
    """A helper thread that spawns one child at a time while the loop thread spawns another.

    vfork suspends only the calling thread until the child has exec'ed, which
    on a small VM takes several hundred microseconds; with a second spawning
    thread two children can be exec'ing at once on two cores (the C inetds get
    the same overlap from fork). ``submit`` never blocks: it refuses when the
    thread is busy and the caller spawns inline. Results come back on the loop
    with ``call_soon_threadsafe``; a child that exits before its result is
    registered is kept by the reaper's owner until then (``Daemon.reaped``).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._cond = threading.Condition()
        self._job: tuple[J, Callable[[J, int, SpawnError | None], None]] | None = None
        self.busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        # Set on the loop when no spawn is in flight, so a stopping daemon can
        # wait for the last result (and stop that child) before it exits.
        self.idle = asyncio.Event()
        self.idle.set()

    def submit(self, job: J, done: Callable[[J, int, SpawnError | None], None]) -> bool:
        """Hand ``job`` to the thread if it is idle; False if it is busy (spawn inline then)."""
        if self.busy or self._closed:
            return False
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sockvisor-spawn", daemon=True)
            self._thread.start()
        self.idle.clear()
        with self._cond:
            self.busy = True
            self._job = (job, done)
            self._cond.notify()
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._job is None and not self._closed:
                    self._cond.wait()
                if self._job is None:
                    return
                job, done = self._job
                self._job = None
            pid, error = 0, None
            try:
                pid = job.spawn()
            except SpawnError as exc:
                error = exc
            os.close(job.fd)
            self.busy = False
            try:
                self._loop.call_soon_threadsafe(self._finish, done, job, pid, error)
            except RuntimeError:  # the loop is closed: the daemon is exiting
                return

    def _finish(self, done: Callable[[J, int, SpawnError | None], None], job: J, pid: int,
                error: SpawnError | None) -> None:
        """On the loop: hand the result over, then say so if nothing else is in flight."""
        try:
            done(job, pid, error)
        finally:
            if not self.busy:
                self.idle.set()
