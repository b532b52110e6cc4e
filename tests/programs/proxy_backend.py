"""A backend that cannot take fds, for mode: proxy tests: it binds its own address.

    proxy_backend.py ADDRESS [--delay S] [--role echo|count|header|udp-echo] [--pidfile PATH]

ADDRESS is host:port, a unix path or @abstract. --delay waits before binding (a slow
cold start). Roles: ``echo`` echoes each connection; ``count`` reads to end of stream,
then answers ``COUNT <bytes>`` and closes (shows a half-close got through); ``header``
answers the first line or PROXY v2 block it received, hex-encoded; ``udp-echo`` echoes
datagrams prefixed with ``echo:``.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import sys
import threading
import time


def _address(text: str) -> tuple[int, object]:
    if text.startswith("@"):
        return socket.AF_UNIX, "\0" + text[1:]
    if text.startswith("/"):
        return socket.AF_UNIX, text
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))


def _serve_conn(conn: socket.socket, role: str) -> None:
    with conn:
        if role == "echo":
            while data := conn.recv(1 << 16):
                conn.sendall(data)
        elif role == "count":
            total = 0
            while data := conn.recv(1 << 16):
                total += len(data)
            conn.sendall(f"COUNT {total}\n".encode())
        elif role == "header":
            data = b""
            conn.settimeout(5)
            while True:
                chunk = conn.recv(1)
                if not chunk:
                    break
                data += chunk
                if data.startswith(b"PROXY") and data.endswith(b"\r\n"):
                    break
                v2 = data.startswith(b"\r\n\r\n\x00\r\nQUIT\n") and len(data) >= 16
                if v2 and len(data) == 16 + int.from_bytes(data[14:16], "big"):
                    break
            conn.sendall(data.hex().encode() + b"\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("address")
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--role", default="echo")
    ap.add_argument("--pidfile")
    args = ap.parse_args()
    if args.pidfile:
        with open(args.pidfile, "a") as f:
            f.write(f"{os.getpid()}\n")
    if args.delay:
        time.sleep(args.delay)  # wait-ok: the program's own life, not a synchronization
    family, address = _address(args.address)
    if args.role == "udp-echo":
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(address)
        while True:
            data, peer = s.recvfrom(65535)
            s.sendto(b"echo:" + data, peer)
    s = socket.socket(family, socket.SOCK_STREAM)
    if family != socket.AF_UNIX:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    elif isinstance(address, str) and not address.startswith("\0") and os.path.exists(address):
        os.unlink(address)
    s.bind(address)
    s.listen(1024)
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=_serve_conn, args=(conn, args.role), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
