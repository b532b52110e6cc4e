#!/usr/bin/env python3
"""Test service: stores a client connection, then fails; the next process answers that client.

The first process accepts one connection on fd 3, reads one line, stores the connection
(FDSTORE=1, FDNAME=conn) and exits 3 without answering. A later process finds "conn" in
LISTEN_FDNAMES, reads the client's next line on it and answers "answered <pid> <line>".
"""

import os
import signal
import socket
import sys

from supervisor import activation


def read_line(conn: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def main() -> None:
    inherited = activation.listen_fds_with_names()
    stored = [fd for fd, name in inherited if name == "conn"]
    if stored:
        conn = socket.socket(fileno=stored[0])
        conn.setblocking(True)
        activation.notify_ready(status="resumed")
        conn.sendall(f"answered {os.getpid()} {read_line(conn)}\n".encode())
        while True:
            signal.pause()
    lsock = socket.socket(fileno=inherited[0][0])
    lsock.setblocking(True)
    activation.notify_ready(status="fresh")
    conn, _ = lsock.accept()
    read_line(conn)
    activation.store_fds([conn.fileno()], name="conn")
    sys.exit(3)


if __name__ == "__main__":
    main()
