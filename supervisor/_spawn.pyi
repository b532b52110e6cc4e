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
    /,
) -> int: ...

def sigchld_fd() -> int: ...
def trim() -> None: ...
