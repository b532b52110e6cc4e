#!/usr/bin/env python3
"""Test service for the notify protocol, driven by its arguments (run with PYTHONPATH at the repo).

On start it sends ``STATUS=names=<LISTEN_FDNAMES> watchdog=<interval> wpid=<WATCHDOG_PID>``,
then, in argument order:

- ``store:NAME:N``   (only when no stored fd came back) store N fresh pipe fds as NAME
- ``remove:NAME``    FDSTOREREMOVE=1 for NAME
- ``garbage``        send an oversized, a malformed and a non-UTF-8 datagram, and a malformed
                     one carrying a pipe fd; wait until the daemon closed that fd (EOF)
- ``show-socket``    STATUS=socket=<NOTIFY_SOCKET> (for a foreign sender in the test)
- ``no-ready``       never send READY=1 (a start that times out)
- ``pings:N``        after READY=1, send WATCHDOG=1 N times at a quarter of the interval, then
                     fall silent
- ``stopping``       on SIGTERM send STOPPING=1, then exit 0

READY=1 comes after every store/remove/garbage step (one socket keeps the order, so the daemon
has handled them when it logs child_ready). Then the process waits for a signal.
"""

import array
import os
import signal
import socket
import sys
import time

from supervisor import activation


def send_raw(data: bytes, fds: list[int] | None = None) -> None:
    path = os.environ["NOTIFY_SOCKET"]
    address = "\0" + path[1:] if path.startswith("@") else path
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        s.sendmsg([data], anc, 0, address)


def garbage() -> None:
    send_raw(b"STATUS=" + b"x" * 5000)  # over the 4096-byte limit
    send_raw(b"READY")  # a line without '='
    send_raw(b"STATUS=\xff\xfe")  # not UTF-8
    r, w = os.pipe()
    send_raw(b"NOT A FIELD", [w])
    os.close(w)
    # EOF only once the daemon has closed its copy of the write end.
    assert os.read(r, 1) == b""
    os.close(r)


def main() -> None:
    args = sys.argv[1:]
    names = os.environ.get("LISTEN_FDNAMES", "")
    interval = activation.watchdog_enabled()
    got_stored = len(names.split(":")) > 1
    activation.notify_status(f"names={names} watchdog={interval} wpid={os.environ.get('WATCHDOG_PID')}")
    if "stopping" in args:
        def on_term(signum: int, frame: object) -> None:
            activation.notify_stopping()
            os._exit(0)
        signal.signal(signal.SIGTERM, on_term)
    keep: list[int] = []
    pings = 0
    for arg in args:
        op, _, rest = arg.partition(":")
        if op == "store" and not got_stored:
            name, count = rest.split(":")
            for _ in range(int(count)):
                r, w = os.pipe()
                keep += (r, w)
                activation.store_fds([r], name=name)
        elif op == "remove":
            activation.remove_stored_fds(rest)
        elif op == "garbage":
            garbage()
        elif op == "show-socket":
            activation.notify_status(f"socket={os.environ['NOTIFY_SOCKET']}")
        elif op == "pings":
            pings = int(rest)
    if "no-ready" not in args:
        activation.notify_ready()
    if pings and interval:
        for _ in range(pings):
            time.sleep(interval / 4)  # wait-ok: the program's own ping rhythm, not a test wait
            activation.notify_watchdog()
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
