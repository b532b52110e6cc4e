#!/usr/bin/env python3
"""Test service: says READY=1, then floods its notify socket with STATUS= for argv[1] seconds.

The socket is blocking, so once the daemon leaves it unread the sender waits on the full
buffer. Afterwards it sends STATUS=done sent=<N> and waits for a signal.
"""

import os
import signal
import socket
import sys
import time

from supervisor import activation


def main() -> None:
    seconds = float(sys.argv[1])
    activation.notify_ready(status="flooding")
    path = os.environ["NOTIFY_SOCKET"]
    address = "\0" + path[1:]
    sent = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                s.sendto(f"STATUS=flood {sent}\nWATCHDOG=1".encode(), address)
                sent += 1
            except TimeoutError:
                pass  # the daemon left the socket unread: the buffer is full
    activation.notify_status(f"done sent={sent}")
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
