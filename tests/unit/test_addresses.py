"""Listen addresses and allow/deny entries."""

from __future__ import annotations

import socket

import pytest

from supervisor import addresses
from supervisor.model import InetAddress, Network


def _index(name: str) -> int:
    """A fake interface table: only eth0 (index 2) exists."""
    if name == "eth0":
        return 2
    raise OSError(19, "No such device")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("127.0.0.1:8080", InetAddress("127.0.0.1", 8080, socket.AF_INET)),
        ("0.0.0.0:80", InetAddress("0.0.0.0", 80, socket.AF_INET)),
        ("[::1]:8080", InetAddress("::1", 8080, socket.AF_INET6)),
        ("[0:0:0:0:0:0:0:1]:8080", InetAddress("::1", 8080, socket.AF_INET6)),
        ("[::]:443", InetAddress("::", 443, socket.AF_INET6)),
        ("8080", InetAddress("", 8080, socket.AF_INET6)),
        (8080, InetAddress("", 8080, socket.AF_INET6)),
        ("[fe80::1%eth0]:80", InetAddress("fe80::1%eth0", 80, socket.AF_INET6, 2)),
        ("[fe80::1%3]:80", InetAddress("fe80::1%3", 80, socket.AF_INET6, 3)),
    ],
)
def test_inet_forms(given: object, expected: InetAddress) -> None:
    """host:port, [v6]:port (normalized, optionally scoped) and bare ports parse to InetAddress."""
    assert addresses.parse_inet(given, interface_index=_index) == expected


def test_bare_port_means_dual_stack_any() -> None:
    """A bare port is the dual-stack wildcard and prints back as the port alone."""
    address = addresses.parse_inet("8080")
    assert address.any_dual_stack
    assert str(address) == "8080"


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("127.0.0.1:70000", "port 70000 is out of range (1-65535)"),
        ("127.0.0.1:0", "port 0 is out of range (1-65535)"),
        ("0", "port 0 is out of range (1-65535)"),
        (70000, "port 70000 is out of range (1-65535)"),
        ("127.0.0.1:http", "invalid port 'http': expected a number 1-65535"),
        ("localhost:80", "'localhost' is not an IP address (host names are not resolved)"),
        ("::1:80", "IPv6 addresses need brackets: [::1]:80"),
        ("[::1]80", "invalid address '[::1]80': expected [v6-address]:port"),
        ("[nope]:80", "'nope' is not an IPv6 address"),
        ("[fe80::1%eth9]:80", "unknown network interface 'eth9'"),
        ("127.0.0.1", "invalid address '127.0.0.1': expected host:port, [v6-address]:port or a port"),
        (True, "expected an address like 127.0.0.1:8080, [::1]:8080 or a port"),
    ],
)
def test_inet_errors(given: object, message: str) -> None:
    """Bad ports, host names, unbracketed IPv6 and unknown scopes are refused with a precise message."""
    with pytest.raises(ValueError) as raised:
        addresses.parse_inet(given, interface_index=_index)
    assert str(raised.value) == message


@pytest.mark.parametrize("given", ["/run/web.sock", "@web", "/" + "a" * 106])
def test_unix_paths(given: str) -> None:
    """Absolute paths and @abstract names up to 107 bytes are accepted verbatim."""
    assert addresses.parse_unix_path(given) == given


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("run/web.sock", "unix socket path must be absolute or start with '@' (abstract): 'run/web.sock'"),
        ("/" + "a" * 107, "unix socket path is 108 bytes long; the limit is 107 (sun_path is 108 bytes)"),
        ("@" + "a" * 108, "abstract socket name is 108 bytes long; the limit is 107"),
        ("@", "abstract socket name is empty after '@'"),
        (5, "expected an absolute path or @abstract-name"),
    ],
)
def test_unix_path_errors(given: object, message: str) -> None:
    """Relative paths, names too long for sun_path and empty abstract names are refused."""
    with pytest.raises(ValueError) as raised:
        addresses.parse_unix_path(given)
    assert str(raised.value) == message


def test_fifo_must_be_absolute() -> None:
    """A fifo path must be absolute; abstract names do not exist for fifos."""
    assert addresses.parse_fifo_path("/run/x.fifo") == "/run/x.fifo"
    with pytest.raises(ValueError, match="fifo path must be absolute"):
        addresses.parse_fifo_path("@x")


@pytest.mark.parametrize(
    ("given", "expected"),
    [("8080", InetAddress("", 8080, socket.AF_INET6)), ("/run/x.sock", "/run/x.sock"), ("@x", "@x")],
)
def test_parse_any_for_activate(given: str, expected: InetAddress | str) -> None:
    """The activate command's -l takes ports, IP addresses, paths and abstract names."""
    assert addresses.parse_any(given) == expected


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("10.0.0.0/8", Network("10.0.0.0/8", network="10.0.0.0/8")),
        ("10.1.2.3/8", Network("10.1.2.3/8", network="10.0.0.0/8")),
        ("192.168.1.7", Network("192.168.1.7", network="192.168.1.7/32")),
        ("2001:db8::/32", Network("2001:db8::/32", network="2001:db8::/32")),
        ("uid:1000", Network("uid:1000", uid=1000)),
    ],
)
def test_networks(given: str, expected: Network) -> None:
    """Addresses and CIDRs (host bits allowed) and uid:N parse to Network."""
    assert addresses.parse_network(given) == expected


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("uid:root", "invalid uid entry 'uid:root': expected uid:N"),
        ("example.com", "'example.com' is not an address, a CIDR or uid:N"),
        (10, "expected an address, a CIDR like 10.0.0.0/8, or uid:N"),
    ],
)
def test_network_errors(given: object, message: str) -> None:
    """Non-numeric uids, host names and numbers are not allow/deny entries."""
    with pytest.raises(ValueError) as raised:
        addresses.parse_network(given)
    assert str(raised.value) == message
