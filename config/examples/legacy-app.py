#!/usr/bin/env python3
"""A daemon that cannot take fds: it binds its own port (argv[1]) and answers HTTP.

The proxied-web example puts sockvisor's mode: proxy in front of it: the first
connection starts it, sockvisor holds the client until it listens, forwards the
bytes, and stops it after a quiet minute.
"""

import http.server
import sys


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello from a daemon that binds its own port\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Hello).serve_forever()
