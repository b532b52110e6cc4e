"""Each rule that several modules apply has one source; these tests pin the derived lists to it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import spawn
from supervisor.model import RESERVED_ENVIRONMENT
from tests.unit.test_config_fuzz import errors_of

UNIT = "name: web\nlisten: [{tcp: 127.0.0.1:8080}]\nexec: [/bin/true]\n"


@pytest.mark.parametrize("name", sorted(RESERVED_ENVIRONMENT))
def test_config_refuses_exactly_the_names_spawn_drops(name: str) -> None:
    """Every name spawn would silently drop is refused by the loader, located at the key."""
    lines = errors_of(UNIT + f"environment: {{{name}: x}}\n")
    assert lines == [f"web.yaml:4:15: environment.{name}: is set by sockvisor and cannot be overridden"]


def test_spawn_drops_the_models_list() -> None:
    """spawn reads the reserved names from the model, not a copy of its own."""
    assert spawn.RESERVED_ENVIRONMENT is RESERVED_ENVIRONMENT


def test_check_refuses_remote_addr_with_its_location(tmp_path: Path) -> None:
    """`sockvisor check` on `environment: {REMOTE_ADDR: x}` exits 2 with the key's location (it used to pass)."""
    (tmp_path / "sockets.d").mkdir()
    (tmp_path / "sockets.d" / "web.yaml").write_text(UNIT + "environment: {REMOTE_ADDR: x}\n")
    res = subprocess.run([sys.executable, "-m", "supervisor", "check", "--config", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == ("sockets.d/web.yaml:4:15: environment.REMOTE_ADDR: "
                                  "is set by sockvisor and cannot be overridden")


def test_every_listen_option_has_one_row_that_config_sockets_and_reload_derive_from() -> None:
    """config parses, sockets checks and reload classifies exactly the options of model.LISTEN_OPTIONS."""
    import dataclasses

    from supervisor import reload, schema, sockets
    from supervisor.model import BIND_TIME_OPTIONS, LISTEN_OPTIONS, Listen

    assert set(schema.LISTEN_PARSERS) == set(LISTEN_OPTIONS)
    assert set(schema.LISTEN_OPTIONS) == set(LISTEN_OPTIONS)
    fields = {f.name for f in dataclasses.fields(Listen)} - {"kind", "address", "location", "display"}
    assert set(LISTEN_OPTIONS) <= fields | {"name"}
    assert set(BIND_TIME_OPTIONS) | reload.RETUNABLE == set(LISTEN_OPTIONS)
    assert not set(BIND_TIME_OPTIONS) & reload.RETUNABLE
    assert set(sockets._APPLIES_TO) == {n for n, o in LISTEN_OPTIONS.items() if o.on_socket}


@pytest.mark.parametrize("option", ["transparent", "freebind", "ipv6_only", "reuse_port"])
def test_bind_time_options_all_need_a_new_socket_on_reload(option: str) -> None:
    """Changing transparent is a bind-time change like freebind (it used to be neither list's)."""
    import dataclasses

    from supervisor import reload
    from supervisor.model import Listen, ListenKind

    old = Listen(kind=ListenKind.TCP, address="127.0.0.1:8080", name="web")
    new = dataclasses.replace(old, **{option: True})
    assert not reload.retunable(old, new)
    assert reload.retunable(old, dataclasses.replace(old, nodelay=True))


@pytest.mark.parametrize("name", ["ok", "a" * 255, "with space", "", "a" * 256, "a:b", "é"])
def test_one_fd_name_rule_for_config_the_fd_store_and_activate(name: str) -> None:
    """config accepts, the fd store stores and activate warns about exactly the names model.valid_fdname refuses."""
    from supervisor import activate
    from supervisor.model import valid_fdname

    lines = errors_of(f"name: web\nlisten: [{{tcp: 127.0.0.1:8080, name: {name!r}}}]\nexec: [/bin/true]\n")
    assert (lines == []) == valid_fdname(name), lines
    if ":" not in name and name:
        warned: list[str] = []
        original = activate._log
        activate._log = warned.append  # type: ignore[assignment]
        try:
            activate._split_fdnames([name])
        finally:
            activate._log = original  # type: ignore[assignment]
        assert bool(warned) == (not valid_fdname(name))


@pytest.mark.parametrize(("family", "name", "daemon", "tools"), [
    (2, ("127.0.0.1", 80), "127.0.0.1:80", "127.0.0.1:80"),
    (10, ("::1", 80, 0, 0), "[::1]:80", "[::1]:80"),
    (10, ("fe80::1", 80, 0, 1), "[fe80::1%lo]:80", "[fe80::1%1]:80"),
    (1, b"\0abs", "@abs", "@abs"),
    (1, "/run/x.sock", "/run/x.sock", "/run/x.sock"),
])
def test_one_sockaddr_formatter_for_daemon_activate_and_fds(family: int, name: object, daemon: str, tools: str) -> None:
    """The daemon, `sockvisor activate` and `sockvisor fds` format through addresses.format_sockaddr."""
    from supervisor import activate, addresses, sockets

    assert sockets.format_sockaddr is addresses.format_sockaddr
    assert addresses.format_sockaddr(family, name) == daemon
    assert activate.pretty_address(family, name) == tools


def test_a_minimal_unit_gets_the_models_defaults() -> None:
    """config restates no default: every key a minimal unit leaves out has the model's field default."""
    import dataclasses

    from supervisor.config import load_units_from_text
    from supervisor.model import Unit

    (unit,) = load_units_from_text(UNIT, "web.yaml")
    for f in dataclasses.fields(Unit):
        if f.default is not dataclasses.MISSING and f.name != "location":
            assert getattr(unit, f.name) == f.default, f.name


def test_one_peer_credentials_parser_for_accept_and_control() -> None:
    """SO_PEERCRED is parsed in one place; a socketpair shows our own pid, uid and gid."""
    import socket

    from supervisor import accept, control, sockets

    a, b = socket.socketpair()
    with a, b:
        assert sockets.peer_credentials(a.fileno()) == (os.getpid(), os.getuid(), os.getgid())
    assert not hasattr(accept, "_peer_credentials") and not hasattr(control, "peer_uid")


def test_the_daemon_parses_its_own_listen_fds_with_the_librarys_parser() -> None:
    """daemon.inherited_fds is activation.parse_listen_environment on the daemon's environment copy."""
    from supervisor import activation, daemon

    me = str(os.getpid())
    env = {"LISTEN_PID": me, "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:admin"}
    expected = [(3, "web"), (4, "admin")]
    assert daemon.inherited_fds(env) == activation.parse_listen_environment(env, os.getpid()) == expected
    assert daemon.inherited_fds({"LISTEN_PID": "1", "LISTEN_FDS": "2"}) == []  # not ours
    assert daemon.inherited_fds({"LISTEN_PID": me, "LISTEN_FDS": "1"}) == [(3, "unknown")]
    for bad in ({"LISTEN_PID": me, "LISTEN_FDS": "9" * 5000}, {"LISTEN_PID": me, "LISTEN_FDS": "0"},
                {"LISTEN_PID": me, "LISTEN_FDS": "2", "LISTEN_FDNAMES": "one"}):
        with pytest.raises(ValueError):
            daemon.inherited_fds(bad)
