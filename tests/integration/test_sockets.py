"""supervisor.sockets against the real kernel: every kind, every option read back.

Runs as root in the test sandbox (options such as SO_MARK need CAP_NET_ADMIN);
tests that need root skip themselves otherwise.
"""

from __future__ import annotations

import errno
import os
import pwd
import select
import shutil
import socket
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from supervisor import sockets, sockopts
from supervisor.errors import BindError
from supervisor.matching import matches
from supervisor.model import InetAddress, Listen, ListenKind
from supervisor.sockets import Bound, adopt, bind, bind_all, retune, set_blocking

UNIT = "web"
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (CAP_NET_ADMIN, chown)")

TCP, UDP = ListenKind.TCP, ListenKind.UDP
UNIX, UNIX_DGRAM, UNIX_SEQPACKET, FIFO = (
    ListenKind.UNIX,
    ListenKind.UNIX_DGRAM,
    ListenKind.UNIX_SEQPACKET,
    ListenKind.FIFO,
)


# --- helpers and fixtures ------------------------------------------------------------------


def inet(kind: ListenKind, host: str, port: int, *, scope_id: int = 0, **options: Any) -> Listen:
    family = socket.AF_INET6 if host == "" or ":" in host else socket.AF_INET
    options.setdefault("name", "t")
    return Listen(kind=kind, address=InetAddress(host, port, family, scope_id), **options)


def node(kind: ListenKind, path: str, **options: Any) -> Listen:
    options.setdefault("name", "t")
    return Listen(kind=kind, address=path, **options)


def getopt(bound: Bound, level: int, option: int) -> int:
    assert bound.sock is not None
    return bound.sock.getsockopt(level, option)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A port free on IPv4 and IPv6 at the time of the call (config ports are 1-65535, never 0)."""

    def pick() -> int:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind(("::", 0))
            port: int = probe.getsockname()[1]
        return port

    return pick


@pytest.fixture
def port(free_port: Callable[[], int]) -> int:
    return free_port()


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A short temporary directory: AF_UNIX paths are limited to 107 bytes."""
    path = tempfile.mkdtemp(prefix="sv-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def binder() -> Iterator[Callable[[Listen], Bound]]:
    """bind() with unit "web", closing whatever was bound when the test ends."""
    made: list[Bound] = []

    def do(listen: Listen) -> Bound:
        bound = bind(listen, unit=UNIT)
        made.append(bound)
        return bound

    yield do
    for bound in made:
        bound.close()


def accept_one(listener: socket.socket) -> socket.socket:
    """Wait (on readiness, up to 5 s) for one connection and accept it."""
    ready, _, _ = select.select([listener], [], [], 5)
    assert ready, "no connection arrived"
    conn, _ = listener.accept()
    return conn


# --- inet: kinds, families, dual stack -----------------------------------------------------


def test_tcp_listener_is_listening_nonblocking_cloexec_reuseaddr(binder: Any, port: int) -> None:
    """A tcp entry becomes a listening, non-blocking, CLOEXEC SOCK_STREAM with SO_REUSEADDR."""
    bound = binder(inet(TCP, "127.0.0.1", port))
    assert bound.sock is not None and bound.fileno() == bound.fd == bound.sock.fileno()
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    assert os.get_blocking(bound.fd) is False
    assert os.get_inheritable(bound.fd) is False
    assert bound.local_address() == f"127.0.0.1:{port}"
    assert bound.adopted is False


def test_udp_listener_is_bound_datagram_without_reuseaddr(binder: Any, port: int) -> None:
    """A udp entry becomes a bound, non-listening SOCK_DGRAM without SO_REUSEADDR (no silent sharing)."""
    bound = binder(inet(UDP, "127.0.0.1", port))
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_DGRAM
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
    assert os.get_blocking(bound.fd) is False
    assert bound.local_address() == f"127.0.0.1:{port}"


def test_ipv6_loopback_formats_with_brackets(binder: Any, port: int) -> None:
    """An IPv6 host binds AF_INET6 and prints as [host]:port."""
    bound = binder(inet(TCP, "::1", port))
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_DOMAIN) == socket.AF_INET6
    assert bound.local_address() == f"[::1]:{port}"


def test_bare_port_is_dual_stack_and_accepts_ipv4(binder: Any, port: int) -> None:
    """A bare port binds [::] with IPV6_V6ONLY=0 and really accepts an IPv4 connection."""
    bound = binder(inet(TCP, "", port))
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_DOMAIN) == socket.AF_INET6
    assert getopt(bound, socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    assert bound.local_address() == f"[::]:{port}"
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        conn = accept_one(bound.sock)
        with conn:
            assert conn.getpeername()[0] == "::ffff:127.0.0.1"


def test_bare_port_ipv6_only_refuses_ipv4(binder: Any, port: int) -> None:
    """ipv6_only on a bare port sets IPV6_V6ONLY=1, so IPv4 is refused."""
    bound = binder(inet(TCP, "", port, ipv6_only=True))
    assert getopt(bound, socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.parametrize("v6only", [True, False])
def test_explicit_ipv6_only_is_set(binder: Any, port: int, v6only: bool) -> None:
    """An explicit ipv6_only on [::] sets IPV6_V6ONLY to exactly that value."""
    bound = binder(inet(TCP, "::", port, ipv6_only=v6only))
    assert getopt(bound, socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == int(v6only)


def test_bare_port_falls_back_to_ipv4_without_ipv6(binder: Any, port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """When socket(AF_INET6) fails with EAFNOSUPPORT a bare port binds 0.0.0.0 instead."""
    real = sockets._new_socket

    def no_ipv6(family: int, type_: int, proto: int = 0) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
        return real(family, type_, proto)

    monkeypatch.setattr(sockets, "_new_socket", no_ipv6)
    bound = binder(inet(TCP, "", port))
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_DOMAIN) == socket.AF_INET
    assert bound.local_address() == f"0.0.0.0:{port}"
    with pytest.raises(BindError, match="IPv6"):
        binder(inet(TCP, "", port, ipv6_only=True))


def _link_local() -> tuple[str, str, int] | None:
    """(address, interface, index) of a link-local IPv6 address of this host, if any."""
    try:
        with open("/proc/net/if_inet6") as table:
            for line in table:
                hexaddr, index, _, scope, _, ifname = line.split()
                if scope == "20":  # IFA_LINK
                    host = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(hexaddr))
                    return host, ifname, int(index, 16)
    except OSError:
        pass
    return None


def test_link_local_binds_with_scope_id(binder: Any, port: int) -> None:
    """A link-local address binds on the interface given by scope_id and prints as [addr%if]:port."""
    found = _link_local()
    if found is None:
        pytest.skip("no link-local IPv6 address on this host")
    host, ifname, index = found
    bound = binder(inet(TCP, host, port, scope_id=index))
    assert bound.sock is not None and bound.sock.getsockname()[3] == index
    assert bound.local_address() == f"[{host}%{ifname}]:{port}"


# --- inet: options read back ---------------------------------------------------------------


def test_freebind_binds_a_non_local_address(binder: Any, port: int) -> None:
    """freebind sets IP_FREEBIND and lets a TEST-NET address bind; without it that is EADDRNOTAVAIL."""
    with pytest.raises(BindError, match="freebind"):
        binder(inet(TCP, "192.0.2.1", port))
    bound = binder(inet(TCP, "192.0.2.1", port, freebind=True))
    assert getopt(bound, socket.IPPROTO_IP, sockopts.IP_FREEBIND) == 1
    assert bound.local_address() == f"192.0.2.1:{port}"


def test_freebind_ipv6(binder: Any, port: int) -> None:
    """freebind on IPv6 sets IPV6_FREEBIND and lets a documentation address bind."""
    bound = binder(inet(UDP, "2001:db8::1", port, freebind=True))
    assert getopt(bound, socket.IPPROTO_IPV6, sockopts.IPV6_FREEBIND) == 1


@needs_root
def test_transparent_sets_ip_transparent(binder: Any, port: int) -> None:
    """transparent sets IP_TRANSPARENT (needs CAP_NET_ADMIN)."""
    bound = binder(inet(TCP, "127.0.0.1", port, transparent=True))
    assert getopt(bound, socket.IPPROTO_IP, sockopts.IP_TRANSPARENT) == 1


def test_reuse_port_lets_two_sockets_share_a_port(binder: Any, port: int) -> None:
    """reuse_port sets SO_REUSEPORT, so the same entry binds twice (one socket per pool worker)."""
    listen = inet(TCP, "127.0.0.1", port, reuse_port=True)
    first, second = binder(listen), binder(listen)
    assert getopt(first, socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    assert getopt(second, socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    assert first.fd != second.fd


def test_address_in_use_names_unit_and_address(binder: Any, port: int) -> None:
    """EADDRINUSE is a BindError naming the unit and the address, with a hint."""
    listen = inet(TCP, "127.0.0.1", port)
    binder(listen)
    before = open_fds()
    with pytest.raises(BindError) as caught:
        binder(listen)
    message = str(caught.value)
    assert caught.value.unit == UNIT and caught.value.address == f"tcp:127.0.0.1:{port}"
    assert f"unit web: cannot bind tcp:127.0.0.1:{port}: " in message
    assert os.strerror(errno.EADDRINUSE) in message and "ss -lnp" in message
    assert open_fds() == before, "the failed socket leaked"


def _bind_as(uid: int, gid: int, listens: list[Listen]) -> list[str]:
    """The BindError messages of binding ``listens`` in a forked child running as uid/gid."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, bind, report, never return into pytest
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            messages = []
            for listen in listens:
                try:
                    bind(listen, unit=UNIT).close()
                except BindError as exc:
                    messages.append(str(exc))
            os.write(write_end, "\n".join(messages).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        output = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return output.splitlines()


@needs_root
def test_permission_errors_carry_a_hint(short_dir: str) -> None:
    """EACCES (a low port, a closed directory) is a BindError whose hint says what to fix."""
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
        if int(f.read()) <= 80:
            pytest.skip("unprivileged ports start at 80 or lower here")
    os.chmod(short_dir, 0o700)
    nobody = pwd.getpwnam("nobody")
    path = os.path.join(short_dir, "x.sock")
    messages = _bind_as(nobody.pw_uid, nobody.pw_gid, [inet(TCP, "127.0.0.1", 80), node(UNIX, path)])
    assert messages == [
        "unit web: cannot bind tcp:127.0.0.1:80: Permission denied"
        " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        f"unit web: cannot bind unix:{path}: cannot open directory {short_dir}: Permission denied"
            " (check the permissions of the directories on the path)",
    ]


@needs_root
def test_bind_to_device(binder: Any, port: int) -> None:
    """bind_to_device sets SO_BINDTODEVICE to the interface; an unknown one is refused."""
    bound = binder(inet(UDP, "127.0.0.1", port, bind_to_device="lo"))
    assert bound.sock is not None
    assert bound.sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0") == b"lo"
    with pytest.raises(BindError, match="no such network interface"):
        binder(inet(UDP, "127.0.0.1", port, bind_to_device="nosuchif0"))


def test_buffers_are_set(binder: Any, port: int) -> None:
    """receive_buffer/send_buffer set SO_RCVBUF/SO_SNDBUF (the kernel reports double)."""
    bound = binder(inet(TCP, "127.0.0.1", port, receive_buffer=65536, send_buffer=98304))
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * 65536
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 98304


@needs_root
def test_buffers_beyond_rmem_max_use_force(binder: Any, port: int) -> None:
    """As root a buffer above net.core.rmem_max/wmem_max is still granted (SO_RCVBUFFORCE/SO_SNDBUFFORCE)."""
    with open("/proc/sys/net/core/rmem_max") as f:
        rmem_max = int(f.read())
    with open("/proc/sys/net/core/wmem_max") as f:
        wmem_max = int(f.read())
    size = max(rmem_max, wmem_max) + 65536
    bound = binder(inet(UDP, "127.0.0.1", port, receive_buffer=size, send_buffer=size))
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * size
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * size


def test_tcp_knobs_are_set(binder: Any, port: int) -> None:
    """nodelay, keepalive and its time/interval/probes, defer_accept are set on the listener."""
    bound = binder(
        inet(
            TCP,
            "127.0.0.1",
            port,
            nodelay=True,
            keepalive=True,
            keepalive_time=30,
            keepalive_interval=5.5,  # rounded up to whole seconds
            keepalive_probes=4,
            defer_accept=3,
        )
    )
    tcp = socket.IPPROTO_TCP
    assert getopt(bound, tcp, socket.TCP_NODELAY) == 1
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert getopt(bound, tcp, socket.TCP_KEEPIDLE) == 30
    assert getopt(bound, tcp, socket.TCP_KEEPINTVL) == 6
    assert getopt(bound, tcp, socket.TCP_KEEPCNT) == 4
    # The kernel stores retransmission counts; 3 s is one of the values that reads back exactly.
    assert getopt(bound, tcp, sockopts.TCP_DEFER_ACCEPT) == 3


def test_tcp_knobs_can_be_switched_off(binder: Any, port: int) -> None:
    """nodelay/keepalive false are set to 0, not left alone."""
    bound = binder(inet(TCP, "127.0.0.1", port, nodelay=False, keepalive=False))
    assert getopt(bound, socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


@needs_root
def test_mark_tos_ttl_priority_ipv4(binder: Any, port: int) -> None:
    """mark, ip_tos, ip_ttl and priority are set (SO_MARK, IP_TOS, IP_TTL, SO_PRIORITY)."""
    bound = binder(inet(TCP, "127.0.0.1", port, mark=42, ip_tos=0x10, ip_ttl=33, priority=5))
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_MARK) == 42
    assert getopt(bound, socket.IPPROTO_IP, socket.IP_TOS) == 0x10
    assert getopt(bound, socket.IPPROTO_IP, socket.IP_TTL) == 33
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_PRIORITY) == 5


def test_tos_ttl_on_dual_stack_cover_both_families(binder: Any, port: int) -> None:
    """On an AF_INET6 socket ip_tos/ip_ttl set IPV6_TCLASS/IPV6_UNICAST_HOPS and the IPv4 options too."""
    bound = binder(inet(UDP, "", port, ip_tos=0x20, ip_ttl=17))
    assert getopt(bound, socket.IPPROTO_IPV6, socket.IPV6_TCLASS) == 0x20
    assert getopt(bound, socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS) == 17
    assert getopt(bound, socket.IPPROTO_IP, socket.IP_TOS) == 0x20
    assert getopt(bound, socket.IPPROTO_IP, socket.IP_TTL) == 17


def test_broadcast_on_udp(binder: Any, port: int) -> None:
    """broadcast sets SO_BROADCAST on a udp socket."""
    bound = binder(inet(UDP, "127.0.0.1", port, broadcast=True))
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_BROADCAST) == 1


def test_backlog_reaches_listen(binder: Any, port: int) -> None:
    """backlog is passed to listen() (ss shows it as the listener's Send-Q)."""
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed")
    binder(inet(TCP, "127.0.0.1", port, backlog=77))
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout.split()
    assert out[:3] == ["LISTEN", "0", "77"]


@pytest.mark.parametrize(
    ("listen_kind", "address", "option", "value"),
    [
        (UNIX, "/tmp/sv-never.sock", "nodelay", True),
        (UNIX, "/tmp/sv-never.sock", "freebind", True),
        (UDP, None, "defer_accept", 3),
        (TCP, None, "broadcast", True),
        (TCP, None, "pass_credentials", True),
        (TCP, None, "user", "nobody"),
        (FIFO, "/tmp/sv-never.fifo", "mark", 1),
        (UNIX, "@sv-never", "symlinks", ("/tmp/sv-never-link",)),
    ],
)
def test_option_of_another_kind_is_refused(
    binder: Any, port: int, listen_kind: ListenKind, address: str | None, option: str, value: Any
) -> None:
    """An option that means nothing for the kind is a BindError naming it, and nothing is created."""
    listen = (
        inet(listen_kind, "127.0.0.1", port, **{option: value})
        if address is None
        else node(listen_kind, address, **{option: value})
    )
    with pytest.raises(BindError, match=f"{option} does not apply"):
        binder(listen)
    if address is not None and not address.startswith("@"):
        assert not os.path.lexists(address)


# --- unix sockets --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen_kind", "sock_type", "listening"),
    [
        (UNIX, socket.SOCK_STREAM, 1),
        (UNIX_DGRAM, socket.SOCK_DGRAM, 0),
        (UNIX_SEQPACKET, socket.SOCK_SEQPACKET, 1),
    ],
)
def test_unix_kinds(binder: Any, short_dir: str, listen_kind: ListenKind, sock_type: int, listening: int) -> None:
    """Each unix kind binds its socket type at the path, listening only for stream and seqpacket."""
    path = os.path.join(short_dir, "k.sock")
    bound = binder(node(listen_kind, path))
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_DOMAIN) == socket.AF_UNIX
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_TYPE) == sock_type
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == listening
    assert os.get_blocking(bound.fd) is False and os.get_inheritable(bound.fd) is False
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o666  # the default mode, whatever the umask
    assert bound.local_address() == path


@pytest.mark.parametrize("listen_kind", [UNIX, UNIX_DGRAM, UNIX_SEQPACKET])
def test_abstract_socket(binder: Any, listen_kind: ListenKind) -> None:
    """A name starting with "@" binds in the abstract namespace: nothing on disk, printed back as "@name"."""
    name = f"@sv-test-{uuid.uuid4().hex}"
    bound = binder(node(listen_kind, name))
    assert bound.sock is not None
    assert bound.sock.getsockname() == b"\0" + name[1:].encode()
    assert bound.local_address() == name
    bound.close()  # nothing to remove, and nothing raises


def test_abstract_name_in_use(binder: Any) -> None:
    """A taken abstract name is a BindError with EADDRINUSE."""
    name = f"@sv-test-{uuid.uuid4().hex}"
    binder(node(UNIX, name))
    with pytest.raises(BindError, match=os.strerror(errno.EADDRINUSE)):
        binder(node(UNIX, name))


def test_pass_credentials(binder: Any, short_dir: str) -> None:
    """pass_credentials sets SO_PASSCRED."""
    bound = binder(node(UNIX_DGRAM, os.path.join(short_dir, "c.sock"), pass_credentials=True))
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_PASSCRED) == 1


@needs_root
def test_unix_mode_and_owner(binder: Any, short_dir: str) -> None:
    """mode, user and group are applied to the socket node."""
    path = os.path.join(short_dir, "m.sock")
    binder(node(UNIX, path, mode=0o660, user="nobody", group="nogroup"))
    st = os.lstat(path)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid)


@needs_root
def test_user_alone_gives_primary_group_and_numeric_ids_work(binder: Any, short_dir: str) -> None:
    """A user alone also sets the user's primary group (as systemd); numeric ids need no passwd entry."""
    nobody = pwd.getpwnam("nobody")
    path = os.path.join(short_dir, "u.sock")
    binder(node(UNIX, path, user="nobody"))
    assert (os.lstat(path).st_uid, os.lstat(path).st_gid) == (nobody.pw_uid, nobody.pw_gid)
    numeric = os.path.join(short_dir, "n.sock")
    binder(node(UNIX, numeric, user="4242", group="4343"))
    assert (os.lstat(numeric).st_uid, os.lstat(numeric).st_gid) == (4242, 4343)


def test_unknown_user_is_refused_before_anything_exists(binder: Any, short_dir: str) -> None:
    """An unknown user or group is a BindError and no node or directory is created."""
    path = os.path.join(short_dir, "sub", "x.sock")
    with pytest.raises(BindError, match="unknown user 'no-such-user-sv'"):
        binder(node(UNIX, path, user="no-such-user-sv"))
    with pytest.raises(BindError, match="unknown group 'no-such-group-sv'"):
        binder(node(FIFO, path, group="no-such-group-sv"))
    assert not os.path.lexists(os.path.dirname(path))


def test_directory_mode_for_created_parents(binder: Any, short_dir: str) -> None:
    """Missing parent directories are created with exactly directory_mode; existing ones are untouched."""
    os.chmod(short_dir, 0o700)
    path = os.path.join(short_dir, "a", "b", "d.sock")
    binder(node(UNIX, path, directory_mode=0o771))  # 0o771 survives no umask but 0
    assert stat.S_IMODE(os.stat(os.path.join(short_dir, "a")).st_mode) == 0o771
    assert stat.S_IMODE(os.stat(os.path.join(short_dir, "a", "b")).st_mode) == 0o771
    assert stat.S_IMODE(os.stat(short_dir).st_mode) == 0o700


def test_symlinks_are_created_and_replaced(binder: Any, short_dir: str) -> None:
    """symlinks point at the node (parents created, an old symlink replaced) and connect through."""
    path = os.path.join(short_dir, "s.sock")
    fresh = os.path.join(short_dir, "links", "fresh.sock")
    old = os.path.join(short_dir, "old.sock")
    os.symlink("/nonexistent", old)
    bound = binder(node(UNIX, path, symlinks=(fresh, old)))
    assert os.readlink(fresh) == path and os.readlink(old) == path
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(fresh)
        assert bound.sock is not None
        accept_one(bound.sock).close()


def test_symlink_over_a_regular_file_is_refused(binder: Any, short_dir: str) -> None:
    """A symlink path occupied by a regular file is a BindError; the file and no node survive it."""
    path = os.path.join(short_dir, "s.sock")
    blocker = os.path.join(short_dir, "file")
    with open(blocker, "w") as f:
        f.write("keep")
    with pytest.raises(BindError, match="not a symlink"):
        binder(node(UNIX, path, symlinks=(blocker,)))
    with open(blocker) as f:
        assert f.read() == "keep"
    assert not os.path.lexists(path)


def test_stale_unix_node_is_replaced(binder: Any, short_dir: str) -> None:
    """A socket node nobody listens on any more is unlinked and bound afresh."""
    path = os.path.join(short_dir, "stale.sock")
    old = socket.socket(socket.AF_UNIX)
    old.bind(path)
    old.close()  # the node stays behind
    os.chmod(path, 0o600)  # marks the old node (inode numbers are reused at once)
    bound = binder(node(UNIX, path))
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o666
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(path)
        assert bound.sock is not None
        accept_one(bound.sock).close()


@pytest.mark.parametrize(
    ("listen_kind", "sock_type"),
    [(UNIX, socket.SOCK_STREAM), (UNIX_DGRAM, socket.SOCK_DGRAM), (UNIX, socket.SOCK_DGRAM)],
)
def test_live_unix_node_is_never_stolen(binder: Any, short_dir: str, listen_kind: ListenKind, sock_type: int) -> None:
    """A node some process still serves (of any type) is a BindError naming the path, and stays in place."""
    path = os.path.join(short_dir, "live.sock")
    with socket.socket(socket.AF_UNIX, sock_type) as live:
        live.bind(path)
        if sock_type == socket.SOCK_STREAM:
            live.listen(1)
        inode = os.lstat(path).st_ino
        with pytest.raises(BindError, match=f"{path} is in use by a running process"):
            binder(node(listen_kind, path))
        assert os.lstat(path).st_ino == inode


def test_live_listener_with_full_backlog_is_not_stolen(binder: Any, short_dir: str) -> None:
    """A listener whose backlog is full (connect would block) still counts as live."""
    path = os.path.join(short_dir, "full.sock")
    clients: list[socket.socket] = []
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(path)
        live.listen(0)
        try:
            while True:  # fill the backlog until a non-blocking connect would block
                client = socket.socket(socket.AF_UNIX)
                client.setblocking(False)
                clients.append(client)
                try:
                    client.connect(path)
                except BlockingIOError:
                    break
            with pytest.raises(BindError, match="in use by a running process"):
                binder(node(UNIX, path))
        finally:
            for client in clients:
                client.close()


def test_non_socket_at_path_is_refused(binder: Any, short_dir: str) -> None:
    """A regular file at a unix socket path is a BindError and is left untouched."""
    path = os.path.join(short_dir, "file.sock")
    with open(path, "w") as f:
        f.write("data")
    before = open_fds()
    with pytest.raises(BindError, match="exists and is not a socket"):
        binder(node(UNIX, path))
    assert open_fds() == before
    with open(path) as f:
        assert f.read() == "data"


def test_too_long_path_is_refused(binder: Any, short_dir: str) -> None:
    """A path longer than AF_UNIX allows is a clear BindError."""
    path = os.path.join(short_dir, "x" * 120)
    with pytest.raises(BindError, match="AF_UNIX allows 107"):
        binder(node(UNIX, path))


# --- fifos ---------------------------------------------------------------------------------


@needs_root
def test_fifo_is_created_with_mode_and_owner(binder: Any, short_dir: str) -> None:
    """A fifo entry makes the fifo (mode, owner), opened read-write and non-blocking."""
    path = os.path.join(short_dir, "d", "f.fifo")
    bound = binder(node(FIFO, path, mode=0o620, user="nobody", group="nogroup", directory_mode=0o750))
    st = os.lstat(path)
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620
    assert st.st_uid == pwd.getpwnam("nobody").pw_uid
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o750
    assert bound.sock is None
    assert os.get_blocking(bound.fd) is False and os.get_inheritable(bound.fd) is False
    import fcntl

    assert fcntl.fcntl(bound.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(writer, b"hello")
    finally:
        os.close(writer)
    assert os.read(bound.fd, 16) == b"hello"
    assert bound.local_address() == path


def test_stale_fifo_is_reused(binder: Any, short_dir: str) -> None:
    """An existing fifo is opened as it is (same inode) and given the configured mode."""
    path = os.path.join(short_dir, "f.fifo")
    os.mkfifo(path, 0o600)
    inode = os.lstat(path).st_ino
    binder(node(FIFO, path, mode=0o644))
    assert os.lstat(path).st_ino == inode
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o644


def test_fifo_path_holding_another_file_is_refused(binder: Any, short_dir: str) -> None:
    """A regular file at a fifo path is a BindError and is left untouched."""
    path = os.path.join(short_dir, "f.fifo")
    with open(path, "w") as f:
        f.write("data")
    with pytest.raises(BindError, match="exists and is not a fifo"):
        binder(node(FIFO, path))
    assert stat.S_ISREG(os.lstat(path).st_mode)


# --- close, remove_on_stop, bind_all -------------------------------------------------------


@pytest.mark.parametrize("listen_kind", [UNIX, UNIX_SEQPACKET, FIFO])
def test_remove_on_stop_unlinks_node_and_symlinks(short_dir: str, listen_kind: ListenKind) -> None:
    """close() unlinks the node and its symlinks when remove_on_stop (the default) is set."""
    path = os.path.join(short_dir, "r.node")
    link = os.path.join(short_dir, "r.link")
    bound = bind(node(listen_kind, path, symlinks=(link,)), unit=UNIT)
    bound.close()
    assert bound.closed
    assert not os.path.lexists(path) and not os.path.lexists(link)
    with pytest.raises(OSError):
        os.fstat(bound.fd)
    bound.close()  # idempotent


def test_node_kept_without_remove_on_stop_or_with_remove_false(short_dir: str) -> None:
    """remove_on_stop: false, or close(remove=False), leave the node in place."""
    kept = os.path.join(short_dir, "kept.sock")
    bind(node(UNIX, kept, remove_on_stop=False), unit=UNIT).close()
    assert os.path.lexists(kept)
    also = os.path.join(short_dir, "also.sock")
    bind(node(UNIX, also), unit=UNIT).close(remove=False)
    assert os.path.lexists(also)


def test_close_never_unlinks_a_node_someone_else_made(short_dir: str) -> None:
    """If the path now holds another inode, close() leaves it alone."""
    path = os.path.join(short_dir, "x.sock")
    bound = bind(node(UNIX, path), unit=UNIT)
    os.unlink(path)
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(path)
        bound.close()
        assert os.path.lexists(path)


def test_bind_all_binds_in_order(short_dir: str, port: int) -> None:
    """bind_all returns one Bound per entry, in order."""
    listens = [inet(TCP, "127.0.0.1", port), node(UNIX, os.path.join(short_dir, "a.sock"))]
    bound = bind_all(listens, unit=UNIT)
    try:
        assert [b.listen for b in bound] == listens
    finally:
        for b in bound:
            b.close()


def test_bind_all_rolls_back(short_dir: str, free_port: Callable[[], int]) -> None:
    """If one entry fails, bind_all closes the ones it bound and removes their nodes (even without remove_on_stop)."""
    busy_port = free_port()
    path = os.path.join(short_dir, "first.sock")
    other = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", busy_port))
        busy.listen(1)
        before = open_fds()
        with pytest.raises(BindError, match=f"tcp:127.0.0.1:{busy_port}"):
            bind_all(
                [
                    node(UNIX, path, remove_on_stop=False),
                    inet(TCP, "127.0.0.1", other),
                    inet(TCP, "127.0.0.1", busy_port),
                ],
                unit=UNIT,
            )
        assert open_fds() == before, "bind_all leaked an fd"
        assert not os.path.lexists(path)
    # The port of the rolled-back entry is free again.
    bind(inet(TCP, "127.0.0.1", other), unit=UNIT).close()


# --- matches and adopt ---------------------------------------------------------------------


def test_matches_own_tcp_listener_only(binder: Any, free_port: Callable[[], int]) -> None:
    """A bound tcp fd matches its own entry, not another port, host, kind or family."""
    port = free_port()
    bound = binder(inet(TCP, "127.0.0.1", port))
    assert matches(bound.fd, bound.listen)
    assert not matches(bound.fd, inet(TCP, "127.0.0.1", free_port()))
    assert not matches(bound.fd, inet(TCP, "127.0.0.2", port))
    assert not matches(bound.fd, inet(UDP, "127.0.0.1", port))
    assert not matches(bound.fd, inet(TCP, "::1", port))
    assert not matches(bound.fd, node(UNIX, "/tmp/x.sock"))
    assert os.get_blocking(bound.fd) is False and os.fstat(bound.fd)  # matches() left it alone


def test_matches_rejects_a_socket_bound_elsewhere(port: int) -> None:
    """A plain socket.socket() listening on another port does not match the entry."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        assert not matches(other.fileno(), inet(TCP, "127.0.0.1", port))
        assert matches(other.fileno(), inet(TCP, "127.0.0.1", other.getsockname()[1]))


def test_matches_requires_a_listening_stream_socket(port: int) -> None:
    """A tcp socket bound to the address but not listening does not match (as systemd)."""
    with socket.socket() as plain:
        plain.bind(("127.0.0.1", port))
        assert not matches(plain.fileno(), inet(TCP, "127.0.0.1", port))
        plain.listen(1)
        assert matches(plain.fileno(), inet(TCP, "127.0.0.1", port))


def test_matches_dual_stack_bare_port(free_port: Callable[[], int]) -> None:
    """A bare port matches [::] with V6ONLY=0 or 0.0.0.0, but not a v6-only [::] socket."""
    port = free_port()
    with socket.socket(socket.AF_INET6) as dual:
        dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        dual.bind(("::", port))
        dual.listen(1)
        assert matches(dual.fileno(), inet(TCP, "", port))
        assert not matches(dual.fileno(), inet(TCP, "", port, ipv6_only=True))
    port = free_port()
    with socket.socket(socket.AF_INET) as v4:
        v4.bind(("0.0.0.0", port))
        v4.listen(1)
        assert matches(v4.fileno(), inet(TCP, "", port))
    port = free_port()
    with socket.socket(socket.AF_INET6) as v6only:
        v6only.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        v6only.bind(("::", port))
        v6only.listen(1)
        assert not matches(v6only.fileno(), inet(TCP, "", port))
        assert matches(v6only.fileno(), inet(TCP, "", port, ipv6_only=True))


def test_matches_udp(binder: Any, port: int) -> None:
    """A bound udp socket matches its entry (no listening check for datagrams)."""
    bound = binder(inet(UDP, "::1", port))
    assert matches(bound.fd, inet(UDP, "::1", port))
    assert not matches(bound.fd, inet(TCP, "::1", port))


def test_matches_unix_path_and_abstract(binder: Any, short_dir: str) -> None:
    """Unix fds match by type and by path or abstract name."""
    path = os.path.join(short_dir, "m.sock")
    bound = binder(node(UNIX, path))
    assert matches(bound.fd, node(UNIX, path))
    assert not matches(bound.fd, node(UNIX, path + "x"))
    assert not matches(bound.fd, node(UNIX_SEQPACKET, path))
    assert not matches(bound.fd, node(UNIX, "@" + path))
    name = f"@sv-test-{uuid.uuid4().hex}"
    abstract = binder(node(UNIX_DGRAM, name))
    assert matches(abstract.fd, node(UNIX_DGRAM, name))
    assert not matches(abstract.fd, node(UNIX_DGRAM, name + "x"))


def test_matches_fifo_by_inode(binder: Any, short_dir: str) -> None:
    """A fifo fd matches the entry whose path is that very fifo, nothing else."""
    path = os.path.join(short_dir, "m.fifo")
    other = os.path.join(short_dir, "o.fifo")
    bound = binder(node(FIFO, path))
    os.mkfifo(other)
    assert matches(bound.fd, node(FIFO, path))
    assert not matches(bound.fd, node(FIFO, other))
    assert not matches(bound.fd, node(FIFO, os.path.join(short_dir, "missing")))
    assert not matches(bound.fd, node(UNIX, path))


def test_matches_is_false_for_closed_and_non_socket_fds(port: int) -> None:
    """A closed fd or a regular file is simply no match."""
    with tempfile.TemporaryFile() as f:
        assert not matches(f.fileno(), inet(TCP, "127.0.0.1", port))
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert not matches(r, inet(TCP, "127.0.0.1", port))


def test_adopt_wraps_an_inherited_socket(port: int) -> None:
    """adopt takes the fd over: CLOEXEC, non-blocking, runtime options applied, adopted=True."""
    raw = socket.socket()
    raw.bind(("127.0.0.1", port))
    raw.listen(5)
    raw.set_inheritable(True)  # as systemd passes it
    fd = raw.detach()
    listen = inet(TCP, "127.0.0.1", port, nodelay=True, receive_buffer=65536)
    assert matches(fd, listen)
    bound = adopt(fd, listen, unit=UNIT)
    try:
        assert bound.fd == fd and bound.adopted
        assert os.get_inheritable(fd) is False and os.get_blocking(fd) is False
        assert getopt(bound, socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert getopt(bound, socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * 65536
        assert bound.local_address() == f"127.0.0.1:{port}"
    finally:
        bound.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_adopted_unix_node_is_owned_but_never_removed(short_dir: str) -> None:
    """An adopted unix socket gets its mode and symlinks, but close() leaves the node to its creator."""
    path = os.path.join(short_dir, "a.sock")
    link = os.path.join(short_dir, "a.link")
    raw = socket.socket(socket.AF_UNIX)
    raw.bind(path)
    raw.listen(5)
    listen = node(UNIX, path, mode=0o600, symlinks=(link,))
    bound = adopt(raw.detach(), listen)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert os.readlink(link) == path
    bound.close()
    assert os.path.lexists(path)


def test_adopt_fifo(short_dir: str) -> None:
    """A fifo fd is adopted as it is, made non-blocking and CLOEXEC."""
    path = os.path.join(short_dir, "a.fifo")
    os.mkfifo(path)
    fd = os.open(path, os.O_RDWR)
    os.set_inheritable(fd, True)
    listen = node(FIFO, path, mode=0o640)
    assert matches(fd, listen)
    bound = adopt(fd, listen)
    assert bound.sock is None and bound.adopted
    assert os.get_blocking(fd) is False and os.get_inheritable(fd) is False
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    bound.close()
    assert os.path.lexists(path)


def test_failed_adopt_leaves_the_fd_to_the_caller(port: int) -> None:
    """When adopt fails (an option the kind refuses) the fd stays open for the caller to close."""
    raw = socket.socket()
    raw.bind(("127.0.0.1", port))
    raw.listen(1)
    fd = raw.detach()
    try:
        with pytest.raises(BindError, match=r"unit web: .*pass_credentials does not apply"):
            adopt(fd, inet(TCP, "127.0.0.1", port, pass_credentials=True), unit=UNIT)
        assert stat.S_ISSOCK(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


# --- retune (reload) -----------------------------------------------------------------------


def _sysctl(name: str, index: int = 0) -> int:
    with open(f"/proc/sys/{name}") as f:
        return int(f.read().split()[index])


def _ss_backlog(port: int) -> str:
    return subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.split()[2]


@needs_root
def test_retune_changes_options_in_place(binder: Any, port: int) -> None:
    """retune sets changed options on the same fd and returns dropped ones to the kernel defaults."""
    old = inet(TCP, "127.0.0.1", port, nodelay=True, mark=1, keepalive_time=30, receive_buffer=65536, backlog=10)
    bound = binder(old)
    fd = bound.fd
    new = inet(TCP, "127.0.0.1", port, mark=7, ip_tos=0x10, backlog=50, name="renamed")
    retune(bound, new, unit=UNIT)
    assert bound.fd == fd and bound.listen is new
    assert getopt(bound, socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_MARK) == 7
    assert getopt(bound, socket.IPPROTO_IP, socket.IP_TOS) == 0x10
    assert getopt(bound, socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == _sysctl("net/ipv4/tcp_keepalive_time")
    assert getopt(bound, socket.SOL_SOCKET, socket.SO_RCVBUF) == _sysctl("net/ipv4/tcp_rmem", 1)
    if shutil.which("ss") is not None:
        assert _ss_backlog(port) == "50"


@needs_root
def test_retune_node_mode_owner_and_symlinks(binder: Any, short_dir: str) -> None:
    """retune gives the node its new mode and owner and moves the symlinks."""
    path = os.path.join(short_dir, "r.sock")
    first, second = os.path.join(short_dir, "first.link"), os.path.join(short_dir, "second.link")
    bound = binder(node(UNIX, path, mode=0o600, symlinks=(first,)))
    retune(bound, node(UNIX, path, mode=0o660, user="nobody", symlinks=(second,)), unit=UNIT)
    st = os.lstat(path)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_uid == pwd.getpwnam("nobody").pw_uid
    assert not os.path.lexists(first) and os.readlink(second) == path
    retune(bound, node(UNIX, path, mode=0o660, symlinks=(second,)), unit=UNIT)
    assert (os.lstat(path).st_uid, os.lstat(path).st_gid) == (os.geteuid(), os.getegid())


def test_retune_refuses_what_needs_a_new_socket(binder: Any, port: int, free_port: Callable[[], int]) -> None:
    """A different address or a bind-time option is a BindError, and the Bound keeps its entry."""
    bound = binder(inet(TCP, "127.0.0.1", port))
    before = bound.listen
    with pytest.raises(BindError, match="the address differs"):
        retune(bound, inet(TCP, "127.0.0.1", free_port()), unit=UNIT)
    with pytest.raises(BindError, match="reuse_port can only change with a new socket"):
        retune(bound, inet(TCP, "127.0.0.1", port, reuse_port=True), unit=UNIT)
    assert bound.listen is before


def test_set_blocking_toggles(binder: Any, port: int) -> None:
    """set_blocking flips O_NONBLOCK both ways (for pass: stdio)."""
    bound = binder(inet(TCP, "127.0.0.1", port))
    set_blocking(bound.fd, True)
    assert os.get_blocking(bound.fd) is True
    set_blocking(bound.fd, False)
    assert os.get_blocking(bound.fd) is False
