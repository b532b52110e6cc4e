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

class Engine:
    """Accept mode's engine: a thread that accepts, spawns and reaps for one unit."""

    fd: int
    live: int
    def __init__(self) -> None: ...
    def add(self, listen_fd: int, template: Template, /) -> None: ...
    def clear(self) -> None: ...
    def grant(self, n: int, want_remote: bool, /) -> int: ...
    def woken(self) -> bool: ...
    def drain(
        self,
    ) -> tuple[list[tuple[int, float, str]], list[tuple[str, int, str]], list[tuple[int, int, float]], int]: ...
    def kill(self, pid: int, signal: int, /) -> bool: ...
    def close(self) -> list[int]: ...
    def stop(self) -> None: ...
    def start(self) -> None: ...
