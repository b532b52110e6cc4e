"""``sockvisor activate``: test a socket-activated daemon by hand (after ``systemd-socket-activate``).

Theory of operation
-------------------
This is a drop-in for systemd's ``systemd-socket-activate(1)`` (same flags, same child view,
same log lines), checked side by side against systemd 252's binary. It is deliberately
light (standard library plus :mod:`supervisor.activation` and the address syntax of
:mod:`supervisor.addresses`) and knows nothing of units, configs or the daemon.

1. *Inherit.* fds passed to us with ``LISTEN_FDS`` are passed on in their original positions
   (3 ..), as systemd-socket-activate does; our own listeners follow them.
2. *Bind.* Every ``-l ADDR`` becomes one socket (``SO_REUSEADDR``, ``listen(SOMAXCONN)`` unless
   datagram). One line per socket goes to stderr: ``Listening on 127.0.0.1:8080 as 3.`` with the
   fd number the child will see.
3. *Wait.* ``poll()`` on every listener until one is readable (a connection or datagram is
   queued); ``--now`` skips this. No data is consumed, so the daemon finds it waiting.
4. Without ``--accept``: *exec* the command in this very process, so ``LISTEN_PID`` is simply
   our pid. The fds are moved into place (3, 4, ...) right before ``execvpe``, every other fd is
   marked close-on-exec, and the signals Python ignores (``SIGPIPE``, ``SIGXFSZ``) are reset so
   the daemon starts with a normal disposition.
   With ``--accept``: *serve*: accept each connection and fork/exec one child for it with the
   connection as fd 3 (``LISTEN_FDS=1``); children are reaped through pidfds in the same
   ``poll()`` set, so there is no signal handler and no polling timer.
5. ``--inetd`` puts the socket (or the connection) on stdin and stdout instead, with no
   ``LISTEN_*`` variables; stderr stays ours.

The child's environment is built fresh, as systemd-socket-activate does: only ``TERM``,
``PATH``, ``USER`` and ``HOME`` are copied from ours, then ``LISTEN_FDS``, ``LISTEN_PID``,
``LISTEN_FDNAMES`` (only with ``--fdname``), then every ``-E``. The parent never modifies its own
``os.environ``.

Deliberate differences from systemd-socket-activate, for the sake of the project's rules:
usage errors (bad flags, a bad address, ``--inetd`` with several sockets) exit 2 before anything
is bound, bind failures exit 1; a unix socket node that a live process still answers on is an
error instead of being unlinked and stolen (a stale node is replaced, as systemd does); ``--now``
is ours; the environment copy matches ``TERM``/``USER`` exactly (systemd 252 matches them as
prefixes, so ``TERMINFO=`` could stand in for ``TERM=``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import os
import re
import select
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NoReturn

from supervisor import addresses, fsnodes
from supervisor.activation import SD_LISTEN_FDS_START, listen_fds
from supervisor.model import valid_fdname

PROG: Final = "sockvisor activate"
# Environment variables systemd-socket-activate copies from its own environment.
_COPIED_VARIABLES: Final = ("TERM", "PATH", "USER", "HOME")
# systemd's fdname_is_valid(): printable, no ':', at most FDNAME_MAX characters. Invalid names
# are only warned about (as systemd-socket-activate does); the child may reject them.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PR_SET_PDEATHSIG: Final = 1
# accept() failures that only mean "that connection went away": try the next one.
_ACCEPT_AGAIN: Final = frozenset(
    {errno.EAGAIN, errno.EINTR, errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT}
    | {errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH}
)


class UsageError(Exception):
    """The command line is wrong (exit 2)."""


class RuntimeFailure(Exception):
    """Something failed at run time: bind, accept, fork (exit 1)."""


# --------------------------------------------------------------------------------------------
# Addresses (pure)


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """A parsed ``-l`` argument: what to pass to ``socket()`` and ``bind()``."""

    text: str
    family: int
    sockaddr: str | bytes | tuple[str, int] | tuple[str, int, int, int]

    @property
    def unix_path(self) -> str | None:
        """The filesystem path of a (non-abstract) unix socket, else None."""
        return self.sockaddr if isinstance(self.sockaddr, str) else None


def _ipv6_supported() -> bool:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def parse_address(text: str) -> ListenAddress:
    """Parse a ``-l`` argument the way systemd's ``socket_address_parse()`` does.

    Accepted: ``PORT`` (all addresses: ``[::]`` dual stack when IPv6 is available, else
    ``0.0.0.0``), ``IPV4:PORT``, ``[IPV6]:PORT`` (``[fe80::1%eth0]:PORT`` with a scope),
    ``/absolute/path`` and ``@abstract``. Host names are not resolved, as in systemd. The
    syntax is the config's (``supervisor.addresses``); this only turns it into a sockaddr.

    Args:
        text: The argument.

    Returns:
        The parsed address.

    Raises:
        UsageError: The address is malformed.
    """
    try:
        parsed = addresses.parse_any(text)
    except (ValueError, OSError) as exc:
        raise UsageError(f"invalid listen address {text!r}: {exc}") from None
    if isinstance(parsed, str):
        if parsed.startswith("@"):
            return ListenAddress(text, socket.AF_UNIX, b"\0" + os.fsencode(parsed[1:]))
        return ListenAddress(text, socket.AF_UNIX, parsed)
    if parsed.any_dual_stack:
        if _ipv6_supported():
            return ListenAddress(text, socket.AF_INET6, ("::", parsed.port, 0, 0))
        return ListenAddress(text, socket.AF_INET, ("0.0.0.0", parsed.port))
    if parsed.family == socket.AF_INET6:
        host = parsed.host.partition("%")[0]
        return ListenAddress(text, socket.AF_INET6, (host, parsed.port, 0, parsed.scope_id))
    return ListenAddress(text, socket.AF_INET, (parsed.host, parsed.port))


def pretty_address(family: int, address: object) -> str:
    """Format a ``getsockname()`` result as systemd's ``sockaddr_pretty()`` does."""
    return addresses.format_sockaddr(family, address, scope_names=False, unnamed="<unnamed>")


def _fd_pretty(fd: int) -> str:
    sock = socket.socket(fileno=fd)
    try:
        return pretty_address(sock.family, sock.getsockname())
    except OSError:
        return "n/a"
    finally:
        sock.detach()


# --------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    """argparse, but errors become one line (raised), never a usage dump plus ``sys.exit``."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


@dataclass(frozen=True, slots=True)
class Options:
    """The parsed command line."""

    addresses: tuple[ListenAddress, ...]
    accept: bool
    socket_type: int
    inetd: bool
    setenv: tuple[tuple[str, str], ...]
    fdnames: tuple[str, ...] | None
    now: bool
    command: tuple[str, ...]


def _build_parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        description="Listen on sockets and launch the command on the first connection "
        "(or one instance per connection with --accept).",
        epilog="Options stop at the first argument that is not one; use -- before a command that starts with '-'.",
    )
    parser.add_argument(
        "-l",
        "--listen",
        action="append",
        default=[],
        metavar="ADDR",
        help="listen on ADDR: PORT, IPV4:PORT, [IPV6]:PORT, /path or @abstract",
    )
    parser.add_argument("-a", "--accept", action="store_true", help="spawn a separate child for each connection")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("-d", "--datagram", action="store_true", help="listen on datagram sockets")
    kind.add_argument("--seqpacket", action="store_true", help="listen on SOCK_SEQPACKET sockets")
    parser.add_argument("--inetd", action="store_true", help="pass the socket (or connection) as stdin and stdout")
    parser.add_argument(
        "-E",
        "--setenv",
        "--environment",
        action="append",
        default=[],
        metavar="VAR[=VAL]",
        help="set VAR in the child (copied from ours without =VAL)",
    )
    parser.add_argument(
        "--fdname", action="append", default=None, metavar="NAME[:NAME...]", help="names for the fds (LISTEN_FDNAMES)"
    )
    parser.add_argument(
        "--now", action="store_true", help="start the command at once instead of on the first connection"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    return parser


def _split_fdnames(values: list[str]) -> tuple[str, ...]:
    """``--fdname`` as systemd-socket-activate reads it: split on ':', empty pieces dropped,
    and an option with no name at all counts as one empty name."""
    names: list[str] = []
    for value in values:
        pieces = [piece for piece in value.split(":") if piece]
        for piece in pieces:
            if not valid_fdname(piece):
                _log(f'File descriptor name "{piece.encode("unicode_escape").decode()}" is not valid.')
        names.extend(pieces or [""])
    return tuple(names)


def _parse_setenv(values: list[str]) -> tuple[tuple[str, str], ...]:
    result: list[tuple[str, str]] = []
    for value in values:
        name, equals, text = value.partition("=")
        if not _ENV_NAME.fullmatch(name):
            raise UsageError(f"cannot assign environment variable {value!r}: invalid name")
        # Without "=VAL" the value comes from our environment, or is empty (systemd's rule).
        result.append((name, text if equals else os.environ.get(name, "")))
    return tuple(result)


def parse_args(argv: Sequence[str]) -> Options:
    """Parse the ``activate`` arguments (everything after the word ``activate``).

    Args:
        argv: The arguments.

    Returns:
        The options.

    Raises:
        UsageError: The arguments are wrong.
        SystemExit: ``--help`` was given (after printing the help).
    """
    ns = _build_parser().parse_args(list(argv))
    command = list(ns.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("command to execute is missing")
    socket_type = socket.SOCK_DGRAM if ns.datagram else socket.SOCK_SEQPACKET if ns.seqpacket else socket.SOCK_STREAM
    if ns.accept and socket_type == socket.SOCK_DGRAM:
        raise UsageError("datagram sockets do not accept connections: --datagram and --accept may not be combined")
    return Options(
        addresses=tuple(parse_address(text) for text in ns.listen),
        accept=ns.accept,
        socket_type=socket_type,
        inetd=ns.inetd,
        setenv=_parse_setenv(ns.setenv),
        fdnames=None if ns.fdname is None else _split_fdnames(ns.fdname),
        now=ns.now,
        command=tuple(command),
    )


# --------------------------------------------------------------------------------------------
# Effects


def _log(line: str) -> None:
    # Unprefixed, like systemd-socket-activate's log lines, so scripts can wait for them.
    print(line, file=sys.stderr, flush=True)


def bind(address: ListenAddress, socket_type: int) -> socket.socket:
    """Create, bind and (unless datagram) listen, as systemd's ``make_socket_fd()``.

    Unix path sockets get their parent directories created (0755) and mode 0644, as systemd
    does for ``systemd-socket-activate``.

    Args:
        address: Where.
        socket_type: ``SOCK_STREAM``, ``SOCK_DGRAM`` or ``SOCK_SEQPACKET``.

    Returns:
        The socket: blocking (as systemd-socket-activate passes it), close-on-exec until moved
        into place for the child.

    Raises:
        RuntimeFailure: It cannot be bound.
    """
    sock = socket.socket(address.family, socket_type | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        path = address.unix_path
        if path is None:
            sock.bind(address.sockaddr)
        else:
            # The daemon's rule (supervisor.fsnodes): parents walked without
            # following planted links, only a stale node of ours replaced
            # (a live one is never stolen), the mode set on the node bound.
            fsnodes.bind_socket(sock, path, mode=0o644, directory_mode=0o755)
        if socket_type != socket.SOCK_DGRAM:
            sock.listen(socket.SOMAXCONN)
    except fsnodes.PathError as exc:
        sock.close()
        raise RuntimeFailure(f"cannot listen on {address.text}: {exc.reason}") from None
    except OSError as exc:
        sock.close()
        raise RuntimeFailure(f"cannot listen on {address.text}: {exc.strerror or exc}") from None
    return sock


def _set_cloexec_except(keep: set[int]) -> None:
    """Mark every open fd >= 3 not in ``keep`` close-on-exec, so the child sees only its fds.

    Closing them would be wrong here: Python objects may still own some of them.
    """
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):  # the listing's own fd is already gone
                os.set_inheritable(fd, False)


def _move_fd(src: int, dst: int) -> None:
    """``dup2(src, dst)`` leaving ``dst`` inheritable (dup2 onto itself keeps the flags)."""
    if src == dst:
        os.set_inheritable(dst, True)
    else:
        os.dup2(src, dst, inheritable=True)


def _reset_signals() -> None:
    # Python ignores SIGPIPE and SIGXFSZ, and an ignored disposition survives exec; a daemon
    # must start with the defaults, as it would under systemd.
    for signum in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def child_environment(options: Options, n_fds: int, pid: int) -> dict[str, str]:
    """The environment systemd-socket-activate gives the child (pure but for reading ours).

    Args:
        options: The command line.
        n_fds: How many fds the child gets at 3.. (ignored with ``--inetd``).
        pid: The child's pid for ``LISTEN_PID``.

    Returns:
        The environment.
    """
    env = {name: os.environ[name] for name in _COPIED_VARIABLES if name in os.environ}
    if not options.inetd:
        env["LISTEN_FDS"] = str(n_fds)
        env["LISTEN_PID"] = str(pid)
        if options.fdnames is not None:
            names = list(options.fdnames)
            if len(names) == 1:
                names *= n_fds  # one name names them all
            elif len(names) != n_fds:
                _log(f"The number of fd names is different than number of fds: {len(names)} vs {n_fds}")
            env["LISTEN_FDNAMES"] = ":".join(names)
    env.update(options.setenv)
    return env


def _exec(options: Options, env: dict[str, str]) -> NoReturn:
    """Replace this process with the command, or report why not and exit 1."""
    argv = list(options.command)
    _log(f"Execing {argv[0]} ({' '.join(argv)})")
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        _log(f"{PROG}: cannot execute {argv[0]}: {exc.strerror or exc}")
    os._exit(1)


def exec_service(options: Options, fds: list[int]) -> NoReturn:
    """Put ``fds`` at 3.. (or on stdin/stdout with ``--inetd``) and exec the command here."""
    targets = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + len(fds)))
    # Copy every source above all targets first, so that moving one into place never clobbers
    # another that is still waiting to move.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, SD_LISTEN_FDS_START + len(fds)) for fd in fds]
    if options.inetd:
        os.dup2(high[0], 0, inheritable=True)
        os.dup2(high[0], 1, inheritable=True)
        keep: set[int] = set()
    else:
        for src, dst in zip(high, targets, strict=True):
            _move_fd(src, dst)
        keep = set(targets)
    _set_cloexec_except(keep)
    _reset_signals()
    _exec(options, child_environment(options, len(fds), os.getpid()))


def _set_pdeathsig() -> None:
    # Children die with us, as systemd-socket-activate's FORK_DEATHSIG: best effort.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _spawn_for_connection(options: Options, conn: socket.socket) -> int:
    """fork and exec one child with ``conn`` as fd 3 (or stdin/stdout); returns its pid."""
    argv = list(options.command)
    pid = os.fork()
    if pid != 0:
        return pid
    try:  # in the child: never return into the parent's loop
        _set_pdeathsig()
        if options.inetd:
            os.dup2(conn.fileno(), 0, inheritable=True)
            os.dup2(conn.fileno(), 1, inheritable=True)
        else:
            _move_fd(conn.fileno(), SD_LISTEN_FDS_START)
        _reset_signals()
        _exec(options, child_environment(options, 1, os.getpid()))
    except BaseException as exc:
        with contextlib.suppress(Exception):
            _log(f"{PROG}: cannot start {argv[0]}: {exc}")
    os._exit(1)


def serve_accept(options: Options, listeners: list[int]) -> NoReturn:
    """Accept forever; one child per connection; reap children via pidfds in the same poll."""
    for fd in listeners:
        os.set_inheritable(fd, False)  # the children get only their connection
    poller = select.poll()
    for fd in listeners:
        poller.register(fd, select.POLLIN)
    children: dict[int, int] = {}  # pidfd -> pid
    argv = list(options.command)
    while True:
        for fd, _events in poller.poll():
            if fd in children:
                pid = children.pop(fd)
                poller.unregister(fd)
                os.close(fd)
                _, status = os.waitpid(pid, 0)
                code = os.waitstatus_to_exitcode(status)
                _log(f"Child {pid} died with code {code if code >= 0 else -code}")
                continue
            _log(f"Communication attempt on fd {fd}.")
            listener = socket.socket(fileno=fd)
            try:
                conn, _peer = listener.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_AGAIN:
                    continue
                raise RuntimeFailure(f"cannot accept a connection on fd {fd}: {exc.strerror}") from None
            finally:
                listener.detach()
            with conn:
                # The connection is blocking in the child, as inetd and systemd pass it.
                conn.setblocking(True)
                _log(f"Connection from {_peer_pretty(conn)} to {pretty_address(conn.family, conn.getsockname())}")
                try:
                    pid = _spawn_for_connection(options, conn)
                except OSError as exc:
                    raise RuntimeFailure(f"cannot fork: {exc.strerror}") from None
            _log(f"Spawned {argv[0]} ({' '.join(argv)}) as PID {pid}.")
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue  # already reaped by someone else; nothing to wait for
            children[pidfd] = pid
            poller.register(pidfd, select.POLLIN)


def _peer_pretty(conn: socket.socket) -> str:
    try:
        return pretty_address(conn.family, conn.getpeername())
    except OSError:
        return "n/a"


def run(options: Options) -> NoReturn:
    """Inherit, bind, wait, then exec (or serve with ``--accept``). Never returns on success.

    Raises:
        UsageError: The options cannot work together with what was inherited.
        RuntimeFailure: Binding, accepting or forking failed.
    """
    try:
        inherited = listen_fds(unset_environment=False)
    except (ValueError, OSError) as exc:
        raise RuntimeFailure(f"cannot read the inherited LISTEN_FDS: {exc}") from None
    if inherited:
        _log(f"Received {inherited} descriptors via the environment.")
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + inherited))
    if not fds and not options.addresses:
        raise UsageError("no sockets to listen on specified or passed in (use -l ADDR)")
    if options.inetd and not options.accept and len(fds) + len(options.addresses) != 1:
        raise UsageError("--inetd only supported for single file descriptors (without --accept)")
    # Inherited fds stay open across exec in service mode; in accept mode only connections pass.
    for fd in fds:
        os.set_inheritable(fd, not options.accept)
    sockets = [bind(address, options.socket_type) for address in options.addresses]
    all_fds = fds + [s.fileno() for s in sockets]
    for number, fd in enumerate(all_fds, start=SD_LISTEN_FDS_START):
        # The number the child will see, not the one the socket has in this process.
        _log(f"Listening on {_fd_pretty(fd)} as {number}.")
    if options.accept:
        serve_accept(options, all_fds)
    if not options.now:
        poller = select.poll()
        for fd in all_fds:
            poller.register(fd, select.POLLIN)
        ready = poller.poll()[0][0]
        _log(f"Communication attempt on fd {SD_LISTEN_FDS_START + all_fds.index(ready)}.")
    exec_service(options, all_fds)


def main(argv: list[str]) -> int:
    """``sockvisor activate ARGS``: returns only on failure (2 usage, 1 runtime); see the module doc.

    Args:
        argv: Everything after the word ``activate``.

    Returns:
        The exit status.
    """
    # Ctrl-C should end us quietly, as it does the C tool, not with a KeyboardInterrupt trace.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        options = parse_args(argv)
        run(options)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except RuntimeFailure as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
