"""mode: proxy's pure parts: the PROXY header, the connect back-off, the idle stop, and its configuration."""

from __future__ import annotations

import itertools
import socket
from dataclasses import replace
from pathlib import Path

import pytest

from supervisor import lifecycle
from supervisor.config import load_config
from supervisor.errors import ConfigError
from supervisor.lifecycle import After, SlotState
from supervisor.model import InetAddress, Mode, ProxyProtocol
from supervisor.proxy import RETRY_FIRST, RETRY_MAX, idle_due, proxy_header, retry_delay

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


@pytest.mark.parametrize(("peer", "local", "want"), [
    (("192.0.2.1", 5000), ("198.51.100.7", 80), b"PROXY TCP4 192.0.2.1 198.51.100.7 5000 80\r\n"),
    (("2001:db8::1", 5000, 0, 0), ("2001:db8::2", 443, 0, 0), b"PROXY TCP6 2001:db8::1 2001:db8::2 5000 443\r\n"),
    (("::ffff:192.0.2.1", 7, 0, 0), ("::ffff:10.0.0.1", 8, 0, 0), b"PROXY TCP4 192.0.2.1 10.0.0.1 7 8\r\n"),
    ("", "/run/x.sock", b"PROXY UNKNOWN\r\n"),
])
def test_proxy_header_v1(peer: object, local: object, want: bytes) -> None:
    """v1 names the protocol, both addresses (IPv4-mapped shown as IPv4) and both ports; unix clients are UNKNOWN."""
    assert proxy_header(ProxyProtocol.V1, peer, local) == want


def test_proxy_header_v2_ipv4_and_ipv6_and_local() -> None:
    """v2: signature, version 2 PROXY command, family byte, length, then the packed addresses and ports."""
    v4 = proxy_header(ProxyProtocol.V2, ("192.0.2.1", 5000), ("198.51.100.7", 80))
    assert v4 == (V2_SIG + b"\x21\x11\x00\x0c" + socket.inet_aton("192.0.2.1") + socket.inet_aton("198.51.100.7")
                  + (5000).to_bytes(2, "big") + (80).to_bytes(2, "big"))
    v6 = proxy_header(ProxyProtocol.V2, ("2001:db8::1", 1, 0, 0), ("2001:db8::2", 2, 0, 0))
    assert v6[12:16] == b"\x21\x21\x00\x24" and len(v6) == 16 + 36
    assert v6[16:32] == socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    assert proxy_header(ProxyProtocol.V2, "", "/run/x.sock") == V2_SIG + b"\x20\x00\x00\x00"


def test_retry_delay_doubles_and_is_capped() -> None:
    """Connect attempts to a starting backend back off from 5 ms, doubling, to at most 250 ms."""
    delays = [retry_delay(n) for n in range(12)]
    assert delays[0] == RETRY_FIRST and delays[1] == 2 * RETRY_FIRST
    assert all(a <= b for a, b in itertools.pairwise(delays)) and max(delays) == RETRY_MAX
    assert retry_delay(10_000) == RETRY_MAX


def _unit(tmp_path: Path, text: str) -> object:
    d = tmp_path / "sockets.d"
    d.mkdir(exist_ok=True)
    (d / "app.yaml").write_text(text)
    return load_config(str(tmp_path)).units[0]


def _problems(tmp_path: Path, text: str) -> list[str]:
    d = tmp_path / "sockets.d"
    d.mkdir(exist_ok=True)
    (d / "app.yaml").write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(str(tmp_path))
    return [str(p) for p in raised.value.problems]


def test_idle_due_only_without_clients(tmp_path: Path) -> None:
    """The idle stop is due idle_stop after the last client left; never while clients are there or when unset."""
    unit = _unit(tmp_path, "mode: proxy\nlisten: [{tcp: 127.0.0.1:80}]\nbackend: 127.0.0.1:81\nidle_stop: 5m\n")
    assert idle_due(unit, 0, 100.0) == 400.0  # type: ignore[arg-type]
    assert idle_due(unit, 1, 100.0) is None  # type: ignore[arg-type]
    assert idle_due(replace(unit, idle_stop=None), 0, 100.0) is None  # type: ignore[type-var]


def test_idle_stop_returns_the_backend_to_listening(tmp_path: Path) -> None:
    """A stop for idleness settles in IDLE (the next client starts the backend), not in STOPPED."""
    unit = _unit(tmp_path, "mode: proxy\nlisten: [{tcp: 127.0.0.1:80}]\nbackend: 127.0.0.1:81\nexec: [/bin/true]\n")
    slot, _ = lifecycle.initial(unit)  # type: ignore[arg-type]
    slot, actions = lifecycle.step(unit, slot, lifecycle.Readiness(), 0.0)  # type: ignore[arg-type]
    slot, _ = lifecycle.step(unit, slot, lifecycle.Spawned(42), 0.0)  # type: ignore[arg-type]
    assert slot.state is SlotState.RUNNING
    slot, actions = lifecycle.step(unit, slot, lifecycle.StopRequest(After.IDLE), 1.0)  # type: ignore[arg-type]
    assert slot.state is SlotState.STOPPING and any(isinstance(a, lifecycle.Kill) for a in actions)
    slot, _ = lifecycle.step(unit, slot, lifecycle.Exited(42, lifecycle.Exit(signal=15)), 1.1)  # type: ignore[arg-type]
    assert slot.state is SlotState.IDLE and slot.failures == 0


def test_proxy_config_parses(tmp_path: Path) -> None:
    """A proxy unit: unit and per-entry backends (tcp, unix, abstract), no exec needed, accept policy allowed."""
    unit = _unit(tmp_path, (
        "mode: proxy\nlisten:\n  - tcp: 127.0.0.1:80\n  - unix: /run/app.sock\n    backend: '@app-admin'\n"
        "  - udp: 127.0.0.1:53\n    backend: '[::1]:5353'\n"
        "backend: 127.0.0.1:8080\nidle_stop: 5m\nproxy_protocol: v2\nudp_idle: 30s\nmax_connections: 10\n"
        "deny: [10.0.0.0/8]\n"))
    assert unit.mode is Mode.PROXY and unit.process.exec == ()  # type: ignore[attr-defined]
    assert unit.backend == InetAddress("127.0.0.1", 8080, socket.AF_INET)  # type: ignore[attr-defined]
    assert [e.backend for e in unit.listen][1] == "@app-admin"  # type: ignore[attr-defined]
    assert unit.idle_stop == 300 and unit.proxy_protocol is ProxyProtocol.V2  # type: ignore[attr-defined]
    assert unit.udp_idle == 30 and unit.max_connections == 10  # type: ignore[attr-defined]


@pytest.mark.parametrize(("text", "messages"), [
    ("mode: proxy\nlisten: [{tcp: 127.0.0.1:80}]\n",
     ["sockets.d/app.yaml:2:10: listen[0].backend: missing: mode: proxy needs a backend (on the unit or this entry)"]),
    ("mode: proxy\nlisten: [{tcp: 127.0.0.1:80}]\nbackend: 8080\n",
     ["sockets.d/app.yaml:3:10: backend: a backend needs a host to connect to: write 127.0.0.1:8080 or [::1]:8080",
      "sockets.d/app.yaml:2:10: listen[0].backend: missing: mode: proxy needs a backend (on the unit or this entry)"]),
    ("mode: proxy\nlisten: [{unix-dgram: /run/x.sock}]\nbackend: 127.0.0.1:1\n",
     ["sockets.d/app.yaml:2:10: listen[0].unix-dgram: mode: proxy forwards tcp, udp and unix (stream) listeners, "
      "not unix-dgram"]),
    ("mode: proxy\nlisten: [{udp: 127.0.0.1:53}]\nbackend: /run/dns.sock\n",
     ["sockets.d/app.yaml:2:10: listen[0].backend: a udp listener forwards to a host:port backend, not a unix path"]),
    ("mode: proxy\nlisten: [{tcp: 127.0.0.1:80}]\nbackend: 127.0.0.1:1\npass: stdio\nworkers: 2\n",
     ["sockets.d/app.yaml:4:1: pass: only applies to mode: service, accept or pool (this unit is mode: proxy)",
      "sockets.d/app.yaml:5:1: workers: only applies to mode: pool (this unit is mode: proxy)"]),
    ("listen: [{tcp: 127.0.0.1:80, backend: 127.0.0.1:1}]\nexec: [/bin/true]\nidle_stop: 1m\n",
     ["sockets.d/app.yaml:3:1: idle_stop: only applies to mode: proxy (this unit is mode: service)",
      "sockets.d/app.yaml:1:10: listen[0].backend: only applies to mode: proxy (this unit is mode: service)"]),
    ("mode: proxy\nlisten: [{tcp: 127.0.0.1:80}]\nbackend: 127.0.0.1:1\nproxy_protocol: v3\n",
     ["sockets.d/app.yaml:4:17: proxy_protocol: expected v1 or v2, got string 'v3'"]),
])
def test_proxy_config_errors_are_located(tmp_path: Path, text: str, messages: list[str]) -> None:
    """Each mistake in a proxy unit is one located line naming the key and what is wrong."""
    assert sorted(_problems(tmp_path, text)) == sorted(messages)
