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
def hub_open() -> int: ...
def hub_close() -> None: ...
def watchdog_kills() -> int: ...
def hub_pause(paused: bool, /) -> None: ...
def hub_drain(
    collect: bool, /
) -> tuple[
    list[tuple[Engine, list[tuple[int, float, str]], list[tuple[str, int, str]], int]],
    list[tuple[int, int, float]],
]: ...
def signal_child(pid: int, signal: int, group: bool, /) -> bool: ...

class Engine:
    """One bulk accept unit on the hub: its listeners, its grant, its records."""

    live: int
    def __init__(self) -> None: ...
    def add(self, listen_fd: int, template: Template, /) -> None: ...
    def clear(self) -> None: ...
    def grant(self, n: int, want_remote: bool, /) -> int: ...
    def close(self) -> None: ...
