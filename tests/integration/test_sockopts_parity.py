"""systemd's per-listen options added for parity, each read back from the kernel after a real bind."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

import pytest

from supervisor import sockopts
from supervisor.errors import BindError
from supervisor.matching import matches
from supervisor.model import InetAddress, Listen, ListenKind
from supervisor.sockets import bind, retune
from tests.conftest import free_port

F_GETPIPE_SZ = 1032


def _tcp(**options: object) -> Listen:
    return Listen(ListenKind.TCP, InetAddress("127.0.0.1", free_port(), socket.AF_INET), "t", **options)  # type: ignore[arg-type]


def _udp(host: str = "127.0.0.1", family: int = socket.AF_INET, **options: object) -> Listen:
    port = free_port(socket.SOCK_DGRAM, family)
    return Listen(ListenKind.UDP, InetAddress(host, port, family), "u", **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(("protocol", "kind", "number"), [("mptcp", "tcp", 262), ("udplite", "udp", 136),
                                                          ("sctp", "tcp", 132)])
def test_protocol_makes_the_socket_with_that_protocol(protocol: str, kind: str, number: int) -> None:
    """protocol: (SocketProtocol=) creates the socket with IPPROTO_MPTCP/UDPLITE/SCTP, and adoption checks it."""
    listen = _tcp(protocol=protocol) if kind == "tcp" else _udp(protocol=protocol)
    try:
        b = bind(listen, unit="p")
    except BindError as exc:
        if "the kernel has no" in str(exc):
            pytest.skip(f"this kernel has no {protocol}: {exc}")
        raise
    try:
        assert b.sock is not None and b.sock.getsockopt(socket.SOL_SOCKET, sockopts.SO_PROTOCOL) == number
        assert matches(b.fd, listen)
        plain = Listen(listen.kind, listen.address, listen.name)
        assert not matches(b.fd, plain)  # a plain tcp/udp entry does not adopt it
    finally:
        b.close()


def test_pass_security_on_unix(tmp_path: Path) -> None:
    """pass_security sets SO_PASSSEC on a unix socket."""
    b = bind(Listen(ListenKind.UNIX, str(tmp_path / "s.sock"), "s", pass_security=True), unit="p")
    try:
        assert b.sock is not None and b.sock.getsockopt(socket.SOL_SOCKET, sockopts.SO_PASSSEC) == 1
    finally:
        b.close()


@pytest.mark.parametrize(("host", "family"), [("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)])
def test_pass_packet_info(host: str, family: int) -> None:
    """pass_packet_info sets IP_PKTINFO (and IPV6_RECVPKTINFO on IPv6)."""
    try:
        b = bind(_udp(host, family, pass_packet_info=True), unit="p")
    except BindError as exc:
        pytest.skip(f"no {host} here: {exc}")
    try:
        assert b.sock is not None
        if family == socket.AF_INET6:
            assert b.sock.getsockopt(socket.IPPROTO_IPV6, sockopts.IPV6_RECVPKTINFO) == 1
        else:
            assert b.sock.getsockopt(socket.IPPROTO_IP, sockopts.IP_PKTINFO) == 1
    finally:
        b.close()


def test_timestamping_us_ns_and_back_off_on_reload() -> None:
    """timestamping: us sets SO_TIMESTAMP, ns SO_TIMESTAMPNS; a reload that drops it turns it off in place."""
    listen = _udp(timestamping="ns")
    b = bind(listen, unit="p")
    try:
        assert b.sock is not None and b.sock.getsockopt(socket.SOL_SOCKET, sockopts.SO_TIMESTAMPNS) == 1
        retune(b, Listen(listen.kind, listen.address, listen.name, timestamping="us"), unit="p")
        assert b.sock.getsockopt(socket.SOL_SOCKET, sockopts.SO_TIMESTAMPNS) == 0
        assert b.sock.getsockopt(socket.SOL_SOCKET, sockopts.SO_TIMESTAMP) == 1
        retune(b, Listen(listen.kind, listen.address, listen.name), unit="p")
        assert b.sock.getsockopt(socket.SOL_SOCKET, sockopts.SO_TIMESTAMP) == 0
    finally:
        b.close()


def test_tcp_congestion_is_set_and_an_unknown_one_is_a_clear_error() -> None:
    """tcp_congestion picks the algorithm (read back with TCP_CONGESTION); an unknown name says where to look."""
    available = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
    name = "reno" if "reno" in available else available[0]
    b = bind(_tcp(tcp_congestion=name), unit="p")
    try:
        assert b.sock is not None
        assert b.sock.getsockopt(socket.IPPROTO_TCP, sockopts.TCP_CONGESTION, 16).rstrip(b"\0") == name.encode()
    finally:
        b.close()
    with pytest.raises(BindError, match="no such congestion control"):
        bind(_tcp(tcp_congestion="nosuchcc"), unit="p")


def test_pipe_size_of_a_fifo_and_on_reload(tmp_path: Path) -> None:
    """pipe_size sets the fifo's capacity (F_GETPIPE_SZ reads it back), also when a reload changes it."""
    listen = Listen(ListenKind.FIFO, str(tmp_path / "f"), "f", pipe_size=1 << 20)
    b = bind(listen, unit="p")
    try:
        assert fcntl.fcntl(b.fd, F_GETPIPE_SZ) == 1 << 20
        retune(b, Listen(ListenKind.FIFO, listen.address, "f", pipe_size=1 << 17), unit="p")
        assert fcntl.fcntl(b.fd, F_GETPIPE_SZ) == 1 << 17
    finally:
        b.close()
    assert not os.path.exists(tmp_path / "f")


# ---------------------------------------------------------------- netlink, special, mqueue, vsock


def test_netlink_socket_of_the_family_joined_to_the_group() -> None:
    """netlink: "kobject-uevent 1" is a raw AF_NETLINK socket of protocol 15 bound to group 1; it is adopted back."""
    listen = Listen(ListenKind.NETLINK, "kobject-uevent 1", "uevent")
    b = bind(listen, unit="p")
    try:
        assert b.sock is not None and b.sock.family == socket.AF_NETLINK
        assert b.sock.getsockopt(socket.SOL_SOCKET, sockopts.SO_PROTOCOL) == 15
        assert b.sock.getsockname()[1] == 1
        assert matches(b.fd, listen) and not matches(b.fd, Listen(ListenKind.NETLINK, "route 0", "r"))
    finally:
        b.close()


def test_special_files_open_read_only_or_writable(tmp_path: Path) -> None:
    """special: a character device opens read-only (writable: read-write); a plain file outside /proc and /sys
    is refused with why; the device is never removed on stop."""
    ro = bind(Listen(ListenKind.SPECIAL, "/dev/null", "n"), unit="p")
    rw = bind(Listen(ListenKind.SPECIAL, "/dev/null", "n", writable=True), unit="p")
    try:
        assert fcntl.fcntl(ro.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert fcntl.fcntl(rw.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        assert matches(ro.fd, Listen(ListenKind.SPECIAL, "/dev/null", "n"))
    finally:
        ro.close()
        rw.close()
    assert os.path.exists("/dev/null")
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(BindError, match="neither a character device nor a file under /proc or /sys"):
        bind(Listen(ListenKind.SPECIAL, str(plain), "x"), unit="p")
    b = bind(Listen(ListenKind.SPECIAL, "/proc/self/status", "s"), unit="p")
    b.close()


def test_mqueue_with_sizes_and_removed_on_stop() -> None:
    """mqueue: the queue is created with its mode and sizes (read back with mq_getattr) and unlinked on stop."""
    from supervisor import specials

    name = f"/sv-test-{os.getpid()}"
    listen = Listen(ListenKind.MQUEUE, name, "q", mode=0o600, mqueue_max_messages=5, mqueue_message_size=256)
    try:
        b = bind(listen, unit="p")
    except BindError as exc:
        pytest.skip(f"no POSIX message queues here: {exc}")
    try:
        assert specials.mq_attributes(b.fd) == (5, 256)
        if os.path.isdir("/dev/mqueue"):
            assert os.stat(f"/dev/mqueue{name}").st_mode & 0o777 == 0o600
    finally:
        b.close()
    b2 = bind(Listen(ListenKind.MQUEUE, name, "q", mqueue_max_messages=3, mqueue_message_size=64), unit="p")
    try:
        assert specials.mq_attributes(b2.fd) == (3, 64)  # the first queue was removed: a new one, new sizes
    finally:
        b2.close()


def test_vsock_listens_or_says_the_kernel_lacks_it() -> None:
    """vsock: "any:PORT" listens on AF_VSOCK where the kernel has it; elsewhere the error says so."""
    listen = Listen(ListenKind.VSOCK, f"{0xFFFFFFFF}:{free_port()}", "v")
    try:
        b = bind(listen, unit="p")
    except BindError as exc:
        assert "vsock" in str(exc)
        pytest.skip(f"no vsock in this kernel: {exc}")
    try:
        assert b.sock is not None and b.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert matches(b.fd, listen)
    finally:
        b.close()
