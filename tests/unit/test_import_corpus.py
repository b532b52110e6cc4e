"""The importers on real configurations: every xinetd and systemd file a Debian package ships imports.

The corpus (tests/data/import/corpus, SOURCES.md says where each file comes from) is what a
Debian 12 system has on disk. Each input must import the way ``sockvisor import`` exits 0:
no ImportSyntaxError, no ImportReadError, nothing else raised, and every unit passes the config
reader that ``sockvisor check`` runs. Host names resolve through a fixed table (no network), and
services are looked for inside the corpus only, never in this machine's /lib/systemd.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from supervisor.config import load_units_from_text
from supervisor.importing import ImportedUnit, ImportResult, render_yaml
from supervisor.importing.systemd import import_systemd
from supervisor.importing.xinetd import import_xinetd

CORPUS = Path(__file__).resolve().parent.parent / "data" / "import" / "corpus"
SERVICES = str(CORPUS / "services" / "netbase" / "etc" / "services")
XINETD = CORPUS / "xinetd"
SYSTEMD = CORPUS / "systemd"
XINETD_ROOT = XINETD / "xinetd"  # the xinetd package: /etc/xinetd.conf says "includedir /etc/xinetd.d"
# Every package's unit directory, as on a system with all of them installed (syslog.socket's
# service is rsyslog's, lighttpd's example socket pairs with the package's lighttpd.service).
UNIT_DIRS = sorted(str(d) for pattern in ("*/lib/systemd/system", "*/usr/lib/systemd/system")
                   for d in SYSTEMD.glob(pattern))  # fmt: skip
HOSTS = {"localhost": ["127.0.0.1", "::1"]}


def fake_resolve(name: str) -> list[str]:
    """Host names in only_from resolve from a fixed table: the corpus never touches DNS."""
    if name in HOSTS:
        return HOSTS[name]
    raise OSError(f"{name}: Name or service not known")


def run_xinetd(paths: list[str], root: Path = XINETD_ROOT) -> ImportResult:
    return import_xinetd(paths, services_file=SERVICES, resolve=fake_resolve, root=str(root))


def run_systemd(path: str) -> ImportResult:
    return import_systemd([path], unit_dirs=UNIT_DIRS)


def check_units(units: list[ImportedUnit]) -> None:
    """Each unit passes the config reader as rendered, and so do all of them together (names, addresses)."""
    for unit in units:
        load_units_from_text(render_yaml(unit), f"{unit.name}.yaml")
    if units:
        load_units_from_text("".join("---\n" + render_yaml(u) for u in units), "all.yaml")


def check_warnings(result: ImportResult) -> None:
    """Every warning names a corpus file and a line, and is commented in a unit unless its service was dropped."""
    comments = {c for unit in result.units for c in unit.comments}
    for dropped in result.dropped:
        assert Path(dropped.file).is_file() and dropped.line >= 1, dropped
        assert dropped.comment in comments or "is not imported" in dropped.why, dropped
    assert 0 <= result.carried <= result.settings


def corpus_files(directory: Path, suffix: str = "") -> list[str]:
    return sorted(str(p.relative_to(CORPUS)) for p in directory.rglob("*" + suffix) if p.is_file())


# -- xinetd -----------------------------------------------------------------------------

# Every xinetd file of the corpus imported on its own, and the units it gives. A file with none
# says why in ZERO_UNITS: there the service is one sockvisor cannot run (or xinetd would refuse it).
XINETD_UNITS = {
    "xinetd/amanda-client/usr/share/doc/amanda-client/examples/xinetd.amandaclient": 1,
    "xinetd/amanda-common/etc/xinetd.d/amanda": 1,
    "xinetd/amanda-common/usr/share/doc/amanda-common/xinetd.amandaclient": 1,
    "xinetd/amanda-common/usr/share/doc/amanda-common/xinetd.amandaserver": 1,
    "xinetd/amanda-server/usr/share/doc/amanda-server/examples/xinetd.amandaserver": 1,
    "xinetd/cfingerd/usr/share/doc/cfingerd/examples/cfingerd.xinetd": 1,
    "xinetd/distcc/usr/share/doc/distcc/example/xinetd": 0,
    "xinetd/rush/usr/share/doc/rush/examples/rush.xinetd": 0,
    "xinetd/tang-xinetd/etc/xinetd.d/tangdx": 1,
    "xinetd/vsftpd/usr/share/doc/vsftpd/examples/INTERNET_SITE/vsftpd.xinetd": 1,
    "xinetd/xinetd/etc/xinetd.conf": 10,  # with its includedir: the xinetd package as installed
    "xinetd/xinetd/etc/xinetd.d/chargen": 2,
    "xinetd/xinetd/etc/xinetd.d/chargen-udp": 1,
    "xinetd/xinetd/etc/xinetd.d/daytime": 2,
    "xinetd/xinetd/etc/xinetd.d/daytime-udp": 1,
    "xinetd/xinetd/etc/xinetd.d/discard": 2,
    "xinetd/xinetd/etc/xinetd.d/discard-udp": 1,
    "xinetd/xinetd/etc/xinetd.d/echo": 2,
    "xinetd/xinetd/etc/xinetd.d/echo-udp": 1,
    "xinetd/xinetd/etc/xinetd.d/servers": 0,
    "xinetd/xinetd/etc/xinetd.d/services": 0,
    "xinetd/xinetd/etc/xinetd.d/time": 2,
    "xinetd/xinetd/etc/xinetd.d/time-udp": 1,
    "xinetd/xinetd/usr/share/doc/xinetd/examples/empty.conf": 0,
    "xinetd/xinetd/usr/share/doc/xinetd/examples/sample.conf": 20,
}
ZERO_UNITS = {
    "xinetd/distcc/usr/share/doc/distcc/example/xinetd": ["an unlisted service needs a port"],
    "xinetd/rush/usr/share/doc/rush/examples/rush.xinetd": ["TCPMUX multiplexer", "TCPMUXPLUS services"],
    "xinetd/xinetd/etc/xinetd.d/servers": ["list of its running servers"],
    "xinetd/xinetd/etc/xinetd.d/services": ["list of its services"],
    "xinetd/xinetd/usr/share/doc/xinetd/examples/empty.conf": ["it has no socket_type"],
}


def test_the_table_names_every_xinetd_file() -> None:
    """Each xinetd file in the corpus has its expected unit count here, so none is left out."""
    assert sorted(XINETD_UNITS) == corpus_files(XINETD)


@pytest.mark.parametrize(("name", "count"), sorted(XINETD_UNITS.items()), ids=sorted(XINETD_UNITS))
def test_xinetd_file_imports(name: str, count: int) -> None:
    """A Debian xinetd file imports without an error into units that sockvisor check accepts."""
    result = run_xinetd([str(CORPUS / name)])
    assert len(result.units) == count, [str(d) for d in result.dropped]
    check_units(result.units)
    check_warnings(result)
    for fragment in ZERO_UNITS.get(name, []):
        assert any(fragment in d.why and "is not imported" in d.why for d in result.dropped), result.dropped


def test_every_xinetd_d_file_installed_together(tmp_path: Path) -> None:
    """xinetd.conf over the /etc/xinetd.d files of every package at once (a system with all installed)."""
    (tmp_path / "etc" / "xinetd.d").mkdir(parents=True)
    shutil.copy(XINETD_ROOT / "etc" / "xinetd.conf", tmp_path / "etc")
    shipped = sorted(XINETD.glob("*/etc/xinetd.d/*"))
    for path in shipped:
        shutil.copy(path, tmp_path / "etc" / "xinetd.d" / path.name)
    result = run_xinetd([str(tmp_path / "etc" / "xinetd.conf")], root=tmp_path)
    assert len(shipped) == 14
    assert sorted(u.name for u in result.units if u.data.get("enabled", True)) == ["amanda", "tangd"]
    assert len(result.units) == 12
    check_units(result.units)
    # The -udp files repeat the ids of the dgram halves in their stream files: the second is dropped.
    repeated = [d for d in result.dropped if d.key == "id"]
    assert sorted(Path(d.file).name for d in repeated) == [f"{s}-udp" for s in ("chargen", "daytime", "discard",
                                                                                 "echo", "time")]  # fmt: skip


XINETD_PINS = [
    ("xinetd/amanda-common/etc/xinetd.d/amanda", "amanda",
     {"listen": [{"tcp": "0.0.0.0:10080"}], "mode": "accept", "pass": "stdio", "user": "backup", "group": "disk",
      "exec": ["/usr/lib/amanda/amandad", "-auth=bsdtcp", "amdump", "amindexd", "amidxtaped", "senddiscover"]}),
    ("xinetd/tang-xinetd/etc/xinetd.d/tangdx", "tangd",
     {"listen": [{"tcp": "0.0.0.0:8888"}], "exec": ["/usr/libexec/tangdw", "/var/lib/tang"], "user": "_tang"}),
    ("xinetd/cfingerd/usr/share/doc/cfingerd/examples/cfingerd.xinetd", "finger",
     {"listen": [{"tcp": "[::]:79", "ipv6_only": False}], "log_connections": True}),
    ("xinetd/vsftpd/usr/share/doc/vsftpd/examples/INTERNET_SITE/vsftpd.xinetd", "ftp",
     {"max_connections": 200, "max_connections_per_source": 5, "deny": ["192.168.1.3"],
      "banner_fail": "/etc/vsftpd.busy_banner"}),
    ("xinetd/xinetd/etc/xinetd.d/echo", "echo-dgram",
     {"enabled": False, "listen": [{"udp": "0.0.0.0:7"}], "mode": "service", "builtin": "echo"}),
    ("xinetd/xinetd/usr/share/doc/xinetd/examples/sample.conf", "login",
     {"max_connections": 25, "allow": ["127.0.0.1", "::1", "192.231.139.0/24"]}),
    ("xinetd/xinetd/usr/share/doc/xinetd/examples/sample.conf", "telnet",
     {"listen": [{"tcp": "127.0.0.1:23"}], "exec": ["/usr/etc/in.telnetd"]}),
    ("xinetd/xinetd/usr/share/doc/xinetd/examples/sample.conf", "ftp",
     {"access_times": ["02:00-08:59", "12:00-23:59"], "nice": 10, "max_connections": 4}),
    ("xinetd/xinetd/usr/share/doc/xinetd/examples/sample.conf", "tftp", {"enabled": False, "mode": "service"}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "unit", "expected"), XINETD_PINS,
                         ids=[f"{p[0].split('/')[1]}-{p[1]}" for p in XINETD_PINS])
def test_xinetd_translation_of_real_files(name: str, unit: str, expected: dict[str, object]) -> None:
    """Real services translate to these unit keys (a subset of each unit)."""
    data = {u.name: u.data for u in run_xinetd([str(CORPUS / name)]).units}[unit]
    assert {key: data.get(key) for key in expected} == expected


# -- systemd ----------------------------------------------------------------------------

SOCKETS = corpus_files(SYSTEMD, ".socket")


def test_the_corpus_has_every_socket() -> None:
    """The corpus holds the .socket units of at least 25 packages (SOURCES.md lists them)."""
    packages = {Path(s).parts[1] for s in SOCKETS}
    assert len(packages) >= 25 and len(SOCKETS) >= 60


@pytest.mark.parametrize("name", SOCKETS, ids=[Path(s).name for s in SOCKETS])
def test_systemd_socket_imports(name: str) -> None:
    """A Debian .socket imports, with the service it activates found in the corpus, into one unit check accepts."""
    result = run_systemd(str(CORPUS / name))
    (unit,) = result.units
    assert unit.data["listen"], unit.comments
    assert unit.data.get("exec"), unit.comments
    check_units(result.units)
    check_warnings(result)
    assert result.carried > 0


def systemd_unit(name: str) -> ImportedUnit:
    (unit,) = run_systemd(str(next(SYSTEMD.rglob(name)))).units
    return unit


SYSTEMD_PINS = [
    ("ssh.socket", {"listen": [{"tcp": "22"}], "mode": "service", "exec": ["/usr/sbin/sshd", "-D", "$SSHD_OPTS"],
                    "ready": "notify"}),
    ("saned.socket", {"mode": "accept", "pass": "fds", "max_connections": 64, "user": "saned"}),
    ("tangd.socket", {"mode": "accept", "pass": "stdio", "exec": ["/usr/libexec/tangd", "/var/lib/tang"]}),
    ("gpsd.socket", {"listen": [{"unix": "/run/gpsd.sock", "mode": "0600"}, {"tcp": "[::1]:2947", "ipv6_only": True},
                                {"tcp": "127.0.0.1:2947"}]}),
    ("syslog.socket", {"exec": ["/usr/sbin/rsyslogd", "-n", "-iNONE"], "ready": "notify"}),
    ("systemd-journald.socket", {"restart": "always", "restart_delay": None, "watchdog": "180s"}),
    ("docker.socket", {"start_timeout": None, "ready": "notify",
                       "listen": [{"unix": "/run/docker.sock", "mode": "0660", "user": "root", "group": "docker"}]}),
    ("systemd-udevd-kernel.socket", {"listen": [{"netlink": "kobject-uevent 1", "receive_buffer": 128 << 20}]}),
    ("systemd-initctl.socket", {"listen": [{"fifo": "/run/initctl", "mode": "0600", "symlinks": ["/dev/initctl"]}]}),
    ("systemd-rfkill.socket", {"listen": [{"special": "/dev/rfkill", "writable": True}]}),
    ("systemd-coredump.socket", {"listen": [{"unix-seqpacket": "/run/systemd/coredump", "mode": "0600"}],
                                 "mode": "accept", "max_connections": 16}),
    ("multipathd.socket", {"listen": [{"unix": "@/org/kernel/linux/storage/multipathd"}]}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "expected"), SYSTEMD_PINS, ids=[p[0] for p in SYSTEMD_PINS])
def test_systemd_translation_of_real_files(name: str, expected: dict[str, object]) -> None:
    """Real sockets translate to these unit keys (None: the key is absent)."""
    data = dict(systemd_unit(name).data)
    if data.get("mode") == "service" and isinstance(data.get("listen"), list):
        # Accept=no fds carry the socket unit's name by default (pinned in test_import_systemd.py).
        assert all(e.get("name") for e in data["listen"])
        data["listen"] = [{k: v for k, v in e.items() if (k, v) != ("name", name)} for e in data["listen"]]
    assert {key: data.get(key) for key in expected} == expected


WARNINGS = [
    ("syslog.socket", "syslog.service is ", "names it in Alias="),
    ("systemd-journald.socket", "not carried over: RestartSec = 0", "restart_delay must be greater than 0"),
    ("docker.socket", "not carried over: TimeoutStartSec = 0", "turns systemd's timeout off"),
    ("cockpit-wsinstance-https@.socket", "cockpit-wsinstance-https@.socket is a template", "empty instance"),
    ("syslog.socket", "not carried over: Documentation = man:systemd.special(7)", "no unit dependencies"),
]


@pytest.mark.parametrize(("name", "start", "fragment"), WARNINGS, ids=[f"{w[0]}-{w[2]}" for w in WARNINGS])
def test_systemd_comments_on_real_files(name: str, start: str, fragment: str) -> None:
    """What does not map one to one is a comment in the unit (a repeated directive on each of its lines)."""
    comments = systemd_unit(name).comments
    assert any(c.startswith(start) and fragment in c for c in comments), comments
