"""An accept-mode child that reports what it was given, as one JSON document on the connection.

It writes ``{"pid", "env", "fds": {n: {"nonblock", "cloexec", "socket"}}}`` to the connection
(fd 3 when ``LISTEN_FDS`` is set, else stdout), then exits. With ``--stderr`` it also writes
``to-stderr`` on fd 2, so a test can see where stderr goes.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import sys


def describe(fd: int) -> dict[str, bool] | None:
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fdflags = fcntl.fcntl(fd, fcntl.F_GETFD)
        mode = os.fstat(fd).st_mode
    except OSError:
        return None
    return {"nonblock": bool(flags & os.O_NONBLOCK), "cloexec": bool(fdflags & fcntl.FD_CLOEXEC),
            "socket": stat.S_ISSOCK(mode)}


def main() -> None:
    fds = {str(fd): d for fd in range(0, 16) if (d := describe(fd)) is not None}
    report = json.dumps({"pid": os.getpid(), "env": dict(os.environ), "fds": fds}).encode()
    out = 3 if os.environ.get("LISTEN_FDS") else 1
    if "--stderr" in sys.argv:
        os.write(2, b"to-stderr\n")
    os.write(out, report)


main()
