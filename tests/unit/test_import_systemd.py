"""The systemd importer: unit-file syntax, drop-ins, specifiers, quoting and the .socket/.service mapping."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from supervisor.config import load_units_from_text
from supervisor.importing import ImportedUnit, ImportReadError, ImportResult, ImportSyntaxError, render_yaml
from supervisor.importing.systemd import (
    BadValue,
    UnitName,
    expand_specifiers,
    import_systemd,
    parse_command,
    parse_int,
    parse_timespan,
    parse_unit_text,
    split_quoted,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "import" / "systemd"
ETC = DATA / "etc"
LIB = DATA / "lib"


def run(paths: list[str], dirs: list[str] | None = None) -> ImportResult:
    return import_systemd(paths, unit_dirs=[str(LIB)] if dirs is None else dirs)


def fixture_units() -> dict[str, ImportedUnit]:
    return {u.name: u for u in run([str(ETC)]).units}


def write_units(tmp_path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def one(tmp_path: Path, socket: str, service: str, name: str = "svc") -> ImportedUnit:
    accept = "Accept=yes" in socket
    files = {f"{name}.socket": socket, f"{name}@.service" if accept else f"{name}.service": service}
    write_units(tmp_path, files)
    (unit,) = run([str(tmp_path / f"{name}.socket")], dirs=[]).units
    return unit


# -- the shipped fixtures -------------------------------------------------------


def test_directory_means_every_socket() -> None:
    """A directory argument imports every *.socket in it, in name order."""
    assert list(fixture_units()) == ["sshd", "syslog-relay", "uevent", "web"]


EXPECTED: list[tuple[str, dict[str, Any]]] = [
    ("sshd", {"description": "OpenSSH Server Socket", "mode": "accept", "pass": "stdio",
              "exec": ["/usr/sbin/sshd", "-i", "$OPTIONS"], "environment_files": ["-/etc/sysconfig/sshd"],
              "stderr": "connection", "max_connections": 64, "max_connections_per_source": 4,
              "rate": {"per_second": 5.0, "burst": 50},
              "listen": [{"tcp": "22", "ipv6_only": False, "keepalive": True, "keepalive_time": "600s"},
                         {"tcp": "[::1]:2022", "ipv6_only": False, "keepalive": True, "keepalive_time": "600s"}]}),
    ("web", {"description": "Web front end (web)", "mode": "service", "ready": "notify",
             "exec": ["/usr/bin/web-app", "--listen-fds", "--title", 'Web "front" end', "single quoted arg",
                      "--cache", "/var/cache/web", "--pct=100%"],
             "supplementary_groups": ["ssl-cert"], "working_directory": "/srv/web",
             "environment": {"GREETING": "hello world", "MODE": "production", "CACHE_DIR": "/var/cache/web"},
             "environment_files": ["/etc/default/web"], "pass_environment": ["TZ", "LANG"], "umask": "0027",
             "nice": -5, "limits": {"nofile": 65536, "core": {"soft": 0, "hard": "infinity"}}, "stderr": "null",
             "restart": "on-failure", "restart_delay": "500ms", "start_timeout": "90s", "watchdog": "30s",
             "stop_signal": "SIGINT", "stop_timeout": "20s", "fd_store_max": 4}),
    ("syslog-relay", {"mode": "service", "exec": ["/usr/libexec/relay", "--foreground"], "restart": "always",
                      "start_timeout": "5s", "stop_timeout": "5s", "limits": {"cpu": 3600},
                      "listen": [{"unix-dgram": "/run/relay/log.sock", "mode": "0620", "timestamping": "us",
                                  "pass_security": True},
                                 {"fifo": "/run/relay/fifo", "mode": "0620", "pipe_size": 65536},
                                 {"udp": "127.0.0.1:5514", "broadcast": True, "ip_tos": 16, "timestamping": "us"}]}),
    ("uevent", {"listen": [{"netlink": "kobject-uevent 1", "receive_buffer": 8388608},
                           {"special": "/proc/kmsg", "writable": True},
                           {"mqueue": "/uevents", "mqueue_max_messages": 16, "mqueue_message_size": 1024},
                           {"vsock": "2:1234", "receive_buffer": 8388608}]}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "expected"), EXPECTED, ids=[e[0] for e in EXPECTED])
def test_fixture_translation(name: str, expected: dict[str, Any]) -> None:
    """Each fixture socket and its service translate to these unit keys."""
    data = without_default_names(fixture_units()[name].data, f"{name}.socket")
    assert {key: data.get(key) for key in expected} == expected


def without_default_names(data: dict[str, Any], socket: str) -> dict[str, Any]:
    """``data`` without the fd names systemd gives by default (pinned on their own below)."""
    if data.get("mode") != "service" or not isinstance(data.get("listen"), list):
        return data
    return {**data, "listen": [{k: v for k, v in e.items() if (k, v) != ("name", socket)} for e in data["listen"]]}


def test_accept_no_fds_are_named_as_systemd_names_them(tmp_path: Path) -> None:
    """FileDescriptorName= or else the socket unit's name; an empty assignment resets to that default."""
    socket = "[Socket]\nListenStream=127.0.0.1:1\nListenDatagram=127.0.0.1:2\nFileDescriptorName=web\n"
    assert [e["name"] for e in one(tmp_path, socket, "[Service]\nExecStart=/x\n").data["listen"]] == ["web", "web"]
    reset = "[Socket]\nListenStream=127.0.0.1:1\nFileDescriptorName=web\nFileDescriptorName=\n"
    assert one(tmp_path / "b", reset, "[Service]\nExecStart=/x\n").data["listen"][0]["name"] == "svc.socket"
    accept = "[Socket]\nListenStream=127.0.0.1:1\nAccept=yes\n"
    unit = one(tmp_path / "c", accept, "[Service]\nExecStart=/x\n")
    assert "name" not in unit.data["listen"][0]  # the connection is named "connection", as systemd does


def test_socket_dropin_resets_the_listeners() -> None:
    """An empty ListenStream= in a drop-in resets every listener of the unit file; later ones append."""
    listen = fixture_units()["web"].data["listen"]
    assert [e.get("tcp") or e.get("unix") for e in listen] == ["[::]:8443", "/run/web/admin.sock"]
    assert listen[1]["mode"] == "0660" and listen[1]["symlinks"] == ["/run/web.sock"]
    assert "mode" not in listen[0] and listen[0]["backlog"] == 1024


def test_dropin_in_an_earlier_directory_masks_a_later_one() -> None:
    """A drop-in name in the socket's directory masks the same name in a later unit directory."""
    assert "/usr/bin/never-used" not in fixture_units()["web"].data["exec"]
    dropped = run([str(ETC / "web.socket")]).dropped
    assert any(d.key == "TasksMax" and d.file.endswith("90-vendor.conf") for d in dropped)


COMMENTS = [
    ("sshd", "not carried over: ProtectSystem = strict: sandboxing is not carried over"),
    ("sshd", "not carried over: PrivateTmp = yes: sandboxing"),
    ("sshd", "not carried over: CPUQuota = 50%: resource control"),
    ("sshd", "not carried over: ExecStart prefix = -"),
    ("sshd", "TriggerLimit*: over the rate sockvisor pauses accepting"),
    ("sshd", "the per-connection instance name is empty here"),
    ("sshd", "not carried over: WantedBy = sockets.target"),
    ("web", "not carried over: SmackLabel = web"),
    ("web", "not carried over: ExecReload = /bin/kill -HUP $MAINPID"),
    ("web", "Restart=on-abnormal: carried over as restart: on-failure"),
    ("web", "FileDescriptorStoreMax"),
    ("syslog-relay", "ExecStart=@: argv[0] was 'relay-daemon'"),
    ("uevent", "not carried over: Type = forking"),
    ("uevent", "not carried over: Restart = on-success"),
]


@pytest.mark.parametrize(("name", "comment"), COMMENTS)
def test_fixture_comments(name: str, comment: str) -> None:
    """Each unit carries a comment for each directive not carried over, and notes on differences."""
    assert any(comment in c for c in fixture_units()[name].comments), fixture_units()[name].comments


def test_every_rendered_unit_round_trips() -> None:
    """Every rendered unit starts with its source and line and loads back to exactly its data."""
    for unit in fixture_units().values():
        text = render_yaml(unit)
        assert text.startswith(f"# imported from {unit.source}:{unit.line}\n")
        assert yaml.safe_load(text) == unit.data


def test_warnings_are_located() -> None:
    """Each dropped directive names the file and line it was written on."""
    dropped = {(Path(d.file).name, d.line, d.key) for d in run([str(ETC / "web.socket")]).dropped}
    assert ("web.service", 29, "NoNewPrivileges") in dropped
    assert ("web.socket", 20, "SmackLabel") in dropped


def test_check_accepts_the_fixture_units() -> None:
    """sockvisor's own config reader accepts every imported unit as it is rendered."""
    for unit in fixture_units().values():
        load_units_from_text(render_yaml(unit), f"{unit.name}.yaml")


# -- syntax ---------------------------------------------------------------------------


def test_parse_continuations_comments_and_sections() -> None:
    """Backslash continuations join lines (skipping comment lines), # and ; comment, sections scope keys."""
    text = "# c\n; c\n[Unit]\nDescription = a \\\n  b\n[Service]\nExecStart=/x \\\n# skipped\n  -y\nEmpty=\n"
    got = [(a.section, a.key, a.value, a.line) for a in parse_unit_text(text, "f")]
    assert got == [("Unit", "Description", "a  b", 4), ("Service", "ExecStart", "/x  -y", 7),
                   ("Service", "Empty", "", 10)]  # fmt: skip


SYNTAX_ERRORS = [
    ("[Socket\nListenStream=1\n", 1, "invalid section header"),
    ("ListenStream=1\n", 1, "outside of any [Section]"),
    ("[Socket]\nListenStream 1\n", 2, "expected Key=Value"),
    ("[Socket]\n=1\n", 2, "invalid key"),
]


@pytest.mark.parametrize(("text", "line", "message"), SYNTAX_ERRORS)
def test_syntax_errors_are_located(tmp_path: Path, text: str, line: int, message: str) -> None:
    """A line that is not unit-file syntax raises ImportSyntaxError with file and line."""
    write_units(tmp_path, {"x.socket": text, "x.service": "[Service]\nExecStart=/x\n"})
    with pytest.raises(ImportSyntaxError) as info:
        run([str(tmp_path / "x.socket")], dirs=[])
    assert info.value.line == line and message in info.value.message
    assert str(info.value).startswith(f"{tmp_path}/x.socket:{line}: ")


def test_missing_service_is_a_read_error(tmp_path: Path) -> None:
    """A socket whose service cannot be found raises ImportReadError naming the service."""
    write_units(tmp_path, {"x.socket": "[Socket]\nListenStream=1\n"})
    with pytest.raises(ImportReadError, match=r"x\.service"):
        run([str(tmp_path / "x.socket")], dirs=[])


SPLITS = [
    ('a "b c" d', ["a", "b c", "d"]),
    ("'it''s'", ["its"]),
    (r"a\ b", ["a b"]),
    (r'"x\"y"', ['x"y']),
    (r"\x41\101\u00e9", ["AAé"]),
    ('"" x', ["", "x"]),
    ("a\tb", ["a", "b"]),
]


@pytest.mark.parametrize(("text", "words"), SPLITS)
def test_split_quoted(text: str, words: list[str]) -> None:
    """Command lines split by systemd's quoting and escape rules."""
    assert split_quoted(text) == words


@pytest.mark.parametrize("text", ['"open', "'open", "trailing\\", r"\q", r"\x00"])
def test_split_quoted_refuses(text: str) -> None:
    """Unterminated quotes, a trailing backslash, unknown escapes and NUL are refused."""
    with pytest.raises(BadValue):
        split_quoted(text)


COMMANDS = [
    ("/bin/x a", "", "/bin/x", ["/bin/x", "a"]),
    ("-/bin/x", "-", "/bin/x", ["/bin/x"]),
    ("@/bin/x name a", "@", "/bin/x", ["name", "a"]),
    ("+!!/bin/x", "+!!", "/bin/x", ["/bin/x"]),
    (":-/bin/x $A", ":-", "/bin/x", ["/bin/x", "$A"]),
]


@pytest.mark.parametrize(("text", "prefixes", "path", "argv"), COMMANDS)
def test_parse_command_prefixes(text: str, prefixes: str, path: str, argv: list[str]) -> None:
    """ExecStart prefixes are split off the command, and @ takes argv[0] from the second word."""
    command = parse_command(text)
    assert (command.prefixes, command.path, command.argv) == (prefixes, path, argv)


SPECIFIERS = [
    ("%n %N %p %i", "foo@bar.service", "foo@bar.service foo@bar foo bar"),
    ("%I %J %j", "a-b@x-y.service", "x/y b b"),
    ("%t %T %V %h %u %%", "x.socket", "/run /tmp /var/tmp /root root %"),
]


@pytest.mark.parametrize(("text", "name", "expanded"), SPECIFIERS)
def test_specifiers(text: str, name: str, expanded: str) -> None:
    """Specifiers expand to the system manager's values for the unit's name."""
    assert expand_specifiers(text, UnitName(name)) == (expanded, [])


def test_unknown_specifier_is_kept_and_reported() -> None:
    """A host-specific specifier is left as written and reported."""
    assert expand_specifiers("%H/x", UnitName("a.service")) == ("%H/x", ["%H"])


INTEGERS = [("12", 12), ("06", 6), ("010", 8), ("0x1F", 31), ("-0x10", -16), ("0", 0)]


@pytest.mark.parametrize(("text", "number"), INTEGERS)
def test_integers_read_as_strtol_base_0(text: str, number: int) -> None:
    """Integers are read as systemd reads them: decimal, 0x hex, a leading 0 octal."""
    assert parse_int(text, -100, 100) == number


@pytest.mark.parametrize("text", ["08", "9" * 5000, "\u00b2", "\u0663", "1e3", "0x", ""])
def test_integers_refused(text: str) -> None:
    """Not a number to systemd (a bad octal, thousands of digits, Unicode digits): a BadValue, never a ValueError."""
    with pytest.raises(BadValue):
        parse_int(text, 0, 2**63)


@pytest.mark.parametrize(("text", "seconds"), [("5min 20s", 320.0), ("250ms", 0.25), ("2", 2.0), ("1h30m", 5400.0)])
def test_timespans(text: str, seconds: float) -> None:
    """systemd time spans convert to seconds."""
    assert parse_timespan(text) == seconds


# -- translation ------------------------------------------------------------------------

SOCK = "[Socket]\nListenStream=127.0.0.1:9000\n"
CASES: list[tuple[str, str, str, dict[str, Any]]] = [
    ("port only", "[Socket]\nListenStream=9000\n", "", {"listen": [{"tcp": "9000"}]}),
    ("udp", "[Socket]\nListenDatagram=[::1]:53\n", "", {"listen": [{"udp": "[::1]:53"}]}),
    ("unix stream", "[Socket]\nListenStream=/run/a.sock\n", "", {"listen": [{"unix": "/run/a.sock"}]}),
    ("abstract", "[Socket]\nListenStream=@abs\nSocketMode=0600\n", "", {"listen": [{"unix": "@abs"}]}),
    ("seqpacket", "[Socket]\nListenSequentialPacket=/run/s\n", "", {"listen": [{"unix-seqpacket": "/run/s"}]}),
    ("unix dgram", "[Socket]\nListenDatagram=/run/d\n", "", {"listen": [{"unix-dgram": "/run/d"}]}),
    ("accept no is service", SOCK, "", {"mode": "service", "pass": None}),
    ("stdin socket is stdio", SOCK, "StandardInput=socket\n", {"pass": "stdio"}),
    ("accept without stdin socket passes fds", SOCK + "Accept=yes\n", "", {"mode": "accept", "pass": "fds"}),
    ("ipv6-only", "[Socket]\nListenStream=[::]:80\nBindIPv6Only=ipv6-only\n", "",
     {"listen": [{"tcp": "[::]:80", "ipv6_only": True}]}),
    ("BindIPv6Only takes a boolean", "[Socket]\nListenStream=[::]:80\nBindIPv6Only=no\n", "",
     {"listen": [{"tcp": "[::]:80", "ipv6_only": False}]}),
    ("socket options", SOCK + "DeferAcceptSec=3\nMark=7\nIPTTL=9\nFreeBind=yes\nTransparent=on\nPriority=2\n"
     "SendBuffer=1M\nTCPCongestion=bbr\nSocketProtocol=mptcp\nBindToDevice=eth0\nKeepAliveIntervalSec=5\n"
     "KeepAliveProbes=3\n", "",
     {"listen": [{"tcp": "127.0.0.1:9000", "defer_accept": "3s", "mark": 7, "ip_ttl": 9, "freebind": True,
                  "transparent": True, "priority": 2, "send_buffer": 1 << 20, "tcp_congestion": "bbr",
                  "protocol": "mptcp", "bind_to_device": "eth0", "keepalive_interval": "5s",
                  "keepalive_probes": 3}]}),
    ("poll limit is rate", SOCK + "Accept=yes\nPollLimitIntervalSec=1s\nPollLimitBurst=10\n", "",
     {"rate": {"per_second": 10.0, "burst": 10}}),
    ("stricter limit wins", SOCK + "Accept=yes\nPollLimitIntervalSec=1s\nPollLimitBurst=10\nTriggerLimitBurst=4\n",
     "", {"rate": {"per_second": 2.0, "burst": 4}}),
    ("group and env", SOCK, "Group=g\nEnvironment=A=1\nEnvironment=\nEnvironment=B='x y'\n",
     {"group": "g", "environment": {"B": "x y"}}),
    ("timeout sec sets both", SOCK, "TimeoutSec=7\n", {"start_timeout": "7s", "stop_timeout": "7s"}),
    ("restart no", SOCK, "Restart=no\n", {"restart": "never"}),
    ("kill signal number", SOCK, "KillSignal=9\n", {"stop_signal": 9}),
    ("limit soft hard", SOCK, "LimitNOFILE=1024:4096\nLimitSTACK=8M\n",
     {"limits": {"nofile": {"soft": 1024, "hard": 4096}, "stack": 8 << 20}}),
    ("stdout socket stderr inherit", SOCK + "Accept=yes\n", "StandardInput=socket\nStandardError=inherit\n",
     {"stderr": "connection"}),
    ("stderr journal is the default", SOCK + "Accept=yes\n", "StandardInput=socket\nStandardError=journal\n",
     {"stderr": None}),
    ("working directory tilde", SOCK, "WorkingDirectory=~\n", {"working_directory": "/root"}),
    ("exec dollar dollar", SOCK, "ExecStart=\nExecStart=/bin/sh -c 'echo $$'\n", {"exec": ["/bin/sh", "-c", "echo $"]}),
    ("exec variables from Environment", SOCK,
     "Environment=\"OPTS=-a 'b c'\" PORT=7\nExecStart=\nExecStart=/bin/srv $OPTS --port=${PORT} x${PORT}y\n",
     {"exec": ["/bin/srv", "-a", "b c", "--port=7", "x7y"]}),
    ("exec empty variable is no word", SOCK, "Environment=E=\nExecStart=\nExecStart=/bin/srv $E x\n",
     {"exec": ["/bin/srv", "x"]}),
    ("exec braceless in a word and defaults stay", SOCK,
     "Environment=A=1\nExecStart=\nExecStart=/bin/srv pre$A ${A:-z} ${A\n",
     {"exec": ["/bin/srv", "pre$A", "${A:-z}", "${A"]}),
    ("exec colon prefix expands nothing", SOCK, "Environment=A=1\nExecStart=\nExecStart=:/bin/srv $A $$\n",
     {"exec": ["/bin/srv", "$A", "$$"]}),
]  # fmt: skip


@pytest.mark.parametrize(("why", "socket", "service", "expected"), CASES, ids=[c[0] for c in CASES])
def test_translation(tmp_path: Path, why: str, socket: str, service: str, expected: dict[str, Any]) -> None:
    """Each directive maps to these unit keys (None: the key is absent)."""
    data = without_default_names(one(tmp_path, socket, "[Service]\nExecStart=/bin/srv\n" + service).data, "svc.socket")
    assert {key: data.get(key) for key in expected} == expected


def test_explicit_service(tmp_path: Path) -> None:
    """Service= names the service to run instead of the socket's own name."""
    write_units(tmp_path, {"a.socket": SOCK + "Service=b.service\n", "b.service": "[Service]\nExecStart=/bin/b\n"})
    assert run([str(tmp_path / "a.socket")], dirs=[]).units[0].data["exec"] == ["/bin/b"]


def test_template_instance_dropins(tmp_path: Path) -> None:
    """An Accept=yes socket runs NAME@.service, with NAME@.service.d drop-ins applied."""
    write_units(tmp_path, {
        "t.socket": SOCK + "Accept=yes\n",
        "t@.service": "[Service]\nExecStart=/bin/t\n",
        "t@.service.d/x.conf": "[Service]\nUser=u\n",
    })  # fmt: skip
    data = run([str(tmp_path / "t.socket")], dirs=[]).units[0].data
    assert data["exec"] == ["/bin/t"] and data["user"] == "u"


DROPS = [
    ("sandboxing", SOCK, "ProtectKernelTunables=yes\n", "ProtectKernelTunables", "sandboxing"),
    ("capabilities", SOCK, "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n", "CapabilityBoundingSet", "sandboxing"),
    ("syscall filter", SOCK, "SystemCallFilter=@system-service\n", "SystemCallFilter", "sandboxing"),
    ("read-only paths", SOCK, "ReadOnlyPaths=/etc\n", "ReadOnlyPaths", "sandboxing"),
    ("resources", SOCK, "IOWeight=10\n", "IOWeight", "resource control"),
    ("nonblocking", SOCK, "NonBlocking=yes\n", "NonBlocking", "O_NONBLOCK"),
    ("unknown socket directive", SOCK + "FlushPending=yes\n", "", "FlushPending", "queued data"),
    ("option for no listener", SOCK + "PipeSize=4K\n", "", "PipeSize", "applies to no listener"),
    ("max connections without accept", SOCK + "MaxConnections=3\n", "", "MaxConnections", "Accept=yes"),
    ("datagram with accept", "[Socket]\nListenDatagram=53\nListenStream=53\nAccept=yes\n", "", "ListenDatagram",
     "stream"),
    ("host name listen", "[Socket]\nListenStream=localhost:80\nListenStream=80\n", "", "ListenStream",
     "not an IPv4 address"),
    ("two ExecStart", SOCK, "ExecStart=/bin/second\n", "ExecStart", "the last ExecStart"),
    ("privileged prefix", SOCK, "ExecStart=\nExecStart=+/bin/x\n", "ExecStart prefix", "privilege"),
    ("bad boolean", SOCK + "NoDelay=maybe\n", "", "NoDelay", "boolean"),
    ("type oneshot", SOCK, "Type=oneshot\n", "Type", "simple and notify"),
    ("unknown specifier", "[Socket]\nListenStream=/run/%H.sock\n", "", "ListenStream", "specifier %H"),
    ("install", SOCK + "[Install]\nWantedBy=sockets.target\n", "", "WantedBy", "[Install]"),
    ("limit data", SOCK, "LimitDATA=1G\n", "LimitDATA", "data-segment"),
    ("a port of 5,000 digits", "[Socket]\nListenStream=" + "9" * 5000 + "\nListenStream=1\n", "", "ListenStream",
     "port out of range"),
    ("a Unicode digit port", "[Socket]\nListenStream=127.0.0.1:\u00b2\nListenStream=1\n", "", "ListenStream",
     "port out of range"),
    ("a Unicode digit signal", SOCK, "KillSignal=\u00b2\n", "KillSignal", "signal out of range"),
    ("restart at once", SOCK, "RestartSec=0\n", "RestartSec", "restart_delay must be greater than 0"),
    ("no start timeout", SOCK, "TimeoutStartSec=0\n", "TimeoutStartSec", "turns systemd's timeout off"),
    ("no timeouts", SOCK, "TimeoutSec=0\n", "TimeoutSec", "no unlimited start_timeout and stop_timeout"),
    ("watchdog off", SOCK, "WatchdogSec=0\n", "WatchdogSec", "turns the watchdog off"),
    ("a variable the manager sets", SOCK, "ExecStart=\nExecStart=/bin/srv $MAINPID\n", "ExecStart",
     "not set by Environment= here"),
    ("a variable an EnvironmentFile may set", SOCK,
     "Environment=A=1\nEnvironmentFile=-/etc/default/srv\nExecStart=\nExecStart=/bin/srv ${A}\n", "ExecStart",
     "EnvironmentFile= may set it"),
    ("no variable name", SOCK, "ExecStart=\nExecStart=/bin/srv $1\n", "ExecStart", "not a variable name"),
]  # fmt: skip


@pytest.mark.parametrize(("why", "socket", "service", "key", "message"), DROPS, ids=[d[0] for d in DROPS])
def test_directive_dropped(tmp_path: Path, why: str, socket: str, service: str, key: str, message: str) -> None:
    """A directive that is not carried over is one located warning and a comment in its unit."""
    write_units(tmp_path, {"svc.socket": socket})
    accept = "Accept=yes" in socket
    write_units(tmp_path, {("svc@" if accept else "svc") + ".service": "[Service]\nExecStart=/bin/srv\n" + service})
    result = run([str(tmp_path / "svc.socket")], dirs=[])
    (unit,) = result.units
    matching = [d for d in result.dropped if d.key == key and message in d.why]
    assert len(matching) == 1, result.dropped
    assert matching[0].line >= 2 and matching[0].comment in unit.comments


def test_each_line_of_a_dropped_directive_is_warned(tmp_path: Path) -> None:
    """A directive set on several lines (After=, ExecStartPre=) that is not carried over is warned on each line."""
    write_units(tmp_path, {
        "svc.socket": "[Unit]\nAfter=a.target\nAfter=b.target\n" + SOCK,
        "svc.service": "[Service]\nExecStartPre=/bin/one\nExecStartPre=/bin/two\nExecStart=/bin/srv\n",
    })  # fmt: skip
    dropped = run([str(tmp_path / "svc.socket")], dirs=[]).dropped
    assert [(d.key, d.line) for d in dropped if d.key in ("After", "ExecStartPre")] == [
        ("After", 2), ("After", 3), ("ExecStartPre", 2), ("ExecStartPre", 3)]  # fmt: skip


def test_service_found_through_alias(tmp_path: Path) -> None:
    """A service that exists only as another unit's Alias= (syslog.service) is that unit, with a comment."""
    write_units(tmp_path, {
        "syslog.socket": "[Socket]\nListenDatagram=/run/log\n",
        "lib/other.service": "[Service]\nExecStart=/bin/other\n[Install]\nAlias=syslog-ng.service\n",
        "lib/rsyslog.service": "[Service]\nExecStart=/usr/sbin/rsyslogd -n\n[Install]\nAlias=syslog.service\n",
    })  # fmt: skip
    (unit,) = run([str(tmp_path / "syslog.socket")], dirs=[str(tmp_path / "lib")]).units
    assert unit.data["exec"] == ["/usr/sbin/rsyslogd", "-n"]
    assert any("names it in Alias=" in c for c in unit.comments)


def test_masked_service_is_a_read_error(tmp_path: Path) -> None:
    """A service linked to /dev/null (masked) is not run: a read error that says so."""
    write_units(tmp_path, {"x.socket": SOCK})
    (tmp_path / "x.service").symlink_to("/dev/null")
    with pytest.raises(ImportReadError, match="masked"):
        run([str(tmp_path / "x.socket")], dirs=[])


def test_settings_are_counted(tmp_path: Path) -> None:
    """ImportResult counts the settings read and those carried over without a warning."""
    write_units(tmp_path, {"svc.socket": SOCK + "FlushPending=yes\n", "svc.service": "[Service]\nExecStart=/x\nUser=u"})
    result = run([str(tmp_path / "svc.socket")], dirs=[])
    assert (result.settings, result.carried, len(result.dropped)) == (4, 3, 1)


# -- fuzz ----------------------------------------------------------------------------

TOKENS = ["[", "]", "[Socket]\n", "[Service]\n", "=", "\n", "\\\n", "\\", "\"", "'", "%", "%i", "%H", "#", ";",
          " ", "\t", "ListenStream=", "ListenStream=\n", "Accept=yes\n", "ExecStart=", "@", "-", "+", "!!", ":",
          "[::]:", "vsock:", "/", "0", "99999999999999999999", "\x00", "\u00e9", "infinity", "\\x", "Service="]


def mutate(text: str, rng: random.Random) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(4)
        pos = rng.randrange(len(chars) + 1)
        if op == 0 and chars:
            del chars[min(pos, len(chars) - 1) : min(pos, len(chars) - 1) + rng.randint(1, 8)]
        elif op == 1:
            chars[pos:pos] = list(rng.choice(TOKENS))
        elif op == 2 and chars:
            chars[min(pos, len(chars) - 1)] = chr(rng.randrange(1, 0x250))
        else:
            lines = "".join(chars).split("\n")
            rng.shuffle(lines)
            chars = list("\n".join(lines))
    return "".join(chars)


def test_fuzz_mutations_raise_only_import_errors(tmp_path: Path) -> None:
    """2,000 random mutations of the fixture units raise nothing but ImportSyntaxError (or a read error when
    the mutated socket now names a service that does not exist), and every imported unit round-trips."""
    rng = random.Random(11)
    pairs = [("sshd.socket", "sshd@.service"), ("web.socket", "web.service"),
             ("syslog-relay.socket", "relay.service"), ("uevent.socket", "uevent.service")]  # fmt: skip
    texts = {name: (ETC / name if (ETC / name).exists() else LIB / name).read_text() for pair in pairs for name in pair}
    syntax_errors = 0
    for i in range(2000):
        socket_name, service_name = rng.choice(pairs)
        directory = tmp_path / str(i % 50)
        directory.mkdir(exist_ok=True)
        target = rng.choice([socket_name, service_name])
        for name in (socket_name, service_name):
            text = mutate(texts[name], rng) if name == target else texts[name]
            (directory / name).write_text(text, encoding="utf-8", errors="surrogateescape")
        try:
            result = run([str(directory / socket_name)], dirs=[])
        except ImportSyntaxError:
            syntax_errors += 1
            continue
        except ImportReadError as exc:
            assert "is not in" in exc.message
            continue
        for unit in result.units:
            assert yaml.safe_load(render_yaml(unit)) == unit.data
    assert syntax_errors > 100


def test_expanded_variables_are_named_in_the_unit(tmp_path: Path) -> None:
    """A unit whose ExecStart= used $VARIABLES says so in a comment; nothing is dropped for them."""
    write_units(tmp_path, {"svc.socket": SOCK, "svc.service":
                           "[Service]\nEnvironment=PORT=7 OPTS=-v\nExecStart=/bin/srv $OPTS ${PORT}\n"})
    result = run([str(tmp_path / "svc.socket")], dirs=[])
    (unit,) = result.units
    assert unit.data["exec"] == ["/bin/srv", "-v", "7"]
    assert not [d for d in result.dropped if d.key == "ExecStart"]
    assert any("$OPTS, $PORT expanded at import time" in c for c in unit.comments), unit.comments


@pytest.mark.parametrize("word", ["${" * 100_000, "${A:" * 100_000 + "}", "${" + "x" * 1_000_000 + "}", "$$" * 100_000])
def test_hostile_exec_words_expand_as_systemd_would(word: str) -> None:
    """Unterminated, unsupported and huge references stay as written ($$ becomes $), in one pass."""
    from supervisor.importing.systemd import expand_variables

    argv, unknown, expanded = expand_variables(["/bin/srv", word], {"A": "1"})
    expected = "$" * 100_000 if word.startswith("$$") else word
    assert argv == ["/bin/srv", expected] and not expanded
    assert unknown == (["x" * 1_000_000] if word.startswith("${x") else [])
