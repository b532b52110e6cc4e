"""The spawner against real children: fds, environment, credentials, limits, signals, errors.

Most tests start ``cat`` with a pipe on stdin and one on stdout, and inspect it through
/proc/<pid> while it waits. Readiness is a round trip, not a sleep: a line written to cat's
stdin that comes back on its stdout proves cat is past the dynamic loader (which opens files
of its own) and blocked in its read loop. Closing stdin then lets it exit, and the test reaps
it with waitpid.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from supervisor import _spawn
from supervisor.errors import SpawnError
from supervisor.model import DEFAULT_PATH, Process, Stderr
from supervisor.spawn import (
    RESERVED_ENVIRONMENT,
    Credentials,
    Prepared,
    listen_environment,
    prepare,
    resolve_credentials,
    resolve_executable,
    spawn_child,
    stderr_fd,
)

# Changing credentials or lowering the nice value needs root; use with @pytest.mark.root.
skip_unless_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@dataclass
class Child:
    """A spawned ``cat`` that echoes its stdin pipe to its stdout pipe."""

    pid: int
    stdin: int  # our write end of its fd 0
    stdout: int  # our read end of its fd 1

    def status(self) -> dict[str, str]:
        """/proc/<pid>/status as a mapping of field to (stripped) value."""
        text = Path(f"/proc/{self.pid}/status").read_text()
        return {key: value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}

    def environ(self) -> list[str]:
        """The child's environment, in order, as NAME=value strings."""
        raw = Path(f"/proc/{self.pid}/environ").read_bytes()
        return [item.decode() for item in raw.split(b"\0") if item]

    def fd_identity(self, fd: int) -> tuple[int, int]:
        """(st_dev, st_ino) of the file behind the child's ``fd``."""
        st = os.stat(f"/proc/{self.pid}/fd/{fd}")
        return st.st_dev, st.st_ino

    def open_fds(self) -> set[int]:
        return {int(name) for name in os.listdir(f"/proc/{self.pid}/fd")}


def identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


class Children:
    """Starts cat children and guarantees each is ended and reaped by the end of the test."""

    def __init__(self) -> None:
        self.live: list[Child] = []

    def start(
        self,
        prepared: Prepared,
        more_fds: Sequence[int] = (),
        *,
        stderr: int = 2,
        extra_env: Sequence[bytes] = (),
        listen_pid: bool = False,
        cgroup: int | None = None,
    ) -> Child:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        try:
            pid = spawn_child(prepared, [in_r, out_w, stderr, *more_fds], extra_env, listen_pid=listen_pid,
                              cgroup=cgroup)
        except BaseException:
            for fd in (in_r, in_w, out_r, out_w):
                os.close(fd)
            raise
        os.close(in_r)
        os.close(out_w)
        child = Child(pid, in_w, out_r)
        self.live.append(child)
        os.write(in_w, b"ready\n")
        assert read_exactly(out_r, 6) == b"ready\n"
        return child

    def finish(self, child: Child) -> int:
        """Close the child's stdin, wait for it and return its wait status."""
        self.live.remove(child)
        os.close(child.stdin)
        read_all(child.stdout)
        os.close(child.stdout)
        _, status = os.waitpid(child.pid, 0)
        return status

    def close(self) -> None:
        for child in list(self.live):
            self.finish(child)


@pytest.fixture
def children() -> Iterator[Children]:
    tracker = Children()
    yield tracker
    tracker.close()


def cat(**process: object) -> Prepared:
    """A prepared unit named "t" running cat with the given process keys."""
    return prepare(
        Process(exec=("cat",), **process),  # type: ignore[arg-type]
        unit="t",
        notify_socket=None,
        daemon_environ=os.environ,
    )


def run_output(prepared: Prepared, *, listen_pid: bool = False, extra_env: Sequence[bytes] = ()) -> bytes:
    """Run a short-lived child with a pipe on stdout; return what it wrote after it exited 0."""
    r, w = os.pipe()
    try:
        pid = spawn_child(prepared, [-1, w, 2], extra_env, listen_pid=listen_pid)
    finally:
        os.close(w)
    try:
        output = read_all(r)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return output


def assert_no_children() -> None:
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


# ---------------------------------------------------------------------------- fds


def test_fds_are_renumbered_in_order(children: Children) -> None:
    """fds[i] becomes the child's fd i, for stdio and for the listen fds after them."""
    a_r, a_w = os.pipe()
    sock_a, sock_b = socket.socketpair()
    try:
        child = children.start(cat(), [a_r, sock_a.fileno()])
        assert child.fd_identity(1) == identity(child.stdout)
        assert child.fd_identity(3) == identity(a_r)
        assert child.fd_identity(4) == identity(sock_a.fileno())
        assert child.open_fds() == {0, 1, 2, 3, 4}
    finally:
        for fd in (a_r, a_w):
            os.close(fd)
        sock_a.close()
        sock_b.close()


def test_overlapping_sources_are_swapped_safely(children: Children) -> None:
    """A source that is also another slot's target is copied before it is overwritten (swap)."""
    lo_r, lo_w = os.pipe()
    hi_r, hi_w = os.pipe()
    lo, hi = sorted((lo_r, hi_r))
    fds = [-1] * (hi + 1 - 3)
    fds[lo - 3] = hi  # slot lo gets fd hi ...
    fds[hi - 3] = lo  # ... and slot hi gets fd lo
    try:
        child = children.start(cat(), fds)
        assert child.fd_identity(lo) == identity(hi)
        assert child.fd_identity(hi) == identity(lo)
        assert child.open_fds() == set(range(hi + 1))
    finally:
        for fd in (lo_r, lo_w, hi_r, hi_w):
            os.close(fd)


def test_source_already_in_its_slot_and_reused_sources(children: Children) -> None:
    """A source at its own slot stays (made inheritable) and one fd may fill several slots."""
    pipe_r, w = os.pipe()
    r = fcntl.fcntl(pipe_r, fcntl.F_DUPFD_CLOEXEC, 20)  # close-on-exec, like every Python fd
    os.close(pipe_r)
    # Child fds 0..2 are stdio, 3..r-1 /dev/null, r is r in place, and r+1 is r again.
    more = [-1] * (r - 3) + [r, r]
    try:
        child = children.start(cat(), more)
        assert child.fd_identity(r) == identity(r)
        assert child.fd_identity(r + 1) == identity(r)
        null = os.stat("/dev/null")
        assert child.fd_identity(3) == (null.st_dev, null.st_ino)
        assert child.open_fds() == set(range(r + 2))
    finally:
        os.close(r)
        os.close(w)


def test_nothing_else_is_open_in_the_child(children: Children) -> None:
    """Every fd of the daemon not listed in fds is closed, even an inheritable one."""
    leaked = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(leaked, True)
    high = os.dup2(leaked, 900)
    try:
        child = children.start(cat())
        assert child.open_fds() == {0, 1, 2}
    finally:
        os.close(leaked)
        os.close(high)


def test_stderr_null_is_dev_null(children: Children) -> None:
    """stderr: null puts /dev/null, opened read-write, on the child's fd 2."""
    prepared = cat(stderr=Stderr.NULL)
    child = children.start(prepared, stderr=stderr_fd(prepared))
    assert os.readlink(f"/proc/{child.pid}/fd/2") == "/dev/null"
    flags = Path(f"/proc/{child.pid}/fdinfo/2").read_text().split("flags:")[1].split()[0]
    assert int(flags, 8) & os.O_ACCMODE == os.O_RDWR


def test_stderr_policy_picks_the_source_of_fd_2() -> None:
    """inherit is the daemon's fd 2, connection the connection (when there is one), null -1."""
    assert stderr_fd(cat()) == 2
    assert stderr_fd(cat(), 9) == 2
    assert stderr_fd(cat(stderr=Stderr.CONNECTION), 9) == 9
    assert stderr_fd(cat(stderr=Stderr.CONNECTION)) == 2
    assert stderr_fd(cat(stderr=Stderr.NULL), 9) == -1


def test_bad_source_fd_fails_at_stage_dup() -> None:
    """A closed fd in fds fails the spawn at stage "dup" with EBADF."""
    assert_no_children()
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(SpawnError) as info:
        spawn_child(cat(), [-1, -1, 2, r], listen_pid=False)
    assert (info.value.stage, info.value.errno) == ("dup", errno.EBADF)
    assert_no_children()


# ---------------------------------------------------------------------------- environment


def test_listen_pid_is_the_childs_own_pid(children: Children) -> None:
    """listen_pid=True gives LISTEN_PID=<the child's pid>, next to the caller's LISTEN_FDS."""
    child = children.start(cat(), extra_env=listen_environment(["http", "admin"]), listen_pid=True)
    env = child.environ()
    assert env[:3] == [f"LISTEN_PID={child.pid}", "LISTEN_FDS=2", "LISTEN_FDNAMES=http:admin"]


def test_no_listen_pid_unless_asked(children: Children) -> None:
    """listen_pid=False adds no LISTEN_PID."""
    child = children.start(cat(), listen_pid=False)
    assert not any(item.startswith("LISTEN_PID=") for item in child.environ())


def test_environment_is_built_fresh(children: Children, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only PATH, the daemon's variables, pass_environment and environment reach the child."""
    monkeypatch.setenv("SOCKVISOR_TEST_MARKER", "leak")
    monkeypatch.setenv("PASSED", "from-daemon")
    monkeypatch.setenv("OVERRIDDEN", "from-daemon")
    monkeypatch.setenv("LISTEN_FDS", "99")
    monkeypatch.delenv("ABSENT", raising=False)
    prepared = prepare(
        Process(
            exec=("cat",),
            pass_environment=("PASSED", "OVERRIDDEN", "ABSENT", "LISTEN_FDS"),
            environment=(("OVERRIDDEN", "from-unit"), ("GREETING", "a b=c"), ("SOCKVISOR_UNIT", "x")),
        ),
        unit="web",
        notify_socket="/run/sockvisor/notify/web",
        daemon_environ=os.environ,
    )
    before = dict(os.environ)
    child = children.start(prepared, extra_env=[b"REMOTE_ADDR=127.0.0.1"])
    assert child.environ() == [
        "REMOTE_ADDR=127.0.0.1",
        f"PATH={DEFAULT_PATH}",
        "PASSED=from-daemon",
        "OVERRIDDEN=from-unit",
        "GREETING=a b=c",
        "NOTIFY_SOCKET=/run/sockvisor/notify/web",
        "SOCKVISOR_UNIT=web",
    ]
    assert dict(os.environ) == before


def test_environment_may_set_path_used_for_lookup(tmp_path: Path) -> None:
    """A unit's PATH replaces the default in the child and is where exec[0] is looked up."""
    program = tmp_path / "hello"
    program.write_text('#!/bin/sh\necho "$PATH"\n')
    program.chmod(0o755)
    prepared = prepare(
        Process(exec=("hello",), environment=(("PATH", f"{tmp_path}:/bin"),)),
        unit="t",
        notify_socket=None,
        daemon_environ={},
    )
    assert prepared.path == os.fsencode(program)
    assert run_output(prepared) == f"{tmp_path}:/bin\n".encode()


def test_argv_is_passed_as_written() -> None:
    """argv keeps exec[0] as written while execve gets the resolved path."""
    prepared = prepare(
        Process(exec=("sh", "-c", 'printf "%s|" "$0" "$@"', "zero", "one two", "")),
        unit="t",
        notify_socket=None,
        daemon_environ={},
    )
    assert prepared.path == os.fsencode(resolve_executable("sh"))
    assert run_output(prepared) == b"zero|one two||"


def test_reserved_names_are_the_protocol_variables() -> None:
    """Every variable the daemon sets per spawn or per unit is reserved."""
    assert {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "SOCKVISOR_UNIT"} <= (RESERVED_ENVIRONMENT)
    assert {"REMOTE_ADDR", "REMOTE_PORT", "REMOTE_PID", "REMOTE_UID", "REMOTE_GID"} <= RESERVED_ENVIRONMENT


# ---------------------------------------------------------------------------- process attributes


@pytest.mark.root
@skip_unless_root
def test_user_drops_to_nobody_with_its_groups(children: Children) -> None:
    """user: nobody sets real/effective/saved uid and gid and initgroups-style groups."""
    nobody = resolve_credentials(Process(exec=("cat",), user="nobody"))
    assert nobody == Credentials(uid=65534, gid=65534, groups=tuple(os.getgrouplist("nobody", 65534)))
    child = children.start(cat(user="nobody"))
    status = child.status()
    assert status["Uid"].split() == ["65534"] * 4
    assert status["Gid"].split() == ["65534"] * 4
    assert status["Groups"].split() == [str(g) for g in nobody.groups or ()]


@pytest.mark.root
@skip_unless_root
def test_group_and_supplementary_groups(children: Children) -> None:
    """group overrides the user's primary gid; supplementary_groups replace its group list."""
    child = children.start(cat(user="nobody", group="nogroup", supplementary_groups=("users", "4242")))
    status = child.status()
    assert status["Uid"].split() == ["65534"] * 4
    assert status["Gid"].split() == ["65534"] * 4
    assert sorted(status["Groups"].split()) == sorted(["100", "4242"])


@pytest.mark.root
@skip_unless_root
def test_group_without_user_clears_roots_groups(children: Children) -> None:
    """A group alone sets the gid and clears the supplementary groups, keeping uid 0."""
    child = children.start(cat(group="nogroup"))
    status = child.status()
    assert status["Uid"].split() == ["0"] * 4
    assert status["Gid"].split() == ["65534"] * 4
    assert status["Groups"] == ""


def test_no_user_leaves_credentials_alone() -> None:
    """Without user, group or supplementary_groups nothing is changed."""
    assert resolve_credentials(Process(exec=("cat",))) == Credentials()


def test_unknown_user_or_group_fails_at_stage_user() -> None:
    """Unknown names, and a bare uid without a passwd entry or group, are SpawnError("user")."""
    for process in (
        Process(exec=("cat",), user="no-such-user-sockvisor"),
        Process(exec=("cat",), group="no-such-group-sockvisor"),
        Process(exec=("cat",), supplementary_groups=("no-such-group-sockvisor",)),
        Process(exec=("cat",), user="4243"),
    ):
        with pytest.raises(SpawnError) as info:
            resolve_credentials(process)
        assert info.value.stage == "user"
    assert resolve_credentials(Process(exec=("cat",), user="4243", group="4244")) == Credentials(
        4243, 4244, () if os.geteuid() == 0 else None
    )


def test_working_directory(children: Children, tmp_path: Path) -> None:
    """working_directory is the child's cwd."""
    child = children.start(cat(working_directory=str(tmp_path)))
    assert os.readlink(f"/proc/{child.pid}/cwd") == str(tmp_path)


def test_missing_working_directory_fails_at_stage_chdir(tmp_path: Path) -> None:
    """A working_directory that does not exist is SpawnError("chdir", ENOENT), child reaped."""
    assert_no_children()
    with pytest.raises(SpawnError) as info:
        spawn_child(cat(working_directory=str(tmp_path / "missing")), [-1, -1, 2], listen_pid=True)
    assert (info.value.stage, info.value.errno) == ("chdir", errno.ENOENT)
    assert str(tmp_path / "missing") in str(info.value)
    assert_no_children()


def test_umask(children: Children) -> None:
    """umask is set in the child."""
    child = children.start(cat(umask=0o027))
    assert child.status()["Umask"] == "0027"


@pytest.mark.root
@skip_unless_root
def test_nice(children: Children) -> None:
    """nice sets the child's nice value (a negative one too, before privileges are dropped)."""
    child = children.start(cat(nice=7))
    assert os.getpriority(os.PRIO_PROCESS, child.pid) == 7
    other = children.start(cat(nice=-3, user="nobody"))
    assert os.getpriority(os.PRIO_PROCESS, other.pid) == -3


def test_rlimits(children: Children) -> None:
    """limits set soft and hard rlimits in the child, -1 meaning RLIM_INFINITY."""
    _, nofile_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    _, core_hard = resource.getrlimit(resource.RLIMIT_CORE)
    if os.geteuid() != 0 and core_hard != resource.RLIM_INFINITY:
        pytest.skip("raising a hard limit to infinity needs root")
    nofile = min(nofile_hard, 128)
    child = children.start(cat(limits=(("nofile", 64, nofile), ("core", -1, -1))))
    assert resource.prlimit(child.pid, resource.RLIMIT_NOFILE) == (64, nofile)
    infinity = resource.RLIM_INFINITY
    assert resource.prlimit(child.pid, resource.RLIMIT_CORE) == (infinity, infinity)


def test_unknown_limit_fails_in_prepare() -> None:
    """An rlimit name outside the SPEC's list is SpawnError("setrlimit") at prepare time."""
    with pytest.raises(SpawnError) as info:
        cat(limits=(("bogus", 1, 1),))
    assert info.value.stage == "setrlimit"


def test_setsid_makes_the_child_a_session_and_group_leader(children: Children) -> None:
    """With setsid (the default) the child's sid and pgid are its pid; without, they are ours."""
    child = children.start(cat())
    assert os.getsid(child.pid) == child.pid
    assert os.getpgid(child.pid) == child.pid
    plain = children.start(replace(cat(), setsid=False))
    assert os.getsid(plain.pid) == os.getsid(0)
    assert os.getpgid(plain.pid) == os.getpgid(0)


def test_signals_are_default_and_unblocked_in_the_child(children: Children) -> None:
    """Handled, ignored and blocked signals of the daemon all arrive at default in the child."""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    old_pipe = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    old_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    old_usr2 = signal.signal(signal.SIGUSR2, lambda signum, frame: None)
    try:
        child = children.start(cat())
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        signal.signal(signal.SIGPIPE, old_pipe)
        signal.signal(signal.SIGHUP, old_hup)
        signal.signal(signal.SIGUSR2, old_usr2)
    status = child.status()
    assert int(status["SigBlk"], 16) == 0
    assert int(status["SigIgn"], 16) == 0
    assert int(status["SigCgt"], 16) == 0
    # And the parent got its own state back.
    assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, set())


# ---------------------------------------------------------------------------- exec


def test_missing_program_fails_at_stage_execve_without_zombie() -> None:
    """execve of a missing file is SpawnError("execve", ENOENT) and the failed child is reaped."""
    assert_no_children()
    prepared = prepare(Process(exec=("/nonexistent/prog",)), unit="t", notify_socket=None, daemon_environ={})
    with pytest.raises(SpawnError) as info:
        spawn_child(prepared, [-1, -1, 2], listen_pid=True)
    assert (info.value.stage, info.value.errno) == ("execve", errno.ENOENT)
    assert "/nonexistent/prog" in str(info.value)
    assert_no_children()


def test_program_not_on_path_fails_in_prepare() -> None:
    """A bare name found nowhere on PATH is SpawnError("execve", ENOENT) before any spawn."""
    with pytest.raises(SpawnError) as info:
        prepare(Process(exec=("no-such-program-sockvisor",)), unit="t", notify_socket=None, daemon_environ={})
    assert (info.value.stage, info.value.errno) == ("execve", errno.ENOENT)


def test_resolve_executable_searches_path_like_execvp(tmp_path: Path) -> None:
    """A name with a slash is used as is; a bare one is the first executable file on PATH."""
    assert resolve_executable("./x/y") == "./x/y"
    assert resolve_executable("/no/such") == "/no/such"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "tool").write_text("not executable")
    (tmp_path / "a" / "dir").mkdir()
    (tmp_path / "b" / "tool").write_text("#!/bin/sh\n")
    (tmp_path / "b" / "tool").chmod(0o755)
    path = f"{tmp_path}/a:{tmp_path}/b"
    assert resolve_executable("tool", path) == f"{tmp_path}/b/tool"
    with pytest.raises(SpawnError):
        resolve_executable("dir", path)
    found = resolve_executable("cat")
    assert os.path.basename(found) == "cat"
    assert os.path.dirname(found) in DEFAULT_PATH.split(":")


def test_exit_status_reaches_the_caller() -> None:
    """The pid returned is the program's: its exit status is what waitpid reports."""
    prepared = prepare(Process(exec=("sh", "-c", "exit 7")), unit="t", notify_socket=None, daemon_environ={})
    pid = spawn_child(prepared, [-1, -1, 2], listen_pid=False)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 7


def test_extension_rejects_bad_arguments() -> None:
    """The C layer refuses NUL bytes, str, empty argv and out-of-range numbers with no child."""
    base: list[object] = [b"/bin/true", [b"true"], [], [-1, -1, 2], False, -1, -1, None, None, -1, 0, [], True]
    cases: list[tuple[int, object, type[Exception]]] = [
        (0, b"/bin/\0true", ValueError),
        (1, [b"tr\0ue"], ValueError),
        (1, ["true"], TypeError),
        (1, [], ValueError),
        (2, [b"A=1", "B=2"], TypeError),
        (3, [-2], ValueError),
        (5, 2**32, ValueError),
        (7, [-5], ValueError),
        (9, 0o1000, ValueError),
        (10, 40, ValueError),
        (11, [(0, 1)], TypeError),
    ]
    for index, value, error in cases:
        args = list(base)
        args[index] = value
        with pytest.raises(error):
            _spawn.spawn(*args)  # type: ignore[arg-type]
    assert_no_children()


def test_concurrent_spawns_from_threads() -> None:
    """Threads spawning at once (the GIL is released around vfork) each get their own child."""
    prepared = prepare(Process(exec=("env",)), unit="t", notify_socket=None, daemon_environ={})

    def spawn_some(_: int) -> list[bool]:
        results = []
        for _ in range(25):
            r, w = os.pipe()
            try:
                pid = spawn_child(prepared, [-1, w, 2], listen_pid=True)
            finally:
                os.close(w)
            output = read_all(r)
            os.close(r)
            os.waitpid(pid, 0)
            results.append(f"LISTEN_PID={pid}\n".encode() in output)
        return results

    with ThreadPoolExecutor(4) as pool:
        outcomes = [ok for batch in pool.map(spawn_some, range(4)) for ok in batch]
    assert outcomes == [True] * 100


# ---------------------------------------------------------------------------- cgroups


@pytest.fixture
def fresh_cgroup() -> Iterator[tuple[str, int]]:
    """An empty cgroup under the daemon's base for this process, and a directory fd of it."""
    from supervisor import cgroups

    base, why = cgroups.find_base()
    if base is None:
        pytest.skip(f"no writable cgroup v2 hierarchy here: {why}")
    group = cgroups.Group.create(base, "spawntest")
    fd = group.open()
    yield group.path, fd
    os.close(fd)
    group.remove()


def test_child_is_born_in_its_cgroup(fresh_cgroup: tuple[str, int]) -> None:
    """With a cgroup fd the child is in that cgroup from its first instruction, not moved there later.

    ``cat /proc/self/cgroup`` reads its cgroup as the first thing the program does: a spawn
    that moved the pid afterwards would lose that race now and then; twenty runs must all
    name the cgroup, and the parent never had to write to ``cgroup.procs``.
    """
    path, fd = fresh_cgroup
    prepared = prepare(Process(exec=("cat", "/proc/self/cgroup")), unit="t", notify_socket=None,
                       daemon_environ=os.environ)
    for _ in range(20):
        r, w = os.pipe()
        try:
            pid = spawn_child(prepared, [-1, w, 2], listen_pid=False, cgroup=fd)
        finally:
            os.close(w)
        try:
            output = read_all(r).decode()
        finally:
            os.close(r)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        own = next(line[3:] for line in output.splitlines() if line.startswith("0::"))
        assert own.endswith("/" + os.path.basename(path)), output
    assert Path(path, "cgroup.procs").read_text() == ""  # every child has gone; nothing left inside


_JOIN_SCRIPT = """
import os, sys
from supervisor.model import Process
from supervisor.spawn import prepare, spawn_child
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
prepared = prepare(Process(exec=("cat", "/proc/self/cgroup")), unit="t", notify_socket=None, daemon_environ={})
for _ in range(int(sys.argv[2])):
    r, w = os.pipe()
    pid = spawn_child(prepared, [-1, w, 2], listen_pid=False, cgroup=fd)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    sys.stdout.write(out.decode())
"""


def test_where_clone3_is_refused_the_child_joins_its_cgroup_before_its_exec(fresh_cgroup: tuple[str, int],
                                                                           tmp_path: Path) -> None:
    """Under a seccomp filter that fails clone3 with ENOSYS (Docker's default profile), the child
    cannot be born in the cgroup: it joins it itself before its exec, so what the program sees
    (and forks) is in the cgroup from its first instruction, in every one of twenty runs."""
    import platform
    import shutil
    import subprocess

    if platform.machine() != "x86_64" or shutil.which("gcc") is None:
        pytest.skip("the filter program is x86-64's and needs gcc")
    path, _fd = fresh_cgroup
    exe = tmp_path / "no_clone3"
    subprocess.run(["gcc", "-O1", "-o", str(exe), str(Path(__file__).parent.parent / "programs" / "no_clone3.c")],
                   check=True)
    done = subprocess.run([str(exe), sys.executable, "-c", _JOIN_SCRIPT, path, "20"], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).parent.parent.parent)
    assert done.returncode == 0, done.stderr
    own = [line[3:] for line in done.stdout.splitlines() if line.startswith("0::")]
    assert len(own) == 20 and all(o.endswith("/" + os.path.basename(path)) for o in own), done.stdout
    assert Path(path, "cgroup.procs").read_text() == ""


def test_spawn_into_a_cgroup_keeps_the_other_guarantees(fresh_cgroup: tuple[str, int], children: Children) -> None:
    """The clone3 path still renumbers fds, sets LISTEN_PID to the child's pid and reports exec failures."""
    path, fd = fresh_cgroup
    child = children.start(cat(), listen_pid=True, cgroup=fd)  # a round trip through its stdin and stdout
    assert f"LISTEN_PID={child.pid}" in child.environ()
    assert Path(path, "cgroup.procs").read_text().split() == [str(child.pid)]
    assert os.waitstatus_to_exitcode(children.finish(child)) == 0
    missing = prepare(Process(exec=("/nonexistent/prog",)), unit="t", notify_socket=None, daemon_environ={})
    with pytest.raises(SpawnError) as info:
        spawn_child(missing, [-1, -1, 2], listen_pid=False, cgroup=fd)
    assert (info.value.stage, info.value.errno) == ("execve", errno.ENOENT)


def test_a_fd_that_is_no_cgroup_fails_at_stage_cgroup_without_a_child(tmp_path: Path) -> None:
    """A directory that is not a cgroup: SpawnError("cgroup", ...), no process was created."""
    assert_no_children()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(SpawnError) as info:
            spawn_child(cat(), [-1, -1, 2], listen_pid=False, cgroup=fd)
    finally:
        os.close(fd)
    assert info.value.stage == "cgroup"
    assert_no_children()
