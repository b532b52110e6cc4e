"""Translate xinetd.conf(5) into sockvisor units.

Theory of operation: two passes, as xinetd itself works.

1. *Parse* (``_Parser``): the files are read line by line with xinetd's rules.
   Outside a block a line is ``defaults``, ``service NAME``, ``include FILE``
   or ``includedir DIR``; a block opens with ``{`` (on its own line, or ending
   the header line) and closes with ``}`` on its own line. Inside, a line is
   ``attribute OP value...`` with OP ``=``, ``+=`` or ``-=`` and the values
   split on blanks (xinetd has no quoting). Lines whose first non-blank
   character is ``#`` are comments. ``includedir`` reads the directory's
   files in name order, skipping names that contain a ``.`` or end in ``~``,
   as xinetd does. Relative include paths are taken from the including file's
   directory; absolute ones under ``root`` when one is given (an unpacked or
   mounted system, such as the test corpus). Anything else is an ``ImportSyntaxError`` with file and line.

2. *Translate* (``_Translator``): each service's attributes are resolved
   against ``defaults`` (``=`` replaces a default, ``+=`` adds to it, ``-=``
   removes from it), then mapped attribute by attribute through ``_HANDLERS``.
   An attribute without a handler, or a value a handler cannot carry over,
   becomes a ``Dropped`` warning and a comment in the unit. A service that
   cannot exist in sockvisor at all (RPC, TCPMUX, an internal service without
   a builtin, no port) is dropped whole, with one warning.

Where sockvisor behaves differently from xinetd for a setting it does carry
over, the unit gets a note: xinetd refuses over ``instances`` and disables a
service over ``cps``; sockvisor pauses accepting and clients wait in the
backlog.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from supervisor.importing import (
    Collector,
    Dropped,
    ImportedUnit,
    ImportReadError,
    ImportResult,
    ImportSyntaxError,
    decimal,
    order_unit,
)

Resolver = Callable[[str], list[str]]

MAX_INCLUDE_DEPTH = 16
UNLIMITED_CONNECTIONS = 1_000_000  # "instances = UNLIMITED": a limit no real host reaches
BUILTINS = ("echo", "discard", "daytime", "chargen", "time")
PER_CONNECTION_ONLY = "only applies to per-connection (wait = no, stream) services"
_NAME_BAD = re.compile(r"[^A-Za-z0-9_.@-]")
_ATTRIBUTE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(\+=|-=|=)(.*)")
_TIME_RANGE = re.compile(r"(\d{1,2}):(\d{1,2})-(\d{1,2}):(\d{1,2})", re.ASCII)
_FACTORIZED = re.compile(r"((?:\d{1,3}\.){0,3})\{([\d,]+)\}", re.ASCII)
_SIZE = re.compile(r"(\d+)([KkMm]?)", re.ASCII)


def resolve_host(name: str) -> list[str]:
    """Every address ``name`` resolves to, in getaddrinfo's order without repeats.

    Raises:
        OSError: the name does not resolve (or cannot be encoded for lookup).
    """
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (UnicodeError, ValueError) as exc:
        raise OSError(str(exc)) from None
    out: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in out:
            out.append(address)
    return out


# ----------------------------------------------------------------------------
# Pass 1: parsing


@dataclass(slots=True)
class _Assignment:
    """One ``attribute OP values`` line."""

    name: str
    op: str
    values: list[str]
    file: str
    line: int


@dataclass(slots=True)
class _Block:
    """A ``defaults`` or ``service NAME`` block with its assignments in file order."""

    kind: str
    name: str
    file: str
    line: int
    assignments: list[_Assignment] = field(default_factory=list)


def _read(path: str) -> list[str]:
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise ImportReadError(path, exc.strerror or str(exc)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ImportSyntaxError(path, line, "not valid UTF-8 text") from None
    if "\x00" in text:
        raise ImportSyntaxError(path, text[: text.index("\x00")].count("\n") + 1, "a NUL character")
    return text.split("\n")


class _Parser:
    """Reads xinetd configuration files into blocks, following include and includedir."""

    def __init__(self, root: str | None = None) -> None:
        self.blocks: list[_Block] = []
        self.root = root
        self._open: list[str] = []  # files being read, to refuse an include loop

    def parse_file(self, path: str, *, via: tuple[str, int] | None = None) -> None:
        real = os.path.realpath(path)
        if real in self._open or len(self._open) >= MAX_INCLUDE_DEPTH:
            file, line = via if via is not None else (path, 0)
            raise ImportSyntaxError(file, line, f"include loop or too deep: {path}")
        lines = _read(path)
        self._open.append(real)
        try:
            self._parse_lines(path, lines)
        finally:
            self._open.pop()

    def _parse_lines(self, path: str, lines: list[str]) -> None:
        block: _Block | None = None
        pending: _Block | None = None  # a header read, waiting for its "{"
        for number, raw in enumerate(lines, start=1):
            text = raw.strip()
            if not text or text.startswith("#"):
                continue
            if pending is not None:
                if text != "{":
                    raise ImportSyntaxError(path, number, f"expected '{{' to open {_what(pending)}")
                block, pending = pending, None
                continue
            if block is not None:
                if text == "}":
                    self.blocks.append(block)
                    block = None
                    continue
                block.assignments.append(_assignment(path, number, text, block))
                continue
            words = text.split()
            keyword = words[0]
            opens = len(words) > 1 and words[-1] == "{"
            if opens:
                words = words[:-1]
            if keyword == "defaults" and len(words) == 1:
                header = _Block("defaults", "defaults", path, number)
            elif keyword == "service" and len(words) == 2 and words[1] != "{":
                header = _Block("service", words[1], path, number)
            elif keyword in ("include", "includedir") and len(words) == 2 and not opens:
                target = self._include_path(path, words[1])
                if keyword == "include":
                    self.parse_file(target, via=(path, number))
                else:
                    self._parse_dir(target, (path, number))
                continue
            else:
                expected = "'service NAME', 'defaults', 'include FILE' or 'includedir DIR'"
                raise ImportSyntaxError(path, number, f"expected {expected}, got {text!r}")
            if opens:
                block = header
            else:
                pending = header
        if block is not None or pending is not None:
            opened = block if block is not None else pending
            assert opened is not None
            raise ImportSyntaxError(path, opened.line, f"{_what(opened)} is never closed with '}}'")

    def _include_path(self, path: str, name: str) -> str:
        """An include's path: relative to the including file's directory, an absolute one under ``root``."""
        if self.root is not None and name.startswith("/"):
            return os.path.join(self.root, name.lstrip("/"))
        return os.path.join(os.path.dirname(path), name)

    def _parse_dir(self, directory: str, via: tuple[str, int]) -> None:
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            raise ImportReadError(directory, exc.strerror or str(exc)) from None
        for name in names:
            # xinetd skips editor backups and package-manager leftovers
            # (foo~, foo.rpmsave, foo.dpkg-old): any name with a dot or a tilde at the end.
            if "." in name or name.endswith("~"):
                continue
            full = os.path.join(directory, name)
            if os.path.isfile(full):
                self.parse_file(full, via=via)


def _what(block: _Block) -> str:
    return "defaults" if block.kind == "defaults" else f"service {block.name}"


def _assignment(path: str, number: int, text: str, block: _Block) -> _Assignment:
    match = _ATTRIBUTE.fullmatch(text)
    if match is None:
        if text in ("{", "}") or text.startswith(("service ", "defaults")):
            message = f"{_what(block)} (line {block.line}) is not closed before this line"
        else:
            message = f"expected 'attribute = value' (or += / -=), got {text!r}"
        raise ImportSyntaxError(path, number, message)
    name, op, rest = match.groups()
    return _Assignment(name, op, rest.split(), path, number)


# ----------------------------------------------------------------------------
# Pass 2: translation


@dataclass(slots=True)
class _Value:
    """An attribute's resolved value and the line that last set it."""

    values: list[str]
    file: str
    line: int

    @property
    def text(self) -> str:
        return " ".join(self.values)


_DEFAULTS_ONLY = ("enabled", "disabled")


def _resolve(assignments: list[_Assignment], base: dict[str, _Value]) -> dict[str, _Value]:
    """Apply ``=``, ``+=`` and ``-=`` in order on top of ``base`` (the defaults)."""
    out = {name: _Value(list(v.values), v.file, v.line) for name, v in base.items()}
    for a in assignments:
        current = out.get(a.name)
        if a.op == "=" or current is None:
            values = list(a.values) if a.op != "-=" else []
        elif a.op == "+=":
            values = current.values + [v for v in a.values if v not in current.values]
        else:
            values = [v for v in current.values if v not in a.values]
        out[a.name] = _Value(values, a.file, a.line)
    return out


class _Services:
    """/etc/services, read once on first use: (name or alias, protocol) -> port."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._table: dict[tuple[str, str], int] | None = None
        self.problem = ""

    def port(self, name: str, protocol: str) -> int | None:
        if self._table is None:
            self._table = {}
            try:
                with open(self.path, encoding="utf-8", errors="replace") as handle:
                    text = handle.read()
            except OSError as exc:
                self.problem = f" ({self.path} cannot be read: {exc.strerror or exc})"
                text = ""
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                if len(words) < 2 or "/" not in words[1]:
                    continue
                port_text, _, proto = words[1].partition("/")
                number = decimal(port_text, 1, 65535)
                if number is None:
                    continue
                for alias in [words[0], *words[2:]]:
                    self._table.setdefault((alias, proto), number)
        return self._table.get((name, protocol))


class _Translator:
    """Turns resolved services into units, recording what is not carried over."""

    def __init__(self, collector: Collector, services: _Services, resolve: Resolver) -> None:
        self.collector = collector
        self.services = services
        self.resolve = resolve
        self.names: set[str] = set()
        self.ids: dict[str, tuple[str, int]] = {}

    # -- one service -------------------------------------------------------

    def service(self, block: _Block, defaults: dict[str, _Value], enabled: _Value | None,
                disabled: _Value | None) -> None:
        attrs = _resolve(block.assignments, defaults)
        ident = attrs["id"].values[0] if "id" in attrs and attrs["id"].values else block.name
        if ident in self.ids:
            file, line = self.ids[ident]
            self._drop_service(block, "id", ident, f"a service with id {ident!r} is already defined at {file}:{line}")
            for a in block.assignments:
                self.collector.discard(a.file, a.line)
            return
        self.ids[ident] = (block.file, block.line)
        unit = ImportedUnit(self._unit_name(ident), block.file, block.line, {})
        reason = self._build(unit, block, attrs)
        if reason is not None:
            key, value, why = reason
            self._drop_service(block, key, value, why, attrs.get(key))
            self.names.discard(unit.name)
            for a in block.assignments:
                self.collector.discard(a.file, a.line)
            return
        if enabled is not None and ident not in enabled.values and block.name not in enabled.values:
            unit.data["enabled"] = False
            unit.comments.append(f"disabled: not in the defaults' enabled list ({enabled.file}:{enabled.line})")
        if disabled is not None and (ident in disabled.values or block.name in disabled.values):
            unit.data["enabled"] = False
            unit.comments.append(f"disabled: in the defaults' disabled list ({disabled.file}:{disabled.line})")
        unit.data = order_unit(unit.data)
        self.collector.result.units.append(unit)

    def _drop_service(self, block: _Block, key: str, value: str, why: str, where: _Value | None = None) -> None:
        file, line = (where.file, where.line) if where is not None else (block.file, block.line)
        self.collector.drop(None, Dropped(file, line, key, value, f"service {block.name} is not imported: {why}"))

    def _unit_name(self, ident: str) -> str:
        base = _NAME_BAD.sub("-", ident)[:60] or "service"
        name, n = base, 1
        while name in self.names:
            n += 1
            name = f"{base}-{n}"
        self.names.add(name)
        return name

    def drop(self, unit: ImportedUnit, key: str, value: _Value | str, why: str, where: _Value | None = None) -> None:
        """Record that ``key`` (whose value is ``value``) was not carried over into ``unit``."""
        source = where if where is not None else value if isinstance(value, _Value) else None
        file, line = (source.file, source.line) if source is not None else (unit.source, unit.line)
        text = value.text if isinstance(value, _Value) else value
        self.collector.drop(unit, Dropped(file, line, key, text, why))

    def _build(self, unit: ImportedUnit, block: _Block, attrs: dict[str, _Value]) -> tuple[str, str, str] | None:
        """Fill ``unit.data``; returns (key, value, why) when the whole service cannot be imported."""
        data = unit.data
        data["name"] = unit.name
        types = [t.upper() for t in attrs["type"].values] if "type" in attrs else []
        for kind in ("RPC", "TCPMUX", "TCPMUXPLUS"):
            if kind in types:
                return "type", attrs["type"].text, f"{kind} services have no sockvisor equivalent"
        socket_type = _first(attrs, "socket_type")
        if socket_type not in ("stream", "dgram"):
            why = f"socket_type {socket_type} has no sockvisor listen kind" if socket_type else "it has no socket_type"
            return "socket_type", socket_type, why
        datagram = socket_type == "dgram"
        protocol = _first(attrs, "protocol")
        lookup_protocol = protocol or ("udp" if datagram else "tcp")

        # Port: an explicit port wins; otherwise the service name in /etc/services.
        port: int | None = None
        if "port" in attrs:
            text = attrs["port"].text
            port = decimal(text, 1, 65535)
            if port is None:
                self.drop(unit, "port", attrs["port"], "not a port number 1-65535")
        if port is None:
            if "UNLISTED" in types:
                return "type", "UNLISTED", "an unlisted service needs a port"
            port = self.services.port(block.name, lookup_protocol)
            if port is None:
                return "port", "", (
                    f"no port, and {block.name}/{lookup_protocol} is not in {self.services.path}{self.services.problem}"
                )
            unit.comments.append(f"port {port}: {block.name}/{lookup_protocol} in {self.services.path}")

        flags = [f.upper() for f in attrs["flags"].values] if "flags" in attrs else []
        listen = self._listen(unit, attrs, flags, "udp" if datagram else "tcp", port)
        if protocol and protocol != ("udp" if datagram else "tcp"):
            if protocol in ("sctp", "mptcp", "udplite"):
                listen["protocol"] = protocol
            else:
                why = f"protocol {protocol} does not fit socket_type {socket_type}"
                self.drop(unit, "protocol", attrs["protocol"], why)
        data["listen"] = [listen]

        # Mode: wait = yes is the inetd "wait" contract, one program gets the socket.
        wait_value = _first(attrs, "wait").lower()
        if wait_value not in ("yes", "no"):
            wait_value = "yes" if datagram else "no"
            if "wait" in attrs:
                self.drop(unit, "wait", attrs["wait"], f"expected yes or no; taken as {wait_value}")
            elif "INTERNAL" not in types:
                unit.comments.append(f"wait is not set: taken as wait = {wait_value}")
        per_connection = wait_value == "no" and not datagram
        if wait_value == "no" and datagram:
            self.drop(unit, "wait", attrs.get("wait", "no"),
                      "sockvisor has no per-datagram children: the socket goes to one program (mode: service)")
        if "redirect" in attrs:
            return self._redirect(unit, attrs, per_connection)
        data["mode"] = "accept" if per_connection else "service"
        if "INTERNAL" in types:
            if block.name not in BUILTINS:
                why = _INTERNAL_WHY.get(block.name, f"internal service {block.name} has no sockvisor builtin")
                return "type", attrs["type"].text, why
            data["builtin"] = block.name
            for key in ("server", "server_args"):
                if key in attrs:
                    self.drop(unit, key, attrs[key], "an internal service runs no program")
        else:
            if not (attrs.get("server") and attrs["server"].values):
                return "server", "", "server is required for a service that is not INTERNAL or redirected"
            data["pass"] = "stdio"
            data["exec"] = self._exec(unit, attrs, flags)
        self._flags(unit, attrs, flags, listen)
        self._attributes(unit, attrs, per_connection)
        return None

    # -- pieces -----------------------------------------------------------

    def _listen(self, unit: ImportedUnit, attrs: dict[str, _Value], flags: list[str], kind: str,
                port: int) -> dict[str, Any]:
        host: str | None = None
        for key in ("bind", "interface"):
            if key in attrs and attrs[key].values:
                address = attrs[key].values[0]
                found = self._addresses(unit, key, attrs[key], address)
                if found:
                    host = found[0]
                    break
        if host is None:
            host = "::" if "IPV6" in flags else "0.0.0.0"
        listen: dict[str, Any] = {kind: f"[{host}]:{port}" if ":" in host else f"{host}:{port}"}
        if ":" in host:
            v6only = attrs.get("v6only")
            listen["ipv6_only"] = bool(v6only and v6only.values and v6only.values[0].lower() == "yes")
        elif "v6only" in attrs:
            self.drop(unit, "v6only", attrs["v6only"], "only applies to IPv6 services")
        return listen

    def _exec(self, unit: ImportedUnit, attrs: dict[str, _Value], flags: list[str]) -> list[str]:
        server = attrs["server"].values[0]
        args = attrs["server_args"].values if "server_args" in attrs else []
        if "NAMEINARGS" not in flags:
            return [server, *args]
        if os.path.basename(server) == "tcpd" and args:
            unit.comments.append(
                f"NAMEINARGS with tcpd: runs {args[0]} directly (use allow/deny for tcpd's hosts.allow rules)"
            )
            return list(args)
        if args:
            unit.comments.append(f"NAMEINARGS: argv[0] was {args[0]!r}; sockvisor passes the program path")
        return [server, *args[1:]]

    def _redirect(
        self, unit: ImportedUnit, attrs: dict[str, _Value], per_connection: bool
    ) -> tuple[str, str, str] | None:
        value = attrs["redirect"]
        if len(value.values) != 2 or decimal(value.values[1], 1, 65535) is None:
            return "redirect", value.text, "expected 'redirect = HOST PORT'"
        if not per_connection:
            return "redirect", value.text, "redirect needs a stream service with wait = no"
        found = self._addresses(unit, "redirect", value, value.values[0])
        if not found:
            return "redirect", value.text, f"{value.values[0]} does not resolve"
        host = found[0]
        unit.data["mode"] = "proxy"
        port = decimal(value.values[1], 1, 65535)
        unit.data["backend"] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        for key in ("server", "server_args"):
            if key in attrs:
                self.drop(unit, key, attrs[key], "xinetd ignores the server of a redirected service")
        flags = [f.upper() for f in attrs["flags"].values] if "flags" in attrs else []
        self._flags(unit, attrs, flags, unit.data["listen"][0])
        self._attributes(unit, attrs, True)
        return None

    def _flags(self, unit: ImportedUnit, attrs: dict[str, _Value], flags: list[str], listen: dict[str, Any]) -> None:
        tcp = "tcp" in listen
        for flag in flags:
            if flag in ("IPV4", "IPV6", "NAMEINARGS"):
                continue
            if flag == "REUSE":
                unit.comments.append("flags REUSE: sockvisor always sets SO_REUSEADDR")
            elif flag in ("KEEPALIVE", "NODELAY"):
                if tcp:
                    listen[flag.lower()] = True
                else:
                    self.drop(unit, "flags", flag, "only applies to tcp services", attrs["flags"])
            elif flag == "NORETRY":
                unit.comments.append("flags NORETRY: sockvisor never retries a failed spawn (reason spawn_failed)")
            else:
                self.drop(unit, "flags", flag, _FLAG_WHY.get(flag, "no sockvisor equivalent"), attrs["flags"])

    def _attributes(self, unit: ImportedUnit, attrs: dict[str, _Value], per_connection: bool) -> None:
        for key, value in attrs.items():
            if key in _STRUCTURAL:
                continue
            handler = _HANDLERS.get(key)
            if handler is None:
                self.drop(unit, key, value, _WHY.get(key, "unknown attribute"))
                continue
            if key in _PER_CONNECTION_KEYS and not per_connection:
                self.drop(unit, key, value, PER_CONNECTION_ONLY)
                continue
            handler(self, unit, value)

    def _addresses(self, unit: ImportedUnit, key: str, value: _Value, name: str) -> list[str]:
        """``name`` as addresses: itself when it is one, else resolved now (noted); [] after a warning."""
        try:
            return [ipaddress.ip_address(name).compressed]
        except ValueError:
            pass
        try:
            found = [a for a in self.resolve(name) if _is_ip(a)]
        except OSError as exc:
            self.drop(unit, key, value, f"host name {name} does not resolve: {exc}")
            return []
        if not found:
            self.drop(unit, key, value, f"host name {name} resolves to no address")
            return []
        note = f"{key}: host name {name} resolved at import time to {', '.join(found)}"
        if note not in unit.comments:
            unit.comments.append(note)
        return found

    def networks(self, unit: ImportedUnit, key: str, value: _Value) -> list[str]:
        out: list[str] = []
        for entry in value.values:
            for item in _expand(entry):
                for network in self._network(unit, key, value, item):
                    if network not in out:
                        out.append(network)
        return out

    def _network(self, unit: ImportedUnit, key: str, value: _Value, item: str) -> list[str]:
        if item.startswith("."):
            self.drop(unit, key, item, "domain suffixes cannot be matched (sockvisor does no reverse lookups)", value)
            return []
        if "/" in item:
            try:
                return [ipaddress.ip_network(item, strict=False).compressed]
            except ValueError:
                self.drop(unit, key, item, "not an address or CIDR", value)
                return []
        try:
            address = ipaddress.ip_address(item)
        except ValueError:
            return [f"{a}" for a in self._addresses(unit, key, _Value([item], value.file, value.line), item)]
        if isinstance(address, ipaddress.IPv4Address):
            # xinetd: trailing zero octets are wildcards (128.138.12.0 is the /24, 0.0.0.0 everything).
            octets = item.split(".")
            zeros = 0
            while zeros < 4 and octets[3 - zeros] in ("0", "00", "000"):
                zeros += 1
            if zeros == 4:
                return ["0.0.0.0/0", "::/0"]
            if zeros:
                return [ipaddress.ip_network(f"{address}/{32 - 8 * zeros}", strict=False).compressed]
        return [address.compressed]


def _first(attrs: dict[str, _Value], key: str) -> str:
    """The first word of attribute ``key``, or "" when it is unset or empty."""
    value = attrs.get(key)
    return value.values[0] if value is not None and value.values else ""


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _expand(entry: str) -> list[str]:
    """xinetd's factorized addresses: ``10.0.1.{1,2,7}`` is three addresses."""
    match = _FACTORIZED.fullmatch(entry)
    if match is None:
        return [entry]
    prefix, parts = match.groups()
    return [prefix + part for part in parts.split(",") if part]


# -- attribute handlers: (translator, unit, value) -> None ----------------------


def _user(t: _Translator, unit: ImportedUnit, value: _Value) -> None:
    if len(value.values) == 1:
        unit.data["user"] = value.values[0]
    else:
        t.drop(unit, "user", value, "expected one user name")


def _group(t: _Translator, unit: ImportedUnit, value: _Value) -> None:
    if len(value.values) == 1:
        unit.data["group"] = value.values[0]
    else:
        t.drop(unit, "group", value, "expected one group name")


def _groups(t: _Translator, unit: ImportedUnit, value: _Value) -> None:
    if value.text.lower() == "yes":
        t.drop(unit, "groups", value, "sockvisor does not take the user's groups from /etc/group: "
               "list them in supplementary_groups")
    elif value.text.lower() != "no":
        t.drop(unit, "groups", value, "expected yes or no")


def _disable(t: _Translator, unit: ImportedUnit, value: _Value) -> None:
    word = value.text.lower()
    if word == "yes":
        unit.data["enabled"] = False
    elif word != "no":
        t.drop(unit, "disable", value, "expected yes or no")


def _instances(t: _Translator, unit: ImportedUnit, value: _Value) -> None:
    text = value.text
    if text.upper() == "UNLIMITED":
        unit.data["max_connections"] = UNLIMITED_CONNECTIONS
    elif (count := decimal(text, 1, 2**31 - 1)) is not None:
        unit.data["max_connections"] = count
    else:
        t.drop(unit, "instances", value, "expected a number or UNLIMITED")
        return
    unit.comments.append("instances: at max_connections sockvisor stops accepting and clients wait in the "
                         "backlog, where xinetd refuses them")


def _per_source(t: _Translator, unit: ImportedUnit, value: _Value) -> None:
    text = value.text
    if text.upper() == "UNLIMITED":
        return
    if (count := decimal(text, 1, 2**31 - 1)) is not None:
        unit.data["max_connections_per_source"] = count
    else:
        t.drop(unit, "per_source", value, "expected a number or UNLIMITED")


def _cps(t: _Translator, unit: ImportedUnit, value: _Value) -> None:
    rate = decimal(value.values[0], 1, 10**9) if len(value.values) == 2 else None
    if rate is None or decimal(value.values[1], 0, 2**31 - 1) is None:
        t.drop(unit, "cps", value, "expected 'cps = RATE WAIT'")
        return
    unit.data["rate"] = {"per_second": rate, "burst": rate}
    unit.comments.append(f"cps: over {rate} connections a second sockvisor pauses accepting, where xinetd "
                         f"disables the service for {value.values[1]} seconds")


def _only_from(t: _Translator, unit: ImportedUnit, value: _Value) -> None:
    allow = t.networks(unit, "only_from", value)
    if allow:
        unit.data["allow"] = allow
        return
    # An empty only_from (or one with nothing that could be carried over)
    # admits nobody in xinetd; an empty allow would admit everybody.
    unit.data["deny"] = ["0.0.0.0/0", "::/0"]
    unit.comments.append("only_from admits nobody here: every client is denied")


def _no_access(t: _Translator, unit: ImportedUnit, value: _Value) -> None:
    deny = t.networks(unit, "no_access", value)
    if deny:
        existing = unit.data.get("deny", [])
        unit.data["deny"] = existing + [d for d in deny if d not in existing]


def _access_times(t: _Translator, unit: ImportedUnit, value: _Value) -> None:
    windows: list[str] = []
    for item in value.values:
        match = _TIME_RANGE.fullmatch(item)
        if match is None:
            t.drop(unit, "access_times", item, "expected HH:MM-HH:MM", value)
            continue
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
            t.drop(unit, "access_times", item, "time out of range", value)
            continue
        windows.append(f"{h1:02d}:{m1:02d}-{h2:02d}:{m2:02d}")
    if windows:
        unit.data["access_times"] = windows


def _path_key(key: str) -> Callable[[_Translator, ImportedUnit, _Value], None]:
    def handle(t: _Translator, unit: ImportedUnit, value: _Value) -> None:
        if len(value.values) == 1 and value.values[0].startswith("/"):
            unit.data[key] = value.values[0]
        else:
            t.drop(unit, key, value, "expected one absolute path")

    return handle


def _env(t: _Translator, unit: ImportedUnit, value: _Value) -> None:
    environment: dict[str, str] = dict(unit.data.get("environment", {}))
    for item in value.values:
        name, sep, val = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            t.drop(unit, "env", item, "expected NAME=VALUE", value)
            continue
        environment[name] = val
    if environment:
        unit.data["environment"] = environment


def _passenv(t: _Translator, unit: ImportedUnit, value: _Value) -> None:
    names: list[str] = []
    for item in value.values:
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", item):
            names.append(item)
        else:
            t.drop(unit, "passenv", item, "not a variable name", value)
    if names:
        unit.data["pass_environment"] = names


def _umask(t: _Translator, unit: ImportedUnit, value: _Value) -> None:
    if re.fullmatch(r"[0-7]{1,4}", value.text) and int(value.text, 8) <= 0o777:
        unit.data["umask"] = "0" + f"{int(value.text, 8):03o}"
    else:
        t.drop(unit, "umask", value, "expected an octal umask such as 022")


def _nice(t: _Translator, unit: ImportedUnit, value: _Value) -> None:
    if re.fullmatch(r"-?\d{1,3}", value.text, re.ASCII) and -20 <= int(value.text) <= 19:
        unit.data["nice"] = int(value.text)
    else:
        t.drop(unit, "nice", value, "expected a number -20 to 19")


_RLIMITS = {"rlimit_as": "as", "rlimit_cpu": "cpu", "rlimit_stack": "stack", "rlimit_files": "nofile"}


def _rlimit(key: str) -> Callable[[_Translator, ImportedUnit, _Value], None]:
    limit = _RLIMITS[key]

    def handle(t: _Translator, unit: ImportedUnit, value: _Value) -> None:
        parsed = _rlimit_value(value.text)
        if parsed is None:
            t.drop(unit, key, value, "expected a number (K or M suffix) or UNLIMITED")
            return
        limits: dict[str, Any] = dict(unit.data.get("limits", {}))
        limits[limit] = parsed
        unit.data["limits"] = limits

    return handle


def _rlimit_value(text: str) -> int | str | None:
    if text.upper() == "UNLIMITED":
        return "infinity"
    match = _SIZE.fullmatch(text)
    if match is None or len(match.group(1)) > 18:
        return None
    return int(match.group(1)) * {"": 1, "K": 1024, "M": 1024 * 1024}[match.group(2).upper()]


_LOGGED = {"HOST", "PID", "DURATION"}


def _log_on(key: str) -> Callable[[_Translator, ImportedUnit, _Value], None]:
    def handle(t: _Translator, unit: ImportedUnit, value: _Value) -> None:
        for item in value.values:
            if item.upper() in _LOGGED:
                unit.data["log_connections"] = True
            else:
                t.drop(unit, key, item, f"sockvisor's connection log has no {item.upper()} field", value)

    return handle


_HANDLERS: dict[str, Callable[[_Translator, ImportedUnit, _Value], None]] = {
    "user": _user,
    "group": _group,
    "groups": _groups,
    "disable": _disable,
    "instances": _instances,
    "per_source": _per_source,
    "cps": _cps,
    "only_from": _only_from,
    "no_access": _no_access,
    "access_times": _access_times,
    "banner": _path_key("banner"),
    "banner_success": _path_key("banner_success"),
    "banner_fail": _path_key("banner_fail"),
    "env": _env,
    "passenv": _passenv,
    "umask": _umask,
    "nice": _nice,
    **{key: _rlimit(key) for key in _RLIMITS},
    "log_on_success": _log_on("log_on_success"),
    "log_on_failure": _log_on("log_on_failure"),
}
# Handled while building the unit (or by the defaults), not one by one.
_STRUCTURAL = frozenset({
    "id", "type", "socket_type", "protocol", "port", "wait", "server", "server_args", "flags", "bind",
    "interface", "v6only", "redirect",
})  # fmt: skip
_PER_CONNECTION_KEYS = frozenset({
    "instances", "per_source", "cps", "only_from", "no_access", "access_times", "banner", "banner_success",
    "banner_fail", "log_on_success", "log_on_failure",
})  # fmt: skip
_WHY = {
    "rlimit_data": "sockvisor's limits have no data-segment limit",
    "rlimit_rss": "Linux ignores RLIMIT_RSS",
    "log_type": "sockvisor logs events to its own stderr (journald or a file there)",
    "max_load": "sockvisor does not refuse by load average",
    "deny_time": "sockvisor does not ban sources over time",
    "mdns": "sockvisor does not advertise services",
    "libwrap": "sockvisor does not use tcp_wrappers: use allow/deny",
    "bind_to_device": "not an xinetd attribute",
    "enabled": "only valid in defaults",
    "disabled": "only valid in defaults",
    "rpc_version": "RPC services have no sockvisor equivalent",
    "rpc_number": "RPC services have no sockvisor equivalent",
}
_INTERNAL_WHY = {
    "tcpmux": "xinetd's internal TCPMUX multiplexer has no sockvisor equivalent",
    "servers": "xinetd's internal list of its running servers has no sockvisor equivalent (see sockvisor status)",
    "services": "xinetd's internal list of its services has no sockvisor equivalent (see sockvisor status)",
}
_FLAG_WHY = {
    "INTERCEPT": "sockvisor does not intercept connections",
    "NOLIBWRAP": "sockvisor does not use tcp_wrappers",
    "SENSOR": "sockvisor has no sensor services",
    "IDONLY": "sockvisor does not query identd",
    "LABELED": "sockvisor does not set SELinux labels",
    "DEDICATED": "sockvisor has no dedicated services",
}


def import_xinetd(
    paths: list[str],
    services_file: str = "/etc/services",
    resolve: Resolver = resolve_host,
    root: str | None = None,
) -> ImportResult:
    """Translate xinetd configuration files (following include and includedir) into units.

    Args:
        paths: the files to read, in order (``/etc/xinetd.conf`` for the CLI's default).
        services_file: the ``/etc/services`` that maps service names and aliases to ports.
        resolve: maps a host name in only_from, no_access, bind or redirect to its addresses
            (raising OSError when it does not resolve); called at import time.
        root: where an absolute ``include``/``includedir`` path is looked for, for the files of
            another system mounted or unpacked there (``includedir /etc/xinetd.d`` is read as
            ``ROOT/etc/xinetd.d``); by default the path is taken as written.
    Returns:
        The units in file order, and every setting that was not carried over.
    Raises:
        ImportSyntaxError: a file is not valid xinetd syntax (with its file and line).
        ImportReadError: a file, or one it includes, cannot be read.
    """
    parser = _Parser(root)
    for path in paths:
        parser.parse_file(path)
    collector = Collector()
    translator = _Translator(collector, _Services(services_file), resolve)
    defaults_assignments: list[_Assignment] = []
    for block in parser.blocks:
        if block.kind == "defaults":
            defaults_assignments.extend(block.assignments)
    defaults = _resolve(defaults_assignments, {})
    enabled = defaults.pop("enabled", None)
    disabled = defaults.pop("disabled", None)
    for block in parser.blocks:
        for a in block.assignments:
            collector.read(a.file, a.line)
        if block.kind == "service":
            translator.service(block, defaults, enabled, disabled)
    return collector.finish()
