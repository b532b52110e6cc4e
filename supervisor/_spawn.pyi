from collections.abc import Sequence

class SpawnFailure(Exception):
    """A child could not be started; ``args`` is ``(stage, errno)``."""

def spawn(
    path: bytes,
    argv: Sequence[bytes],
    envp: Sequence[bytes],
    fds: Sequence[int],
    pid_vars: bool | Sequence[bytes],
    uid: int,
    gid: int,
    groups: Sequence[int] | None,
    cwd: bytes | None,
    umask: int,
    nice: int,
    rlimits: Sequence[tuple[int, int, int]],
    setsid: bool,
    cgroup_fd: int = -1,
    /,
) -> int: ...

def sigchld_fd() -> int: ...
def trim() -> None: ...

class Template:
    """A unit's spawn arguments, converted once for ``accept_spawn``."""

def template(
    path: bytes,
    argv: Sequence[bytes],
    envp: Sequence[bytes],
    fds: Sequence[int],
    listen_pid: bool,
    remote: int,
    uid: int,
    gid: int,
    groups: Sequence[int] | None,
    cwd: bytes | None,
    umask: int,
    nice: int,
    rlimits: Sequence[tuple[int, int, int]],
    setsid: bool,
    /,
) -> Template: ...
def accept_spawn(
    template: Template, listen_fd: int, budget: int, want_remote: bool, /
) -> tuple[list[int], list[str] | None, list[tuple[str, int, str]], int]: ...
def reap(signal_fd: int, /) -> list[tuple[int, int]]: ...
