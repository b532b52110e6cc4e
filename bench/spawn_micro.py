"""Micro-benchmark: what one child costs the daemon, spawn_child against subprocess.Popen.

Spawns /bin/true N times one after the other (spawn, then wait) with each method and prints,
per spawn, the parent's CPU time (time.process_time: what the daemon's event loop pays, the
child's own exec excluded) and the wall time (spawn + the child's whole life + the wait).

The budget it checks: accept mode must spend < 100us of daemon CPU per connection to keep up
with tcpserver/xinetd. ``--ballast-mb`` makes the parent fat first (touched memory), which is
where fork() and anything that copies page tables fall behind and vfork does not.

    python3 bench/spawn_micro.py [-n 2000] [--ballast-mb 0]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections.abc import Callable

from supervisor.model import Process, Stderr
from supervisor.spawn import prepare, spawn_child

PROGRAM = "/bin/true"


def measure(name: str, count: int, once: Callable[[], None]) -> None:
    once()  # warm up: imports, caches
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(count):
        once()
    cpu = (time.process_time() - cpu0) / count * 1e6
    wall = (time.perf_counter() - wall0) / count * 1e6
    print(f"{name:<28} parent CPU {cpu:8.1f} us/spawn   wall {wall:8.1f} us/spawn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--count", type=int, default=2000)
    parser.add_argument("--ballast-mb", type=int, default=0, help="touch this much memory first")
    args = parser.parse_args()

    ballast = bytearray(args.ballast_mb << 20)
    for offset in range(0, len(ballast), 4096):  # fault every page in
        ballast[offset] = 1

    prepared = prepare(
        Process(exec=(PROGRAM,), stderr=Stderr.NULL),
        unit="bench",
        notify_socket=None,
        daemon_environ=os.environ,
    )
    # The shape of an accept-mode spawn: connection on stdio, LISTEN_PID, REMOTE_* per spawn.
    extra = (b"REMOTE_ADDR=127.0.0.1", b"REMOTE_PORT=40000")
    null = os.open(os.devnull, os.O_RDWR)

    def with_spawn_child() -> None:
        pid = spawn_child(prepared, (null, null, -1), extra, listen_pid=True)
        os.waitpid(pid, 0)

    env = {"PATH": "/usr/bin:/bin", "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "40000"}

    def with_popen() -> None:
        subprocess.Popen(
            [PROGRAM], stdin=null, stdout=null, stderr=subprocess.DEVNULL, env=env, start_new_session=True
        ).wait()

    def with_posix_spawn() -> None:
        pid = os.posix_spawn(PROGRAM, [PROGRAM], env, file_actions=[(os.POSIX_SPAWN_DUP2, null, 0)])
        os.waitpid(pid, 0)

    print(f"{args.count} x {PROGRAM}, parent RSS ballast {args.ballast_mb} MiB, pid {os.getpid()}")
    measure("supervisor.spawn_child", args.count, with_spawn_child)
    measure("subprocess.Popen", args.count, with_popen)
    measure("os.posix_spawn (no LISTEN_PID)", args.count, with_posix_spawn)
    os.close(null)
    del ballast


if __name__ == "__main__":
    main()
