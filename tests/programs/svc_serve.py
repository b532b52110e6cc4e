#!/usr/bin/env python3
"""Test service: serves every connection on the first inherited stream socket
with "<pid> <SOCKVISOR_WORKER>\n" until killed; optional READY=1 on NOTIFY_SOCKET
(argv "notify"), optional ignoring of SIGTERM (argv "stubborn")."""

import os
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
    if "stubborn" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    lsock = socket.socket(fileno=3)
    lsock.setblocking(True)
    if "notify" in sys.argv:
        notify("READY=1\nSTATUS=serving")
    worker = os.environ.get("SOCKVISOR_WORKER", "-")
    while True:
        conn, _ = lsock.accept()
        with conn:
            conn.sendall(f"{os.getpid()} {worker}\n".encode())


if __name__ == "__main__":
    main()
