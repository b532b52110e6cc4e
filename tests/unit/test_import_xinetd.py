"""The xinetd importer: parsing xinetd.conf(5) and translating services into units (pure, no network)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from supervisor.config import load_units_from_text
from supervisor.importing import ImportedUnit, ImportReadError, ImportResult, ImportSyntaxError, render_yaml
from supervisor.importing.xinetd import import_xinetd

DATA = Path(__file__).resolve().parent.parent / "data" / "import" / "xinetd"
SERVICES = str(DATA / "services")
HOSTS = {"gateway.example.com": ["192.0.2.7", "2001:db8::7"], "backend.example.com": ["198.51.100.9"]}


def fake_resolve(name: str) -> list[str]:
    """A resolver from a fixed table: tests never touch DNS."""
    if name in HOSTS:
        return HOSTS[name]
    raise OSError(f"{name}: Name or service not known")


def run(paths: list[str]) -> ImportResult:
    return import_xinetd(paths, services_file=SERVICES, resolve=fake_resolve)


def fixture_units() -> dict[str, ImportedUnit]:
    return {u.name: u for u in run([str(DATA / "xinetd.conf")]).units}


def import_text(tmp_path: Path, text: str, defaults: str = "") -> ImportResult:
    conf = tmp_path / "xinetd.conf"
    conf.write_text(defaults + text)
    return run([str(conf)])


def one(tmp_path: Path, body: str, defaults: str = "") -> ImportedUnit:
    result = import_text(tmp_path, "service svc\n{\n" + body + "\n}\n", defaults)
    assert len(result.units) == 1, result.dropped
    return result.units[0]


STREAM = "socket_type = stream\nwait = no\nport = 4000\nserver = /bin/srv\n"
DGRAM = "socket_type = dgram\nwait = yes\nport = 4000\nserver = /bin/srv\n"


# -- the shipped fixtures -------------------------------------------------------


def test_fixture_units_in_file_order() -> None:
    """includedir reads files in name order, skipping names with a dot or a trailing ~, and RPC is dropped."""
    expected = ["echo-stream", "echo-dgram", "mail", "rsync", "ssh-alt", "telnet", "finger", "tftp"]
    assert list(fixture_units()) == expected


EXPECTED: list[tuple[str, dict[str, Any]]] = [
    ("echo-stream", {"listen": [{"tcp": "0.0.0.0:7"}], "mode": "accept", "builtin": "echo", "max_connections": 60,
                     "rate": {"per_second": 25, "burst": 25}, "log_connections": True, "umask": "0002"}),
    ("echo-dgram", {"enabled": False, "listen": [{"udp": "0.0.0.0:7"}], "mode": "service", "builtin": "echo"}),
    ("tftp", {"listen": [{"udp": "0.0.0.0:69"}], "mode": "service", "pass": "stdio",
              "exec": ["/usr/sbin/in.tftpd", "-s", "/var/lib/tftpboot"], "user": "root"}),
    ("ssh-alt", {"listen": [{"tcp": "[::]:2222", "ipv6_only": False, "keepalive": True}], "mode": "accept",
                 "exec": ["/usr/sbin/sshd", "-i", "-f", "/etc/ssh/sshd_config"], "max_connections": 20,
                 "max_connections_per_source": 3, "rate": {"per_second": 10, "burst": 10},
                 "allow": ["10.0.0.0/8", "192.168.1.10", "192.168.1.11", "192.0.2.7", "2001:db8::7"],
                 "deny": ["10.9.0.0/16"], "access_times": ["08:00-18:30"], "banner_fail": "/etc/issue.net",
                 "limits": {"nofile": 4096, "as": 512 * 1024 * 1024}, "environment": {"LANG": "C", "TZ": "UTC"},
                 "pass_environment": ["PATH"], "nice": 5}),
    ("telnet", {"listen": [{"tcp": "127.0.0.1:23"}], "exec": ["/usr/sbin/in.telnetd", "-h"]}),
    ("finger", {"enabled": False, "listen": [{"tcp": "0.0.0.0:79", "nodelay": True}],
                "exec": ["/usr/sbin/in.fingerd", "-w"], "deny": ["0.0.0.0/0", "::/0"]}),
    ("mail", {"listen": [{"tcp": "0.0.0.0:25"}], "mode": "proxy", "backend": "10.1.2.3:2525",
              "max_connections": 1_000_000}),
    ("rsync", {"listen": [{"tcp": "0.0.0.0:873"}], "exec": ["/usr/bin/rsync", "--daemon"]}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "expected"), EXPECTED, ids=[e[0] for e in EXPECTED])
def test_fixture_translation(name: str, expected: dict[str, Any]) -> None:
    """Each fixture service translates to these unit keys (a subset of the unit's mapping)."""
    data = fixture_units()[name].data
    assert data["name"] == name
    assert {key: data.get(key) for key in expected} == expected


COMMENTS = [
    ("echo-stream", "instances: at max_connections sockvisor stops accepting and clients wait in the backlog"),
    ("echo-stream", "sockvisor pauses accepting, where xinetd disables the service for 30 seconds"),
    ("echo-dgram", "not carried over: instances = 60: only applies to per-connection"),
    ("ssh-alt", "only_from: host name gateway.example.com resolved at import time to 192.0.2.7, 2001:db8::7"),
    ("ssh-alt", "not carried over: rlimit_data = UNLIMITED"),
    ("ssh-alt", "not carried over: max_load = 2.5"),
    ("ssh-alt", "flags REUSE: sockvisor always sets SO_REUSEADDR"),
    ("telnet", "NAMEINARGS with tcpd: runs /usr/sbin/in.telnetd directly"),
    ("finger", "NAMEINARGS: argv[0] was 'in.fingerd'"),
    ("finger", "disabled: in the defaults' disabled list"),
    ("tftp", "port 69: tftp/udp in"),
    ("rsync", "not carried over: groups = yes"),
    ("rsync", "not carried over: log_type = SYSLOG daemon info"),
]


@pytest.mark.parametrize(("name", "comment"), COMMENTS)
def test_fixture_comments(name: str, comment: str) -> None:
    """Each unit carries a comment for what was not carried over or behaves differently."""
    assert any(comment in c for c in fixture_units()[name].comments), fixture_units()[name].comments


def test_fixture_dropped_warnings_are_located() -> None:
    """Warnings name the file and line of the setting, and a defaults setting is warned about once."""
    dropped = run([str(DATA / "xinetd.conf")]).dropped
    shown = [str(d) for d in dropped]
    assert f"{DATA}/xinetd.conf:8: log_type: not carried over: sockvisor logs events to its own stderr" in "\n".join(
        shown
    )
    assert sum(d.key == "log_type" for d in dropped) == 1
    rpc = [d for d in dropped if d.key == "type"]
    assert rpc and rpc[0].file.endswith("misc") and rpc[0].line == 12 and "rstatd is not imported" in rpc[0].why


def test_every_rendered_unit_round_trips() -> None:
    """render_yaml gives a document that starts with its source and loads back to exactly the unit's data."""
    for unit in fixture_units().values():
        text = render_yaml(unit)
        assert text.startswith(f"# imported from {unit.source}:{unit.line}\n")
        assert yaml.safe_load(text) == unit.data


def test_rendered_modes_are_quoted() -> None:
    """A umask (or file mode) is written as a double-quoted octal string."""
    assert 'umask: "0002"' in render_yaml(fixture_units()["tftp"])


def test_check_accepts_the_fixture_units() -> None:
    """sockvisor's own config reader accepts every imported unit as it is rendered."""
    for unit in fixture_units().values():
        load_units_from_text(render_yaml(unit), f"{unit.name}.yaml")


# -- parsing ------------------------------------------------------------------------


SYNTAX_ERRORS = [
    ("service a\n{\nsocket_type = stream\n", 1, "is never closed"),
    ("service a\nsocket_type = stream\n}\n", 2, "expected '{'"),
    ("service a\n{\nsocket_type stream\n}\n", 3, "expected 'attribute = value'"),
    ("service a\n{\nport = 1\nservice b\n{\n}\n", 4, "is not closed before this line"),
    ("socket_type = stream\n", 1, "expected 'service NAME'"),
    ("service\n{\n}\n", 1, "expected 'service NAME'"),
    ("service a b\n{\n}\n", 1, "expected 'service NAME'"),
    ("}\n", 1, "expected 'service NAME'"),
]


@pytest.mark.parametrize(("text", "line", "message"), SYNTAX_ERRORS)
def test_syntax_errors_are_located(tmp_path: Path, text: str, line: int, message: str) -> None:
    """A file that is not xinetd syntax raises ImportSyntaxError with its file and line."""
    with pytest.raises(ImportSyntaxError) as info:
        import_text(tmp_path, text)
    assert info.value.line == line
    assert message in info.value.message
    assert str(info.value).startswith(f"{tmp_path}/xinetd.conf:{line}: ")


def test_syntax_error_in_an_included_file_names_that_file(tmp_path: Path) -> None:
    """An error inside an included file is located in that file."""
    (tmp_path / "inc").write_text("\n\nservice x\n{\nbroken\n}\n")
    with pytest.raises(ImportSyntaxError, match=r"inc:5: "):
        import_text(tmp_path, "include inc\n")


def test_absolute_includes_are_taken_under_root(tmp_path: Path) -> None:
    """With root, "includedir /etc/xinetd.d" reads ROOT/etc/xinetd.d (an unpacked system, such as the corpus)."""
    (tmp_path / "etc" / "xinetd.d").mkdir(parents=True)
    (tmp_path / "etc" / "xinetd.d" / "svc").write_text("service svc\n{\n" + STREAM + "}\n")
    (tmp_path / "etc" / "xinetd.conf").write_text("includedir /etc/xinetd.d\n")
    conf = str(tmp_path / "etc" / "xinetd.conf")
    result = import_xinetd([conf], services_file=SERVICES, resolve=fake_resolve, root=str(tmp_path))
    assert [u.name for u in result.units] == ["svc"]


def test_settings_are_counted(tmp_path: Path) -> None:
    """Settings read are counted once each; a dropped service's settings are not carried over."""
    result = import_text(tmp_path, "defaults\n{\nmax_load = 2\n}\nservice svc\n{\n" + STREAM + "}\n"
                         "service r\n{\ntype = RPC\nsocket_type = dgram\nwait = yes\nserver = /r\n}\n")
    assert (result.settings, result.carried) == (9, 4)


def test_include_loop_is_an_error(tmp_path: Path) -> None:
    """A file that includes itself is refused instead of recursing forever."""
    with pytest.raises(ImportSyntaxError, match="include loop"):
        import_text(tmp_path, "include xinetd.conf\n")


def test_missing_file_is_a_read_error(tmp_path: Path) -> None:
    """A file that cannot be read raises ImportReadError (the CLI exits 1)."""
    with pytest.raises(ImportReadError):
        run([str(tmp_path / "absent.conf")])


def test_not_utf8_is_a_syntax_error(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are a located syntax error, not a crash."""
    conf = tmp_path / "xinetd.conf"
    conf.write_bytes(b"# ok\nservice \xff\n{\n}\n")
    with pytest.raises(ImportSyntaxError, match=":2: "):
        run([str(conf)])


def test_layout_tolerance(tmp_path: Path) -> None:
    """Tabs and spaces mix freely, a '{' may end the header line, and comments and blank lines are skipped."""
    text = (
        "\t# comment\n\nservice  svc {\n\t  socket_type\t=   stream\n  # inside\n"
        "\twait=no\nport =4000\nserver= /bin/srv\n  }\n"
    )
    unit = import_text(tmp_path, text).units[0]
    assert unit.data["listen"] == [{"tcp": "0.0.0.0:4000"}] and unit.data["exec"] == ["/bin/srv"]
    assert unit.line == 3


def test_includedir_skips_dotted_and_backup_names(tmp_path: Path) -> None:
    """includedir reads every plain file in name order and skips foo.rpmsave and foo~ as xinetd does."""
    directory = tmp_path / "d"
    directory.mkdir()
    for name in ("b", "a", "c.rpmnew", "d~"):
        (directory / name).write_text(f"service {name.replace('.', '_').replace('~', '_')}\n{{\n{STREAM}}}\n")
    result = import_text(tmp_path, "includedir d\n")
    assert [u.name for u in result.units] == ["a", "b"]


# -- translation ------------------------------------------------------------------


CASES: list[tuple[str, str, str, dict[str, Any]]] = [
    ("wait yes is service mode with stdio", DGRAM, "", {"mode": "service", "pass": "stdio"}),
    ("wait no is accept mode", STREAM, "", {"mode": "accept", "pass": "stdio"}),
    ("server_args follow server", STREAM + "server_args = -a  -b\n", "", {"exec": ["/bin/srv", "-a", "-b"]}),
    ("NAMEINARGS drops argv0", STREAM + "flags = NAMEINARGS\nserver_args = srvname -x\n", "",
     {"exec": ["/bin/srv", "-x"]}),
    ("IPv6 flag", STREAM + "flags = IPv6\n", "", {"listen": [{"tcp": "[::]:4000", "ipv6_only": False}]}),
    ("v6only yes", STREAM + "flags = IPv6\nv6only = yes\n", "", {"listen": [{"tcp": "[::]:4000", "ipv6_only": True}]}),
    ("bind sets the host", STREAM + "bind = 10.0.0.1\n", "", {"listen": [{"tcp": "10.0.0.1:4000"}]}),
    ("interface is bind", STREAM + "interface = ::1\n", "", {"listen": [{"tcp": "[::1]:4000", "ipv6_only": False}]}),
    ("NODELAY and KEEPALIVE", STREAM + "flags = NODELAY KEEPALIVE\n", "",
     {"listen": [{"tcp": "0.0.0.0:4000", "nodelay": True, "keepalive": True}]}),
    ("disable yes", STREAM + "disable = yes\n", "", {"enabled": False}),
    ("instances", STREAM + "instances = 7\n", "", {"max_connections": 7}),
    ("instances unlimited", STREAM + "instances = UNLIMITED\n", "", {"max_connections": 1_000_000}),
    ("per_source", STREAM + "per_source = 2\n", "", {"max_connections_per_source": 2}),
    ("per_source unlimited is off", STREAM + "per_source = UNLIMITED\n", "", {"max_connections_per_source": None}),
    ("cps", STREAM + "cps = 5 10\n", "", {"rate": {"per_second": 5, "burst": 5}}),
    ("trailing zeros are wildcards", STREAM + "only_from = 10.1.0.0 172.16.5.0\n", "",
     {"allow": ["10.1.0.0/16", "172.16.5.0/24"]}),
    ("factorized address", STREAM + "no_access = 10.0.0.{1,2}\n", "", {"deny": ["10.0.0.1", "10.0.0.2"]}),
    ("empty only_from denies all", STREAM + "only_from =\n", "", {"deny": ["0.0.0.0/0", "::/0"], "allow": None}),
    ("access_times normalised", STREAM + "access_times = 7:05-9:00 13:00-17:30\n", "",
     {"access_times": ["07:05-09:00", "13:00-17:30"]}),
    ("banners", STREAM + "banner = /etc/b\nbanner_success = /etc/s\nbanner_fail = /etc/f\n", "",
     {"banner": "/etc/b", "banner_success": "/etc/s", "banner_fail": "/etc/f"}),
    ("redirect", "socket_type = stream\nwait = no\nport = 80\nredirect = 10.0.0.5 8080\n", "",
     {"mode": "proxy", "backend": "10.0.0.5:8080", "exec": None}),
    ("redirect to a host name", "socket_type = stream\nwait = no\nport = 80\nredirect = backend.example.com 81\n", "",
     {"mode": "proxy", "backend": "198.51.100.9:81"}),
    ("env and passenv", STREAM + "env = A=1 B=x=y\npassenv = HOME\n", "",
     {"environment": {"A": "1", "B": "x=y"}, "pass_environment": ["HOME"]}),
    ("umask and nice", STREAM + "umask = 77\nnice = -3\n", "", {"umask": "0077", "nice": -3}),
    ("rlimits", STREAM + "rlimit_cpu = 30\nrlimit_stack = 8K\nrlimit_files = UNLIMITED\n", "",
     {"limits": {"cpu": 30, "stack": 8192, "nofile": "infinity"}}),
    ("user and group", STREAM + "user = nobody\ngroup = nogroup\n", "", {"user": "nobody", "group": "nogroup"}),
    ("log_on_success HOST", STREAM + "log_on_success = HOST\n", "", {"log_connections": True}),
    ("internal builtin", "type = INTERNAL\nsocket_type = stream\nwait = no\nport = 13\n", "",
     {"builtin": None}),  # the service is named svc, not a builtin: see the drop test
    ("defaults are inherited", STREAM, "defaults\n{\ninstances = 9\nonly_from = 10.0.0.1\n}\n",
     {"max_connections": 9, "allow": ["10.0.0.1"]}),
    ("+= adds to the defaults", STREAM + "only_from += 10.0.0.2\n", "defaults\n{\nonly_from = 10.0.0.1\n}\n",
     {"allow": ["10.0.0.1", "10.0.0.2"]}),
    ("-= removes from the defaults", STREAM + "only_from -= 10.0.0.1\n",
     "defaults\n{\nonly_from = 10.0.0.1 10.0.0.3\n}\n", {"allow": ["10.0.0.3"]}),
    ("= replaces the defaults", STREAM + "only_from = 10.0.0.4\n", "defaults\n{\nonly_from = 10.0.0.1\n}\n",
     {"allow": ["10.0.0.4"]}),
    ("enabled list", STREAM, "defaults\n{\nenabled = other\n}\n", {"enabled": False}),
    ("protocol sctp", STREAM + "protocol = sctp\n", "", {"listen": [{"tcp": "0.0.0.0:4000", "protocol": "sctp"}]}),
]  # fmt: skip


@pytest.mark.parametrize(("why", "body", "defaults", "expected"), CASES, ids=[c[0] for c in CASES])
def test_translation(tmp_path: Path, why: str, body: str, defaults: str, expected: dict[str, Any]) -> None:
    """Each xinetd attribute maps to these unit keys (None: the key is absent)."""
    if why == "internal builtin":
        result = import_text(tmp_path, "service svc\n{\n" + body + "\n}\n")
        assert not result.units and "no sockvisor builtin" in result.dropped[0].why
        return
    data = one(tmp_path, body, defaults).data
    assert {key: data.get(key) for key in expected} == expected


def test_service_name_through_services_and_aliases(tmp_path: Path) -> None:
    """Without port, the service name (or an alias) is looked up in /etc/services for its protocol."""
    result = import_text(tmp_path, "service mail\n{\nsocket_type = stream\nwait = no\nserver = /bin/m\n}\n"
                         "service sink\n{\nsocket_type = dgram\nwait = yes\nserver = /bin/s\n}\n")
    assert [u.data["listen"] for u in result.units] == [[{"tcp": "0.0.0.0:25"}], [{"udp": "0.0.0.0:9"}]]


def test_a_port_of_unicode_digits_is_not_a_port(tmp_path: Path) -> None:
    """Arabic-Indic digits are digits to Python, not to xinetd: a warning, and the service name's port."""
    result = import_text(tmp_path, "service telnet\n{\nsocket_type = stream\nwait = no\nport = \u0664\u0660\n"
                         "server = /t\n}\n")
    assert result.units[0].data["listen"] == [{"tcp": "0.0.0.0:23"}]
    assert [d.why for d in result.dropped] == ["not a port number 1-65535"]


def test_explicit_port_wins(tmp_path: Path) -> None:
    """An explicit port wins over the service name's port in /etc/services."""
    result = import_text(tmp_path, "service telnet\n{\nsocket_type = stream\nwait = no\nport = 2323\nserver = /t\n}\n")
    assert result.units[0].data["listen"] == [{"tcp": "0.0.0.0:2323"}]


def test_two_services_of_one_name_by_id(tmp_path: Path) -> None:
    """Two services of one name are told apart by id; a repeated id drops the second service."""
    block = "service echo\n{\nid = %s\ntype = INTERNAL\nsocket_type = stream\nwait = no\n}\n"
    result = import_text(tmp_path, block % "e1" + block % "e2" + block % "e1")
    assert [u.name for u in result.units] == ["e1", "e2"]
    assert "already defined" in result.dropped[0].why


def test_unit_names_are_sanitized(tmp_path: Path) -> None:
    """A unit name keeps only [A-Za-z0-9_.@-]."""
    result = import_text(tmp_path, "service my+svc/x\n{\n" + STREAM + "}\n")
    assert result.units[0].name == "my-svc-x"


WHOLE_SERVICE_DROPS = [
    ("RPC", "type = RPC\nsocket_type = dgram\nwait = yes\nserver = /r\n", "RPC services"),
    ("TCPMUX", "type = TCPMUX\nsocket_type = stream\nwait = no\nserver = /r\n", "TCPMUX services"),
    ("UNLISTED without port", "type = UNLISTED\nsocket_type = stream\nwait = no\nserver = /r\n", "needs a port"),
    ("not in services", "socket_type = stream\nwait = no\nserver = /r\n", "is not in"),
    ("raw socket", "socket_type = raw\nwait = no\nport = 1\nserver = /r\n", "no sockvisor listen kind"),
    ("no server", "socket_type = stream\nwait = no\nport = 1\n", "server is required"),
]


@pytest.mark.parametrize(("why", "body", "message"), WHOLE_SERVICE_DROPS, ids=[w[0] for w in WHOLE_SERVICE_DROPS])
def test_whole_service_dropped(tmp_path: Path, why: str, body: str, message: str) -> None:
    """A service sockvisor cannot run at all is dropped with one located warning."""
    result = import_text(tmp_path, "service svc\n{\n" + body + "}\n")
    assert not result.units
    assert len(result.dropped) == 1 and message in result.dropped[0].why
    assert result.dropped[0].file.endswith("xinetd.conf")


DROPS = [
    ("unknown attribute", STREAM + "frobnicate = 1\n", "frobnicate", "unknown attribute"),
    ("unresolvable host", STREAM + "only_from = nowhere.invalid\n", "only_from", "does not resolve"),
    ("domain suffix", STREAM + "only_from = .example.com 10.0.0.1\n", "only_from", "domain suffixes"),
    ("per-connection key in service mode", DGRAM + "instances = 3\n", "instances", "per-connection"),
    ("unknown flag", STREAM + "flags = INTERCEPT\n", "flags", "does not intercept"),
    ("rlimit_rss", STREAM + "rlimit_rss = 100\n", "rlimit_rss", "RLIMIT_RSS"),
    ("bad access time", STREAM + "access_times = 25:00-26:00\n", "access_times", "out of range"),
    ("log USERID", STREAM + "log_on_failure = USERID\n", "log_on_failure", "USERID"),
    ("dgram nowait", "socket_type = dgram\nwait = no\nport = 4000\nserver = /s\n", "wait", "per-datagram"),
    ("enabled in a service", STREAM + "enabled = yes\n", "enabled", "only valid in defaults"),
    ("instances of 5,000 digits", STREAM + "instances = " + "9" * 5000 + "\n", "instances", "expected a number"),
    ("a Unicode digit cps", STREAM + "cps = \u00b2 10\n", "cps", "expected 'cps = RATE WAIT'"),
]


@pytest.mark.parametrize(("why", "body", "key", "message"), DROPS, ids=[d[0] for d in DROPS])
def test_setting_dropped(tmp_path: Path, why: str, body: str, key: str, message: str) -> None:
    """A setting that is not carried over is a located warning and a comment in its unit."""
    result = import_text(tmp_path, "service svc\n{\n" + body + "}\n")
    (unit,) = result.units
    matching = [d for d in result.dropped if d.key == key and message in d.why]
    assert matching, result.dropped
    assert matching[0].line > 2
    assert matching[0].comment in unit.comments


def test_unresolvable_only_from_alone_denies_everyone(tmp_path: Path) -> None:
    """When no only_from entry can be carried over, nobody is admitted (as in xinetd), never everybody."""
    data = one(tmp_path, STREAM + "only_from = nowhere.invalid\n").data
    assert data["deny"] == ["0.0.0.0/0", "::/0"] and "allow" not in data


def test_missing_services_file_is_not_an_error(tmp_path: Path) -> None:
    """An unreadable /etc/services only drops the services that need it, saying why."""
    conf = tmp_path / "xinetd.conf"
    conf.write_text("service telnet\n{\nsocket_type = stream\nwait = no\nserver = /t\n}\n")
    result = import_xinetd([str(conf)], services_file=str(tmp_path / "none"), resolve=fake_resolve)
    assert not result.units and "cannot be read" in result.dropped[0].why


# -- fuzz -------------------------------------------------------------------------

FUZZ_FILES = sorted(p for p in (DATA / "xinetd.d").iterdir() if "." not in p.name and not p.name.endswith("~"))
TOKENS = ["{", "}", "=", "+=", "-=", "\n", "\t", " ", "#", "service x\n", "defaults\n", "include ", "includedir ",
          "UNLIMITED", "0", "-1", "99999999999999999999", "\x00", "\u00e9", "\\", "\"", "'", "%", ":", "/", "@",
          "0.0.0.0", "::", "{1,2}", "IPv6", "NAMEINARGS", "INTERNAL", "redirect = ", "cps = ", "type = ", ".", "~"]


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
    """2,000 random mutations of the fixtures raise nothing but ImportSyntaxError (or a read error for an
    include that now names a missing file), and whatever is imported renders and loads back."""
    rng = random.Random(11)
    originals = [p.read_text() for p in FUZZ_FILES]
    conf = tmp_path / "xinetd.conf"
    syntax_errors = 0
    for _ in range(2000):
        conf.write_text(mutate(rng.choice(originals), rng), encoding="utf-8", errors="surrogateescape")
        try:
            result = run([str(conf)])
        except ImportSyntaxError:
            syntax_errors += 1
            continue
        except ImportReadError as exc:
            assert "xinetd.conf" not in exc.file  # only an include of something that is not there
            continue
        for unit in result.units:
            assert yaml.safe_load(render_yaml(unit)) == unit.data
        for dropped in result.dropped:
            assert "\n" not in str(dropped)
    assert syntax_errors > 100  # the mutations do reach the parser's error paths
