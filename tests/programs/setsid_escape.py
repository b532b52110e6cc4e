#!/usr/bin/env python3
"""A service whose grandchild escapes its process group: it double-forks, the grandchild calls
setsid(), writes its pid to argv[1] and sleeps holding the listening socket; the main process
answers every connection on fd 3 with its pid."""

import os
import socket
import sys
import time


def main() -> None:
    pidfile = sys.argv[1]
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            with open(pidfile + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(pidfile + ".tmp", pidfile)
            time.sleep(3600)  # wait-ok: the program's own life, not a synchronization
        os._exit(0)
    os.wait()
    lsock = socket.socket(fileno=3)
    lsock.setblocking(True)
    while True:
        conn, _ = lsock.accept()
        with conn:
            conn.sendall(f"{os.getpid()}\n".encode())


if __name__ == "__main__":
    main()
