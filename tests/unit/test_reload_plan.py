"""The pure reload diff: which listen entries keep their fd, which are retuned, which are bound, which units go."""

from __future__ import annotations

import socket
from dataclasses import replace

import pytest

from supervisor.errors import Location
from supervisor.model import InetAddress, Listen, ListenKind, Process, Unit
from supervisor.reload import plan, retunable

TCP = Listen(ListenKind.TCP, InetAddress("127.0.0.1", 8080, socket.AF_INET), "http")
TCP6 = Listen(ListenKind.TCP, InetAddress("::", 8443, socket.AF_INET6), "https")
UNIX = Listen(ListenKind.UNIX, "/run/web.sock", "local")


def make_unit(name: str, *listen: Listen, **overrides: object) -> Unit:
    return Unit(name=name, listen=listen, process=Process(exec=("/bin/web",)), **overrides)  # type: ignore[arg-type]


def reuse_of(old: tuple[Unit, ...], new: tuple[Unit, ...]) -> dict[str, list[int | None]]:
    """Per new unit name, the plan's reuse list."""
    plans, _ = plan({u.name: u for u in old}, new)
    return {p.unit.name: p.reuse for p in plans}


def test_unchanged_unit_reuses_every_entry() -> None:
    """A unit whose entries are all equal keeps every fd, in order, and nothing is retired."""
    web = make_unit("web", TCP, TCP6, UNIX)
    plans, retire = plan({"web": web}, (web,))
    assert [p.reuse for p in plans] == [[0, 1, 2]]
    assert plans[0].old is web
    assert retire == []


def test_reordered_entries_are_matched_by_equality() -> None:
    """Reordering listen entries reuses each old fd at its new position instead of re-binding."""
    old = make_unit("web", TCP, TCP6, UNIX)
    new = make_unit("web", UNIX, TCP, TCP6)
    assert reuse_of((old,), (new,)) == {"web": [2, 0, 1]}


def test_moving_a_unit_in_its_file_changes_nothing() -> None:
    """Locations are not compared, so an entry written on another line is still the same entry."""
    old = make_unit("web", replace(TCP, location=Location("a.yaml", 3, 5)))
    new = make_unit("web", replace(TCP, location=Location("a.yaml", 30, 5)))
    assert reuse_of((old,), (new,)) == {"web": [0]}


@pytest.mark.parametrize(("change", "kept"), [
    ({"backlog": 16}, True),
    ({"name": "renamed"}, True),
    ({"receive_buffer": 1 << 20}, True),
    ({"nodelay": True}, True),
    ({"keepalive": True, "keepalive_time": 30.0}, True),
    ({"defer_accept": 2.0}, True),
    ({"ipv6_only": True}, False),
    ({"reuse_port": True}, False),
    ({"freebind": True}, False),
    ({"bind_to_device": "lo"}, False),
    ({"address": InetAddress("127.0.0.1", 8081, socket.AF_INET)}, False),
    ({"address": InetAddress("127.0.0.2", 8080, socket.AF_INET)}, False),
    ({"kind": ListenKind.UDP}, False),
])
def test_retunable_tcp_options(change: dict[str, object], kept: bool) -> None:
    """Options the kernel changes on a bound socket are retuned in place; address, kind and bind options re-bind."""
    new = replace(TCP, **change)  # type: ignore[arg-type]
    assert retunable(TCP, new) is kept
    assert reuse_of((make_unit("web", TCP),), (make_unit("web", new),)) == {"web": [0 if kept else None]}


@pytest.mark.parametrize(("change", "kept"), [
    ({"mode": 0o600}, True),
    ({"user": "www", "group": "www"}, True),
    ({"symlinks": ("/run/alias.sock",)}, True),
    ({"address": "/run/other.sock"}, False),
])
def test_retunable_unix_options(change: dict[str, object], kept: bool) -> None:
    """A unix socket's permissions and symlinks are retuned in place; a new path is a new socket."""
    assert retunable(UNIX, replace(UNIX, **change)) is kept  # type: ignore[arg-type]


def test_equal_entry_is_preferred_over_a_retunable_one() -> None:
    """An exactly equal old entry is claimed before any merely retunable one, so no fd is retuned needlessly."""
    other = replace(TCP6, backlog=16)
    old = make_unit("web", other, TCP)
    new = make_unit("web", TCP, replace(other, backlog=32))
    assert reuse_of((old,), (new,)) == {"web": [1, 0]}


def test_each_old_entry_is_claimed_once() -> None:
    """Two new entries equal to one old entry get one reuse and one fresh bind, never the same fd twice."""
    old = make_unit("web", UNIX)
    new = make_unit("web", UNIX, UNIX)
    assert reuse_of((old,), (new,)) == {"web": [0, None]}


def test_added_entry_is_bound_and_kept_entries_reused() -> None:
    """A new listen entry is bound while the unit's existing entries keep their fds."""
    old = make_unit("web", TCP)
    new = make_unit("web", TCP, UNIX)
    assert reuse_of((old,), (new,)) == {"web": [0, None]}


def test_removed_units_are_retired_and_new_units_bind_everything() -> None:
    """Units missing from the new config are listed for retirement; units new to it reuse nothing."""
    web, api, db = make_unit("web", TCP), make_unit("api", TCP6), make_unit("db", UNIX)
    plans, retire = plan({"web": web, "api": api}, (web, db))
    assert retire == ["api"]
    by_name = {p.unit.name: p for p in plans}
    assert by_name["db"].old is None
    assert by_name["db"].reuse == [None]
    assert by_name["web"].reuse == [0]


def test_entries_are_not_reused_across_units() -> None:
    """A listen entry moved to a differently named unit is bound anew, not taken from the other unit."""
    assert reuse_of((make_unit("old", TCP),), (make_unit("new", TCP),)) == {"new": [None]}


@pytest.mark.parametrize(("old_enabled", "new_enabled"), [(True, False), (False, True), (False, False)])
def test_disabled_unit_reuses_nothing(old_enabled: bool, new_enabled: bool) -> None:
    """When either side of the diff is disabled no fd is reused (a disabled unit holds no sockets)."""
    old = make_unit("web", TCP, UNIX, enabled=old_enabled)
    new = make_unit("web", TCP, UNIX, enabled=new_enabled)
    plans, retire = plan({"web": old}, (new,))
    assert plans[0].reuse == [None, None]
    assert retire == []
