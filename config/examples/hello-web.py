#!/usr/bin/env python3
"""A tiny socket-activated HTTP server, standard library only.

It serves every listening socket it inherits (LISTEN_FDS, as systemd and
sockvisor pass them), tells its supervisor READY=1 on NOTIFY_SOCKET, and
answers each request with a greeting naming the fd it came through.
"""

import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def inherited() -> list[tuple[socket.socket, str]]:
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        raise SystemExit("hello-web: no sockets passed (run me under sockvisor or systemd-socket-activate)")
    count = int(os.environ.get("LISTEN_FDS", "0"))
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    return [(socket.socket(fileno=3 + i), names[i] if i < len(names) else "unknown") for i in range(count)]


def notify(message: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), path)


def serve(sock: socket.socket, name: str) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"Hello from pid {os.getpid()} via {name!r} ({self.path})\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

        def address_string(self) -> str:
            return str(self.client_address or "unix")

    server = ThreadingHTTPServer(("", 0), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.socket.setblocking(True)
    server.serve_forever()


def main() -> None:
    socks = inherited()
    threads = [threading.Thread(target=serve, args=s, daemon=True) for s in socks]
    for t in threads:
        t.start()
    notify(f"READY=1\nSTATUS=serving {len(socks)} sockets")
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
