"""``sockvisor import`` end to end: the real CLI, its output checked and run by the real daemon.

The translation rules are pinned in tests/unit/test_import_*.py; here: the command's
interface (SPEC 9: stdout or ``--output``, ``--force``, ``--strict``, located warnings,
exit codes, no traceback), and imported units that serve real clients: xinetd internal
services over TCP and UDP, a systemd ``Accept=yes`` unit with the connection where its
service expects it, an ``Accept=no`` unit whose fds carry the names systemd gives them.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import PROGRAMS, Sockvisor, connect, free_port, roundtrip, wait_for

WARNING = re.compile(r"^\S+:\d+: \S+: not carried over: .+$")


def run_import(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", "import", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


def no_traceback(res: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def xinetd_internal(root: Path, tcp_echo: int, udp_echo: int, daytime: int) -> Path:
    """An xinetd.conf with includedir, defaults and three internal services on loopback ports."""
    write(root / "services", "echo 7/tcp\necho 7/udp\ndaytime 13/tcp\n")
    write(root / "xinetd.d" / "echo", f"""\
        # echo, both ways, told apart by id (as Debian's xinetd ships them)
        service echo
        {{
            id          = echo-stream
            type        = INTERNAL UNLISTED
            socket_type = stream
            protocol    = tcp
            port        = {tcp_echo}
            wait        = no
            user        = root
            bind        = 127.0.0.1
            instances   = 10
            only_from   = 127.0.0.0/8
        }}
        service echo
        {{
            id          = echo-dgram
            type\t= INTERNAL UNLISTED
            socket_type = dgram
            protocol    = udp
            port        = {udp_echo}
            wait        = yes
            user        = root
            bind        = 127.0.0.1
        }}
        """)
    write(root / "xinetd.d" / "daytime", f"""\
        service daytime
        {{
            type        = INTERNAL UNLISTED
            socket_type = stream
            port        = {daytime}
            wait        = no
            bind        = 127.0.0.1
            log_on_success += USERID
        }}
        """)
    return write(root / "xinetd.conf", f"""\
        defaults
        {{
            log_type       = SYSLOG daemon info
            log_on_success = HOST PID
        }}
        includedir {root / "xinetd.d"}
        """)


# ---------------------------------------------------------------- the command's interface


def test_stdout_documents_pass_check_and_warnings_are_located(tmp_path: Path) -> None:
    """Default output: YAML documents on stdout that `sockvisor check` accepts; warnings FILE:LINE on stderr."""
    conf = xinetd_internal(tmp_path / "x", free_port(), free_port(), free_port())
    res = run_import("xinetd", conf, "--services", tmp_path / "x" / "services")
    no_traceback(res)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"# imported from {tmp_path / 'x' / 'xinetd.d' / 'daytime'}:1\n")
    assert res.stdout.count("\n---\n") == 2
    warnings = res.stderr.splitlines()
    assert warnings and all(WARNING.match(line) for line in warnings), warnings
    assert any(line.startswith(f"{conf}:3: log_type: not carried over: ") for line in warnings), warnings
    assert "# not carried over: log_type = SYSLOG daemon info: " in res.stdout
    write(tmp_path / "conf" / "sockets.d" / "imported.yaml", res.stdout)
    checked = check(tmp_path / "conf")
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.splitlines()[-1] == "ok: 3 unit(s)"


def test_output_dir_writes_one_file_per_unit_and_refuses_to_overwrite(tmp_path: Path) -> None:
    """--output DIR: NAME.yaml each; a second run without --force changes nothing and exits 1; --force replaces."""
    conf = xinetd_internal(tmp_path / "x", free_port(), free_port(), free_port())
    out = tmp_path / "conf" / "sockets.d"
    args = ("xinetd", conf, "--services", tmp_path / "x" / "services", "-o", out)
    first = run_import(*args)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in out.iterdir()) == ["daytime.yaml", "echo-dgram.yaml", "echo-stream.yaml"]
    assert first.stdout == ""
    assert check(tmp_path / "conf").returncode == 0
    (out / "echo-dgram.yaml").write_text("# mine\n")
    before = {p.name: p.read_text() for p in out.iterdir()}
    again = run_import(*args)
    no_traceback(again)
    assert again.returncode == 1
    assert "exists (use --force to replace it)" in again.stderr
    assert {p.name: p.read_text() for p in out.iterdir()} == before  # nothing written, not even the free names
    forced = run_import(*args, "--force")
    assert forced.returncode == 0, forced.stderr
    assert (out / "echo-dgram.yaml").read_text().startswith("# imported from ")
    assert sorted(p.name for p in out.iterdir()) == ["daytime.yaml", "echo-dgram.yaml", "echo-stream.yaml"]


def test_a_planted_symlink_is_never_followed(tmp_path: Path) -> None:
    """NAME.yaml as a symlink to a file elsewhere: refused without --force, replaced (not written through) with it."""
    conf = xinetd_internal(tmp_path / "x", free_port(), free_port(), free_port())
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (out / "daytime.yaml").symlink_to(victim)
    args = ("xinetd", conf, "--services", tmp_path / "x" / "services", "-o", out)
    assert run_import(*args).returncode == 1
    assert victim.read_text() == "precious\n"
    assert run_import(*args, "--force").returncode == 0
    assert victim.read_text() == "precious\n"
    assert not (out / "daytime.yaml").is_symlink()


def test_strict_exits_2_when_anything_was_dropped(tmp_path: Path) -> None:
    conf = xinetd_internal(tmp_path / "x", free_port(), free_port(), free_port())
    res = run_import("xinetd", conf, "--services", tmp_path / "x" / "services", "--strict")
    assert res.returncode == 2
    assert res.stdout.count("# imported from ") == 3  # the units are still printed


@pytest.mark.parametrize(
    ("source", "name", "text", "expected"),
    [
        ("xinetd", "xinetd.conf", "service echo\n{\n  socket_type stream\n}\n", r":3: "),
        ("xinetd", "xinetd.conf", "service echo\n{\n  wait = no\n", r":\d+: "),
        ("xinetd", "xinetd.conf", "service e\n{\n socket_type = stream\n wait = no\n server = /bin/cat\n port = "
         + "9" * 5000 + "\n}\n", None),
        ("systemd", "bad.socket", "[Socket]\nListenStream=80\n\x00\n", None),
        ("systemd", "bad.socket", "[Socket\nListenStream=80\n", r":1: "),
    ],
    ids=["no-operator", "unclosed-block", "5000-digit-port", "nul-byte", "unclosed-section"],
)
def test_bad_input_is_one_located_line_never_a_traceback(
    tmp_path: Path, source: str, name: str, text: str, expected: str | None
) -> None:
    path = tmp_path / name
    path.write_bytes(text.encode())
    res = run_import(source, path)
    no_traceback(res)
    assert res.returncode in (0, 2), res.stderr
    if res.returncode == 2:
        lines = res.stderr.splitlines()
        assert lines and lines[0].startswith(f"{path}:"), lines
        if expected:
            assert re.search(expected, lines[0]), lines
    else:  # read as something, dropped with a located warning
        lines = [line for line in res.stderr.splitlines() if not line.startswith("sockvisor import ")]
        assert lines and all(WARNING.match(line) for line in lines), res.stderr


def test_unreadable_and_missing_inputs_exit_1(tmp_path: Path) -> None:
    missing = run_import("xinetd", tmp_path / "nope.conf")
    no_traceback(missing)
    assert missing.returncode == 1 and str(tmp_path / "nope.conf") in missing.stderr
    lonely = write(tmp_path / "lonely.socket", "[Socket]\nListenStream=127.0.0.1:1\n")
    res = run_import("systemd", lonely)  # no lonely.service beside it, nor in the system directories
    no_traceback(res)
    assert res.returncode == 1 and str(lonely) in res.stderr
    usage = run_import("systemd")
    assert usage.returncode == 2 and "at least one" in usage.stderr


# ---------------------------------------------------------------- imported units, run


def test_imported_xinetd_internal_services_answer_real_clients(sockvisor: Sockvisor, tmp_path: Path) -> None:
    """xinetd's echo (tcp and udp) and daytime, imported, are served by the daemon's builtins."""
    tcp_echo, udp_echo, daytime = free_port(), free_port(socket.SOCK_DGRAM), free_port()
    conf = xinetd_internal(tmp_path / "x", tcp_echo, udp_echo, daytime)
    res = run_import("xinetd", conf, "--services", tmp_path / "x" / "services",
                     "-o", sockvisor.config / "sockets.d")
    assert res.returncode == 0, res.stderr
    sockvisor.start()
    assert roundtrip(tcp_echo, b"over tcp\n") == b"over tcp\n"
    assert roundtrip(daytime).endswith(b"\r\n")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(10)
        udp.sendto(b"over udp", ("127.0.0.1", udp_echo))
        assert udp.recvfrom(100)[0] == b"over udp"
    for name in ("echo-stream", "daytime"):
        st = sockvisor.unit_status(name)
        assert st["spawns"] == 0 and st["connections"]["accepted"] == 1, st


def systemd_pair(root: Path, stem: str, socket_text: str, service_name: str, service_text: str) -> Path:
    write(root / service_name, service_text)
    return write(root / f"{stem}.socket", socket_text)


@pytest.mark.parametrize("stdin_socket", [True, False], ids=["StandardInput=socket", "fd3"])
def test_imported_accept_yes_unit_gets_the_connection_where_systemd_puts_it(
    sockvisor: Sockvisor, tmp_path: Path, stdin_socket: bool
) -> None:
    """Accept=yes with NAME@.service: one child per connection; stdin/stdout or fd 3 with LISTEN_FDS=1."""
    port = free_port()
    stdin = "StandardInput=socket\n" if stdin_socket else ""
    sock = systemd_pair(
        tmp_path / "units", "report",
        f"[Socket]\nListenStream=127.0.0.1:{port}\nAccept=yes\n",
        "report@.service",
        f"[Service]\nExecStart={sys.executable} {PROGRAMS / 'accept_report.py'}\n{stdin}",
    )
    res = run_import("systemd", sock, "-o", sockvisor.config / "sockets.d")
    assert res.returncode == 0, res.stderr
    sockvisor.start()
    reports = [json.loads(roundtrip(port)) for _ in range(2)]
    assert reports[0]["pid"] != reports[1]["pid"]
    env = reports[0]["env"]
    if stdin_socket:
        assert "LISTEN_FDS" not in env
        assert reports[0]["fds"]["0"]["socket"] and reports[0]["fds"]["1"]["socket"]
    else:
        assert env["LISTEN_FDS"] == "1" and env["LISTEN_FDNAMES"] == "connection"
        assert reports[0]["fds"]["3"]["socket"]
    wait_for(lambda: sockvisor.unit_status("report")["connections"]["accepted"] == 2, what="two accepted")


def test_imported_accept_no_unit_hands_over_fds_with_systemds_names(sockvisor: Sockvisor, tmp_path: Path) -> None:
    """Accept=no: every listener as fds 3.., named FileDescriptorName= or else after the .socket unit."""
    stream, datagram = free_port(), free_port(socket.SOCK_DGRAM)
    sock = systemd_pair(
        tmp_path / "units", "multi",
        f"[Socket]\nListenStream=127.0.0.1:{stream}\nListenDatagram=127.0.0.1:{datagram}\n",
        "multi.service",
        f"[Service]\nExecStart={sys.executable} {PROGRAMS / 'svc_report.py'}\n",
    )
    named_port = free_port()
    named = systemd_pair(
        tmp_path / "units", "named",
        f"[Socket]\nListenStream=127.0.0.1:{named_port}\nFileDescriptorName=web\n",
        "named.service",
        f"[Service]\nExecStart={sys.executable} {PROGRAMS / 'svc_report.py'}\n",
    )
    res = run_import("systemd", sock, named, "-o", sockvisor.config / "sockets.d")
    assert res.returncode == 0, res.stderr
    sockvisor.start()
    reports = {}
    for name, port in (("multi", stream), ("named", named_port)):
        with connect(port) as s:
            reports[name] = json.loads(s.makefile("rb").read())
    env = reports["multi"]["env"]
    assert env["LISTEN_FDS"] == "2" and env["LISTEN_FDNAMES"] == "multi.socket:multi.socket", env
    assert env["LISTEN_PID"] == str(reports["multi"]["pid"])
    assert reports["named"]["env"]["LISTEN_FDNAMES"] == "web"
