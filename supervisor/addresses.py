"""Listen addresses and allow/deny entries, from text to model objects.

Theory of operation: these are the address forms systemd's ``ListenStream=``
and friends accept, minus anything that needs the network to answer. A host is
an IP literal (``127.0.0.1``, ``[::1]``), never a name: resolving a name at
bind time makes the bound address depend on DNS, which systemd refuses too. A
bare port means "every address, dual stack" and is represented as
``InetAddress(host="", port, AF_INET6)``. IPv6 hosts are normalized to their
compressed form so that ``[0:0::1]:80`` and ``[::1]:80`` compare equal across
a reload.

Functions are pure and raise ``ValueError`` with a message that reads after
``listen[1].tcp: ``; the config layer adds the location. The only lookup is
the interface index for a scoped link-local address (``[fe80::1%eth0]:80``),
and it is injectable so tests (and ``check`` on another host) control it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
from collections.abc import Callable

from supervisor.model import InetAddress, Network

SUN_PATH_MAX = 108  # sizeof(struct sockaddr_un.sun_path) on Linux
_PATH_MAX = 4096
_UID = re.compile(r"uid:(\d+)")


def parse_port(text: str) -> int:
    """A port number 1-65535 from its decimal text."""
    if not text.isdigit():
        raise ValueError(f"invalid port {text!r}: expected a number 1-65535")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range (1-65535)")
    return port


def parse_inet(
    value: object,
    *,
    interface_index: Callable[[str], int] = socket.if_nametoindex,
) -> InetAddress:
    """A tcp/udp address: ``host:port``, ``[v6]:port``, ``[fe80::1%eth0]:port`` or a bare port.

    Args:
        value: the text (or a YAML int, for a bare port).
        interface_index: maps an interface name to its index, for scoped addresses.
    Raises:
        ValueError: the address is malformed, a host name, or the port is out of range.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError("expected an address like 127.0.0.1:8080, [::1]:8080 or a port")
    text = value.strip()
    if text.isdigit():
        return InetAddress("", parse_port(text), socket.AF_INET6)
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or not text[close + 1 :].startswith(":"):
            raise ValueError(f"invalid address {value!r}: expected [v6-address]:port")
        return _inet6(text[1:close], parse_port(text[close + 2 :]), interface_index)
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError(f"invalid address {value!r}: expected host:port, [v6-address]:port or a port")
    if ":" in host:
        raise ValueError(f"IPv6 addresses need brackets: [{host}]:{port_text}")
    port = parse_port(port_text)
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (host names are not resolved)") from None
    return InetAddress(str(address), port, socket.AF_INET)


def _inet6(host: str, port: int, interface_index: Callable[[str], int]) -> InetAddress:
    address_text, _, scope = host.partition("%")
    try:
        address = ipaddress.IPv6Address(address_text)
    except ValueError:
        raise ValueError(f"{host!r} is not an IPv6 address") from None
    if not scope:
        if "%" in host:
            raise ValueError(f"{host!r}: empty scope after '%'")
        return InetAddress(address.compressed, port, socket.AF_INET6)
    if scope.isdigit():
        scope_id = int(scope)
    else:
        try:
            scope_id = interface_index(scope)
        except OSError:
            raise ValueError(f"unknown network interface {scope!r}") from None
    return InetAddress(f"{address.compressed}%{scope}", port, socket.AF_INET6, scope_id)


def parse_unix_path(value: object) -> str:
    """A unix socket path: absolute, or ``@name`` for the abstract namespace."""
    if not isinstance(value, str):
        raise ValueError("expected an absolute path or @abstract-name")
    if "\0" in value:
        raise ValueError("path must not contain NUL bytes")
    if value.startswith("@"):
        if len(value) == 1:
            raise ValueError("abstract socket name is empty after '@'")
        length = len(value[1:].encode())
        limit = SUN_PATH_MAX - 1  # the leading NUL takes one byte of sun_path
        if length > limit:
            raise ValueError(f"abstract socket name is {length} bytes long; the limit is {limit}")
        return value
    if not value.startswith("/"):
        raise ValueError(f"unix socket path must be absolute or start with '@' (abstract): {value!r}")
    length = len(value.encode())
    limit = SUN_PATH_MAX - 1  # room for the terminating NUL, as systemd requires
    if length > limit:
        raise ValueError(f"unix socket path is {length} bytes long; the limit is {limit} (sun_path is 108 bytes)")
    return value


def parse_fifo_path(value: object) -> str:
    """A fifo path: absolute."""
    if not isinstance(value, str):
        raise ValueError("expected an absolute path")
    if "\0" in value:
        raise ValueError("path must not contain NUL bytes")
    if not value.startswith("/"):
        raise ValueError(f"fifo path must be absolute: {value!r}")
    if len(value.encode()) >= _PATH_MAX:
        raise ValueError(f"path is longer than {_PATH_MAX - 1} bytes")
    return value


def parse_any(text: str, *, interface_index: Callable[[str], int] = socket.if_nametoindex) -> InetAddress | str:
    """An address as ``sockvisor activate -l`` takes it: a port, host:port, [v6]:port, a path, or @name."""
    if text.startswith(("/", "@")):
        return parse_unix_path(text)
    return parse_inet(text, interface_index=interface_index)


def parse_network(value: object) -> Network:
    """An allow/deny entry: an IPv4/IPv6 address or CIDR, or ``uid:N`` for unix peers."""
    if not isinstance(value, str):
        raise ValueError("expected an address, a CIDR like 10.0.0.0/8, or uid:N")
    text = value.strip()
    if text.startswith("uid:"):
        match = _UID.fullmatch(text)
        if match is None:
            raise ValueError(f"invalid uid entry {value!r}: expected uid:N")
        return Network(text, uid=int(match.group(1)))
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an address, a CIDR or uid:N") from None
    return Network(text, network=network.compressed)


def format_sockaddr(family: int, name: object, *, scope_names: bool = True, unnamed: str = "(unnamed)") -> str:
    """Format a ``getsockname()``/``getpeername()`` result the way a user writes addresses.

    The one formatter of the package: the daemon's logs and status, ``sockvisor activate``
    and ``sockvisor fds`` differ only in the two keyword choices.

    Args:
        family: the socket's address family.
        name: what Python's ``getsockname()`` returned for it.
        scope_names: an IPv6 scope as its interface name (``%eth0``) when it has one; off,
            the number, as systemd's ``sockaddr_pretty()`` prints it.
        unnamed: what an unbound unix socket is shown as.

    Returns:
        ``1.2.3.4:80``, ``[::1]:80``, ``[fe80::1%eth0]:80``, a unix path, ``@name`` for an
        abstract unix name, or ``unnamed``.
    """
    if family == socket.AF_INET and isinstance(name, tuple):
        return f"{name[0]}:{name[1]}"
    if family == socket.AF_INET6 and isinstance(name, tuple):
        host, port = str(name[0]), name[1]
        scope = name[3] if len(name) > 3 else 0
        if scope and "%" not in host:
            label: object = scope
            if scope_names:
                with contextlib.suppress(OSError):  # an index with no interface stays a number
                    label = socket.if_indextoname(scope)
            host = f"{host}%{label}"
        return f"[{host}]:{port}"
    if isinstance(name, bytes):
        # Python returns abstract names as bytes with the leading NUL.
        if name.startswith(b"\0"):
            return "@" + name[1:].decode(errors="backslashreplace")
        name = os.fsdecode(name)
    if isinstance(name, str):
        if name.startswith("\0"):
            return "@" + name[1:]
        return name or unnamed
    return str(name)



# netlink(7) families by the names systemd's ListenNetlink= accepts (netlink_family_from_string).
NETLINK_FAMILIES = {
    "route": 0, "usersock": 2, "firewall": 3, "sock_diag": 4, "inet-diag": 4, "nflog": 5, "xfrm": 6,
    "selinux": 7, "iscsi": 8, "audit": 9, "fib-lookup": 10, "connector": 11, "netfilter": 12,
    "ip6-fw": 13, "dnrtmsg": 14, "kobject-uevent": 15, "generic": 16, "scsitransport": 18,
    "ecryptfs": 19, "rdma": 20, "crypto": 21, "smc": 22,
}


def netlink_parts(text: str) -> tuple[int, int]:
    """(protocol, group) of a netlink address as parsed by ``parse_netlink``."""
    family, _, group = text.partition(" ")
    proto = NETLINK_FAMILIES[family] if family in NETLINK_FAMILIES else int(family)
    return proto, int(group or "0")


def parse_netlink(text: str) -> str:
    """``"FAMILY [GROUP]"``: a family name or number (0-31) and an optional multicast group (normalized text)."""
    parts = text.split()
    if not 1 <= len(parts) <= 2:
        raise ValueError(f'expected "FAMILY [GROUP]" like "kobject-uevent 1", got {text!r}')
    family = parts[0]
    if family not in NETLINK_FAMILIES and not (family.isdigit() and int(family) <= 31):
        import difflib

        close = difflib.get_close_matches(family, list(NETLINK_FAMILIES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown netlink family {family!r}{hint}")
    group = parts[1] if len(parts) == 2 else "0"
    if not group.isdigit() or len(group) > 10 or int(group) > 2**32 - 1:
        raise ValueError(f"invalid netlink group {group!r} (0-4294967295)")
    return f"{family} {int(group)}"


def parse_mqueue(text: str) -> str:
    """A POSIX message queue name: ``/name``, one component, at most 255 bytes (NAME_MAX)."""
    if not text.startswith("/") or len(text) < 2 or "/" in text[1:]:
        raise ValueError(f"a message queue name is / and one component, like /myqueue; got {text!r}")
    if len(text[1:].encode()) > 255:
        raise ValueError("a message queue name is at most 255 bytes")
    return text


VMADDR_CID_ANY = 0xFFFFFFFF


def parse_vsock(text: str) -> str:
    """``CID:PORT`` (CID empty or "any" for VMADDR_CID_ANY), normalized to ``CID:PORT`` numbers."""
    cid_text, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError(f"expected CID:PORT for a vsock address, got {text!r}")
    if cid_text in ("", "any", "-1"):
        cid = VMADDR_CID_ANY
    elif cid_text.isdigit() and len(cid_text) <= 10 and int(cid_text) <= VMADDR_CID_ANY:
        cid = int(cid_text)
    else:
        raise ValueError(f"invalid vsock CID {cid_text!r}")
    if not port_text.isdigit() or len(port_text) > 10 or int(port_text) > 0xFFFFFFFF:
        raise ValueError(f"invalid vsock port {port_text!r}")
    return f"{cid}:{int(port_text)}"
