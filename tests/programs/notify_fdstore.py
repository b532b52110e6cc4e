#!/usr/bin/env python3
"""Test service: keeps a client connection in the fd store across its own restart.

The first process accepts one connection on fd 3, answers the client's first line with
"first <pid> <line>", stores the connection (FDSTORE=1, FDNAME=conn) and waits to be
restarted. A later process finds "conn" after the listening fds in LISTEN_FDNAMES and answers
the next line on that same connection with "second <pid> <line>".
"""

import os
import signal
import socket

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
    names = ":".join(name for _, name in inherited)
    if stored:
        conn = socket.socket(fileno=stored[0])
        conn.setblocking(True)
        activation.notify_ready(status=f"resumed names={names}")
        conn.sendall(f"second {os.getpid()} {read_line(conn)}\n".encode())
    else:
        lsock = socket.socket(fileno=inherited[0][0])
        lsock.setblocking(True)
        activation.notify_ready(status=f"fresh names={names}")
        conn, _ = lsock.accept()
        line = read_line(conn)
        activation.store_fds([conn.fileno()], name="conn")
        conn.sendall(f"first {os.getpid()} {line}\n".encode())
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
