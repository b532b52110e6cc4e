"""``sockvisor fds``: run inside a service to see which fds it was given, one line each.

Theory of operation
-------------------
The command is the service (it must be exec'd directly by the supervisor, because the fds belong
to ``LISTEN_PID`` only), so it reads the protocol with :mod:`supervisor.activation` exactly as a
daemon would, without unsetting anything (it exits right after), and prints::

    FD NAME FAMILY TYPE ADDRESS STATE
    3 http inet stream 127.0.0.1:8080 listening
    4 web.sock unix stream /run/web.sock listening
    5 events fifo - /run/events.fifo -

Six space-separated fields, ``-`` for an empty or meaningless one: families are ``inet``,
``inet6``, ``unix``, ``netlink``, ``vsock``... or ``fifo``/``file`` for non-sockets; types are
``stream``, ``dgram``, ``seqpacket``, ``raw``; addresses look like systemd's (``[::]:8080``,
``@abstract``); the state is ``listening``/``not-listening`` (``SO_ACCEPTCONN``) for sockets.
Exit 1 with one line on stderr when nothing was passed or ``LISTEN_*`` is malformed.
"""

from __future__ import annotations

import argparse
import socket
import sys
from typing import Final, NoReturn

from supervisor.activation import InheritedSocket, listen_sockets
from supervisor.addresses import format_sockaddr

PROG: Final = "sockvisor fds"
_FAMILIES: Final[dict[int, str]] = {
    socket.AF_INET: "inet",
    socket.AF_INET6: "inet6",
    socket.AF_UNIX: "unix",
    socket.AF_NETLINK: "netlink",
    socket.AF_PACKET: "packet",
    socket.AF_VSOCK: "vsock",
}
_TYPES: Final[dict[int, str]] = {
    socket.SOCK_STREAM: "stream",
    socket.SOCK_DGRAM: "dgram",
    socket.SOCK_SEQPACKET: "seqpacket",
    socket.SOCK_RAW: "raw",
}


def _field(text: str) -> str:
    # Keep exactly six whitespace-separated fields whatever a name or path contains.
    if not text:
        return "-"
    return "".join(c if c.isprintable() and not c.isspace() else f"\\x{ord(c):02x}" for c in text)


def format_address(item: InheritedSocket) -> str:
    """The local address as systemd prints it: ``127.0.0.1:80``, ``[::]:80``, a path, ``@name``."""
    return format_sockaddr(item.family, item.address, scope_names=False)


def describe(item: InheritedSocket) -> str:
    """One output line for one inherited fd."""
    if item.kind != "socket":
        family = "fifo" if item.kind == "fifo" else "file"
        return f"{item.fd} {_field(item.name)} {family} - {_field(format_address(item))} -"
    family = _FAMILIES.get(item.family, f"family-{item.family}")
    kind = _TYPES.get(item.type, f"type-{item.type}")
    state = "listening" if item.listening else "not-listening"
    return f"{item.fd} {_field(item.name)} {family} {kind} {_field(format_address(item))} {state}"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


def main(argv: list[str]) -> int:
    """``sockvisor fds``: print the inherited fds.

    Args:
        argv: Everything after the word ``fds`` (no arguments are accepted).

    Returns:
        0 when fds were described, 1 when none were passed (or the variables are malformed),
        2 on a usage error.
    """
    parser = _Parser(prog=PROG, description="Describe the file descriptors passed with LISTEN_FDS.")
    try:
        parser.parse_args(argv)
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    try:
        items = listen_sockets(unset_environment=False)
    except (ValueError, OSError) as exc:
        print(f"{PROG}: cannot read the passed fds: {exc}", file=sys.stderr)
        return 1
    if not items:
        print(
            f"{PROG}: no file descriptors were passed (LISTEN_FDS/LISTEN_PID not set for this process)", file=sys.stderr
        )
        return 1
    for item in items:
        print(describe(item))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
