"""Loading valid configurations: defaults, file layout, and the model objects produced."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from supervisor import config
from supervisor.config import describe_unit, load_config, load_units_from_text, parse_main
from supervisor.errors import ConfigError, Location
from supervisor.model import (
    InetAddress,
    Listen,
    ListenKind,
    LogFormat,
    MainConfig,
    Mode,
    Network,
    Pass,
    Rate,
    Ready,
    Restart,
    Start,
    StartLimit,
    Stderr,
)

SPEC_EXAMPLE = """\
name: web
description: Hello web service
enabled: true                  # false: parsed and validated, nothing bound
listen:                        # one or more; order = fd order (3, 4, ...)
  - tcp: 127.0.0.1:8080        # host:port, [v6]:port, or a bare port (all addresses, dual stack)
    name: http                 # per-fd name for LISTEN_FDNAMES; default: the unit name
    backlog: 1024
  - unix: /run/web.sock        # "@name" = abstract namespace
    mode: "0660"
    user: www-data
    group: www-data
mode: service                  # service | accept | pool
exec: [/usr/local/bin/web, --port-from-fds]   # argv list; a string is split shell-style, no shell runs
"""


def write(root: Path, files: dict[str, str]) -> Path:
    """Write ``files`` (relative path -> text) under ``root``."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_spec_example_parses_to_the_model(tmp_path: Path) -> None:
    """The unit example of SPEC section 3 yields exactly the expected Listen and Process objects."""
    write(tmp_path, {"sockets.d/web.yaml": SPEC_EXAMPLE})
    cfg = load_config(str(tmp_path))
    assert cfg.source == str(tmp_path)
    assert cfg.main == MainConfig()
    (unit,) = cfg.units
    assert unit.name == "web"
    assert unit.description == "Hello web service"
    assert unit.mode is Mode.SERVICE
    assert unit.pass_ is Pass.FDS
    assert unit.listen == (
        Listen(ListenKind.TCP, InetAddress("127.0.0.1", 8080, socket.AF_INET), name="http", backlog=1024),
        Listen(ListenKind.UNIX, "/run/web.sock", name="web", mode=0o660, user="www-data", group="www-data"),
    )
    assert unit.process.exec == ("/usr/local/bin/web", "--port-from-fds")
    assert unit.location == Location("sockets.d/web.yaml", 1, 7)
    assert unit.listen[1].location == Location("sockets.d/web.yaml", 8, 5)


def test_defaults() -> None:
    """An unadorned service unit gets the documented defaults."""
    (unit,) = load_units_from_text("listen: [{tcp: 8080}]\nexec: /bin/true\n", "echo.yaml")
    assert unit.name == "echo"
    listen = unit.listen[0]
    assert listen.address == InetAddress("", 8080, socket.AF_INET6)
    assert (listen.name, listen.backlog, listen.remove_on_stop) == ("echo", 4096, True)
    assert (unit.start, unit.restart, unit.ready) == (Start.ON_DEMAND, Restart.ON_FAILURE, Ready.EXEC)
    assert (unit.restart_delay, unit.restart_delay_max, unit.restart_reset) == (0.1, 30.0, 60.0)
    assert (unit.start_timeout, unit.watchdog, unit.start_limit) == (90.0, None, None)
    assert (unit.max_connections, unit.log_connections, unit.enabled) == (256, True, True)
    assert (unit.process.stop_signal, unit.process.stop_timeout) == (signal.SIGTERM, 10.0)
    assert unit.process.stderr is Stderr.INHERIT


@pytest.mark.parametrize(("mode", "default"), [("service", Pass.FDS), ("accept", Pass.STDIO), ("pool", Pass.FDS)])
def test_pass_default_depends_on_mode(mode: str, default: Pass) -> None:
    """pass defaults to stdio in accept mode and to fds otherwise."""
    (unit,) = load_units_from_text(f"listen: [{{tcp: 7}}]\nexec: /bin/cat\nmode: {mode}\n", "u.yaml")
    assert unit.pass_ is default


def test_every_key_is_read() -> None:
    """A unit using every unit-level key produces the corresponding model values."""
    text = """\
name: api
mode: accept
pass: fds
start: eager
restart: always
restart_delay: 250ms
restart_delay_max: 1m
restart_reset: 2m
start_limit: {burst: 5, interval: 10s}
ready: notify
start_timeout: 5s
watchdog: 30s
fd_store_max: 8
max_connections: 100
max_connections_per_source: 4
rate: {per_second: 2.5}
allow: [10.0.0.0/8, "::1", "uid:0"]
deny: [10.0.0.7]
log_connections: false
listen:
  - unix-seqpacket: "@api"
    pass_credentials: true
exec: /usr/bin/api --verbose "two words"
user: "1000"
group: api
supplementary_groups: [adm, 4]
working_directory: /srv/api
environment: {PORT: 8080, RATIO: 1.50, NAME: api}
pass_environment: [TZ, LANG]
umask: "027"
nice: -5
limits: {nofile: 64K, core: infinity, nproc: {soft: 100, hard: 200}}
stderr: connection
stop_signal: INT
stop_timeout: 3
"""
    (unit,) = load_units_from_text(text, "api.yaml")
    assert unit.mode is Mode.ACCEPT and unit.pass_ is Pass.FDS and unit.start is Start.EAGER
    assert unit.restart is Restart.ALWAYS
    assert (unit.restart_delay, unit.restart_delay_max, unit.restart_reset) == (0.25, 60.0, 120.0)
    assert unit.start_limit == StartLimit(5, 10.0)
    assert (unit.ready, unit.start_timeout, unit.watchdog, unit.fd_store_max) == (Ready.NOTIFY, 5.0, 30.0, 8)
    assert (unit.max_connections, unit.max_connections_per_source) == (100, 4)
    assert unit.rate == Rate(2.5, 3)
    assert unit.allow == (
        Network("10.0.0.0/8", network="10.0.0.0/8"),
        Network("::1", network="::1/128"),
        Network("uid:0", uid=0),
    )
    assert unit.deny == (Network("10.0.0.7", network="10.0.0.7/32"),)
    assert unit.log_connections is False
    assert unit.listen == (Listen(ListenKind.UNIX_SEQPACKET, "@api", name="api", pass_credentials=True),)
    p = unit.process
    assert p.exec == ("/usr/bin/api", "--verbose", "two words")
    assert (p.user, p.group, p.supplementary_groups) == ("1000", "api", ("adm", "4"))
    assert p.working_directory == "/srv/api"
    assert p.environment == (("PORT", "8080"), ("RATIO", "1.50"), ("NAME", "api"))
    assert p.pass_environment == ("TZ", "LANG")
    assert (p.umask, p.nice) == (0o027, -5)
    assert p.limits == (("nofile", 65536, 65536), ("core", -1, -1), ("nproc", 100, 200))
    assert (p.stderr, p.stop_signal, p.stop_timeout) == (Stderr.CONNECTION, signal.SIGINT, 3.0)


def test_listen_options_are_read() -> None:
    """Per-listen socket options reach the Listen object with their units converted."""
    text = """\
listen:
  - tcp: "[::1]:80"
    ipv6_only: true
    reuse_port: true
    freebind: true
    bind_to_device: lo
    receive_buffer: 1M
    send_buffer: 4096
    nodelay: true
    keepalive: true
    keepalive_time: 1m
    keepalive_interval: 10s
    keepalive_probes: 5
    defer_accept: 2s
    mark: 7
    ip_tos: 16
    ip_ttl: 64
    priority: 3
  - udp: 0.0.0.0:53
    broadcast: true
  - fifo: /run/x.fifo
    mode: "0600"
    directory_mode: "0750"
    remove_on_stop: false
    symlinks: [/run/y.fifo]
exec: [/bin/x]
"""
    (unit,) = load_units_from_text(text, "x.yaml")
    tcp, udp, fifo = unit.listen
    assert tcp.address == InetAddress("::1", 80, socket.AF_INET6)
    assert (tcp.ipv6_only, tcp.reuse_port, tcp.freebind, tcp.bind_to_device) == (True, True, True, "lo")
    assert (tcp.receive_buffer, tcp.send_buffer, tcp.nodelay, tcp.keepalive) == (1 << 20, 4096, True, True)
    assert (tcp.keepalive_time, tcp.keepalive_interval, tcp.keepalive_probes) == (60.0, 10.0, 5)
    assert (tcp.defer_accept, tcp.mark, tcp.ip_tos, tcp.ip_ttl, tcp.priority) == (2.0, 7, 16, 64, 3)
    assert udp.broadcast is True and udp.kind is ListenKind.UDP
    assert (fifo.mode, fifo.directory_mode, fifo.remove_on_stop, fifo.symlinks) == (
        0o600,
        0o750,
        False,
        ("/run/y.fifo",),
    )


def test_pool_keys() -> None:
    """Pool mode reads workers, settle and max_surge."""
    (unit,) = load_units_from_text(
        "mode: pool\nworkers: 4\nsettle: 500ms\nmax_surge: 2\nlisten: [{tcp: 80, reuse_port: true}]\nexec: [/w]\n",
        "p.yaml",
    )
    assert (unit.mode, unit.workers, unit.settle, unit.max_surge) == (Mode.POOL, 4, 0.5, 2)


def test_multi_document_file_holds_several_units(tmp_path: Path) -> None:
    """A file of several YAML documents yields one unit per document, each named; a trailing --- is ignored."""
    write(
        tmp_path,
        {
            "sockets.d/echo.yaml": (
                "name: echo\nlisten: [{tcp: 7}]\nmode: accept\nexec: /bin/cat\n"
                "---\nname: discard\nlisten: [{tcp: 9}]\nexec: [/bin/true]\n---\n"
            )
        },
    )
    cfg = load_config(str(tmp_path))
    assert [u.name for u in cfg.units] == ["echo", "discard"]
    assert cfg.units[1].location == Location("sockets.d/echo.yaml", 6, 7)


def test_disabled_units_are_kept(tmp_path: Path) -> None:
    """enabled: false units are validated and kept in the config with enabled=False."""
    write(tmp_path, {"sockets.d/off.yaml": "enabled: false\nlisten: [{tcp: 7}]\nexec: /bin/cat\n"})
    (unit,) = load_config(str(tmp_path)).units
    assert unit.enabled is False


def test_units_are_read_in_sorted_file_order(tmp_path: Path) -> None:
    """Unit files are read in sorted order of the include glob."""
    write(
        tmp_path,
        {f"sockets.d/{name}.yaml": f"listen: [{{tcp: {port}}}]\nexec: /x\n" for name, port in [("b", 2), ("a", 1)]},
    )
    assert [u.name for u in load_config(str(tmp_path)).units] == ["a", "b"]


def test_main_config_file_and_includes(tmp_path: Path) -> None:
    """A main config file's include globs are relative to it, and its keys are read."""
    write(
        tmp_path,
        {
            "etc/main.yaml": (
                'include: ["units/*.yml", "more/*.yml"]\n'
                'control: {socket: /run/sv.sock, mode: "0660"}\n'
                "log: {format: console, level: debug}\n"
            ),
            "etc/units/a.yml": "listen: [{tcp: 1}]\nexec: /x\n",
            "etc/more/b.yml": "listen: [{tcp: 2}]\nexec: /x\n",
            "etc/sockets.d/ignored.yaml": "listen: [{tcp: 3}]\nexec: /x\n",
        },
    )
    cfg = load_config(str(tmp_path / "etc/main.yaml"))
    assert cfg.main == MainConfig(
        include=("units/*.yml", "more/*.yml"),
        control_socket="/run/sv.sock",
        control_mode=0o660,
        log_format=LogFormat.CONSOLE,
        log_level="debug",
    )
    assert [u.name for u in cfg.units] == ["a", "b"]


def test_directory_with_main_config(tmp_path: Path) -> None:
    """A directory's sockvisor.yaml decides which unit files are included."""
    write(
        tmp_path,
        {
            "sockvisor.yaml": "include: [units/*.yaml]\n",
            "units/a.yaml": "listen: [{tcp: 1}]\nexec: /x\n",
            "sockets.d/b.yaml": "listen: [{tcp: 2}]\nexec: /x\n",
        },
    )
    assert [u.name for u in load_config(str(tmp_path)).units] == ["a"]


def test_environ_overrides_default_but_not_path(tmp_path: Path) -> None:
    """SOCKVISOR_CONFIG from the passed environ replaces the default, and an explicit path wins over it."""
    write(tmp_path, {"one/sockets.d/a.yaml": "listen: [{tcp: 1}]\nexec: /x\n", "two/sockets.d/b.yaml": "x: [\n"})
    environ = {"SOCKVISOR_CONFIG": str(tmp_path / "one")}
    assert [u.name for u in load_config(environ=environ).units] == ["a"]
    assert config.config_path(None, {}) == "/etc/sockvisor"
    assert config.config_path(str(tmp_path / "one"), {"SOCKVISOR_CONFIG": "/nowhere"}) == str(tmp_path / "one")


def test_missing_config_path_is_a_config_error(tmp_path: Path) -> None:
    """A config path that does not exist is one located problem."""
    with pytest.raises(ConfigError) as raised:
        load_config(str(tmp_path / "nope"))
    assert [str(p) for p in raised.value.problems] == [f"{tmp_path}/nope: no such file or directory"]


def test_file_outside_config_directory_keeps_its_path(tmp_path: Path) -> None:
    """A unit file included from outside the config directory is named by its full path in messages."""
    outside = tmp_path / "elsewhere/u.yaml"
    write(tmp_path, {"etc/sockvisor.yaml": f"include: [{outside}]\n", "elsewhere/u.yaml": "listen: []\nexec: /x\n"})
    with pytest.raises(ConfigError) as raised:
        load_config(str(tmp_path / "etc"))
    assert [str(p) for p in raised.value.problems] == [f"{outside}:1:9: listen: must hold at least one listen entry"]


def test_empty_main_config_means_defaults() -> None:
    """An empty main config (comments only) is all defaults."""
    assert parse_main("# nothing here\n") == MainConfig()


def test_yaml_anchors_and_merge_keys() -> None:
    """Anchors, aliases and << merge keys work, with explicit keys winning over merged ones."""
    text = """\
name: a
listen:
  - &base {tcp: 127.0.0.1:1, backlog: 10, nodelay: true}
  - <<: *base
    tcp: 127.0.0.1:2
    backlog: 20
exec: /x
"""
    (unit,) = load_units_from_text(text)
    assert [(str(listen.address), listen.backlog, listen.nodelay) for listen in unit.listen] == [
        ("127.0.0.1:1", 10, True),
        ("127.0.0.1:2", 20, True),
    ]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (SPEC_EXAMPLE, "web: service, 2 listeners (tcp:127.0.0.1:8080, unix:/run/web.sock), exec /usr/local/bin/web "
         "--port-from-fds"),
        ("name: echo\nmode: accept\nlisten: [{tcp: 7}]\nexec: /bin/cat\nenabled: false\n",
         "echo: accept, 1 listener (tcp:7), exec /bin/cat (disabled)"),
        ("name: api\nmode: pool\nworkers: 4\nlisten: [{tcp: '[::1]:80'}]\nexec: [/bin/api, a b]\n",
         "api: pool of 4 workers, 1 listener (tcp:[::1]:80), exec /bin/api 'a b'"),
    ],
)  # fmt: skip
def test_describe_unit(text: str, line: str) -> None:
    """describe_unit gives the one-line summary printed by sockvisor check."""
    (unit,) = load_units_from_text(text)
    assert describe_unit(unit) == line


def test_equal_config_compares_equal_regardless_of_position() -> None:
    """Moving a unit within its file does not change its value (locations are not compared)."""
    a = load_units_from_text("name: a\nlisten: [{tcp: 1}]\nexec: /x\n")
    b = load_units_from_text("\n\n# moved\nexec: /x\nname: a\nlisten:\n  - tcp: 1\n")
    assert a == b


def test_load_main_ignores_broken_units(tmp_path: Path) -> None:
    """load_main reads the control socket even when a unit file is broken."""
    write(tmp_path, {"sockvisor.yaml": "control: {socket: /run/x.sock}\n", "sockets.d/bad.yaml": "x: [\n"})
    assert config.load_main(str(tmp_path)).control_socket == "/run/x.sock"
    assert config.load_main(environ={"SOCKVISOR_CONFIG": str(tmp_path / "sockets.d")}) == MainConfig()


def test_load_main_reports_its_own_problems(tmp_path: Path) -> None:
    """load_main raises ConfigError for an invalid main config, located in it."""
    write(tmp_path, {"sockvisor.yaml": "control: {socket: relative.sock}\n"})
    with pytest.raises(ConfigError) as raised:
        config.load_main(str(tmp_path))
    assert [str(p) for p in raised.value.problems] == [
        "sockvisor.yaml:1:19: control.socket: unix socket path must be absolute or start with '@' (abstract): "
        "'relative.sock'"
    ]


def test_shipped_examples_parse() -> None:
    """Every example under config/ loads without a problem, so the examples never rot."""
    root = Path(__file__).resolve().parents[2] / "config"
    cfg = load_config(str(root))
    assert cfg.units, "the shipped example defines units"
    assert {unit.name for unit in cfg.units} >= {"echo", "hello-web", "proxied-web"}


def test_include_glob_never_reads_the_main_config_as_a_unit(tmp_path: Path) -> None:
    """A glob that also matches sockvisor.yaml does not read the main config as a unit file."""
    write(tmp_path, {"sockvisor.yaml": 'include: ["*.yaml"]\n', "web.yaml": "listen: [{tcp: 1}]\nexec: /x\n"})
    assert [u.name for u in load_config(str(tmp_path)).units] == ["web"]
