#!/usr/bin/env python3
"""Pool test worker: answers every connection on fd 3 with "<pid> <SOCKVISOR_WORKER>\\n".

It stops gracefully, as a real server should for a rolling restart: on SIGTERM
it stops accepting and exits 0 after the connection in hand, leaving what is
queued on the listening socket to the other workers (or to the new worker of
its slot). It never accepts after SIGTERM, so no accepted connection is dropped.

Options (argv): ``notify`` sends READY=1 once it is about to accept;
``stubborn`` ignores SIGTERM (for the stop_timeout test). Environment:
``POOL_CRASH_WORKER=N`` makes worker N exit 3 at once; ``POOL_FAIL_FILE=PATH``
makes a worker exit 4 at once when PATH exists (a broken new version);
``POOL_HANG_FILE=PATH`` makes it serve without ever sending READY=1 when PATH exists.
"""

import os
import select
import signal
import socket
import sys


def notify(msg: str) -> None:
    path = os.environ["NOTIFY_SOCKET"]
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(msg.encode(), path)


def main() -> None:
    worker = os.environ.get("SOCKVISOR_WORKER", "-")
    if os.environ.get("POOL_CRASH_WORKER") == worker:
        sys.exit(3)
    fail = os.environ.get("POOL_FAIL_FILE")
    if fail and os.path.exists(fail):
        sys.exit(4)
    lsock = socket.socket(fileno=3)
    lsock.setblocking(False)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    if "stubborn" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: None)  # the wakeup fd carries it
    reply = f"{os.getpid()} {worker}\n".encode()
    hang = os.environ.get("POOL_HANG_FILE")
    if "notify" in sys.argv and not (hang and os.path.exists(hang)):
        notify("READY=1\nSTATUS=serving")
    while True:
        readable, _, _ = select.select([lsock, wake_r], [], [])
        if wake_r in readable:
            if signal.SIGTERM in os.read(wake_r, 64):
                return
            continue
        try:
            conn, _ = lsock.accept()
        except BlockingIOError:
            continue  # another worker took it
        with conn:
            conn.setblocking(True)
            conn.sendall(reply)


if __name__ == "__main__":
    main()
