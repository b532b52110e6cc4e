"""Real inetd programs from Debian, unchanged, under sockvisor, each driven by its own real client."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Sockvisor, free_port


def need(*programs: str, package: str) -> None:
    """Skip unless every program is installed (naming the Debian package that has them)."""
    missing = [p for p in programs if shutil.which(p) is None and not Path(p).exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian package {package})")


def run(*cmd: str, timeout: float = 30, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert res.returncode == 0, f"{cmd} exited {res.returncode}: {res.stderr}"
    return res


def test_rsync_daemon_in_inetd_mode(sockvisor: Sockvisor, port: int, short_tmp: Path) -> None:
    """`rsync --daemon` on stdin/stdout (inetd mode) serves a module to the rsync client over rsync://."""
    need("rsync", package="rsync")
    data = short_tmp / "data"
    data.mkdir()
    (data / "hello.txt").write_text("hello from rsyncd\n")
    conf = short_tmp / "rsyncd.conf"
    conf.write_text(f"use chroot = no\nuid = root\ngid = root\n[pub]\n  path = {data}\n  read only = yes\n")
    sockvisor.unit("rsync", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: accept
        exec: [rsync, --daemon, --config={conf}]
    """)
    sockvisor.start()
    listing = run("rsync", f"rsync://127.0.0.1:{port}/").stdout
    assert "pub" in listing
    dest = short_tmp / "copy"
    run("rsync", "-a", f"rsync://127.0.0.1:{port}/pub/", f"{dest}/")
    assert (dest / "hello.txt").read_text() == "hello from rsyncd\n"
    ev = sockvisor.wait_event("child_exited", unit="rsync", count=2)
    assert ev["status"] == "exit 0"


def test_git_daemon_inetd(sockvisor: Sockvisor, port: int, short_tmp: Path) -> None:
    """`git daemon --inetd` serves a repository that `git clone git://...` fetches."""
    need("git", package="git")
    base = short_tmp / "repos"
    work = short_tmp / "work"
    work.mkdir()
    base.mkdir()
    ident = ["-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    run("git", "init", "-q", "-b", "main", str(work))
    (work / "README").write_text("served by sockvisor\n")
    run("git", "-C", str(work), "add", "README")
    run("git", *ident, "-C", str(work), "commit", "-q", "-m", "first")
    run("git", "clone", "-q", "--bare", str(work), str(base / "proj.git"))
    sockvisor.unit("git", f"""
        listen: [{{tcp: "127.0.0.1:{port}"}}]
        mode: accept
        exec: [git, daemon, --inetd, --export-all, "--base-path={base}", "{base}"]
    """)
    sockvisor.start()
    clone = short_tmp / "clone"
    run("git", "clone", "-q", f"git://127.0.0.1:{port}/proj.git", str(clone))
    assert (clone / "README").read_text() == "served by sockvisor\n"
    sockvisor.wait_event("child_exited", unit="git")


def test_fingerd(sockvisor: Sockvisor) -> None:
    """in.fingerd (package fingerd) answers the finger client on port 79 of a private loopback address."""
    need("/usr/sbin/in.fingerd", package="fingerd")
    need("finger", package="finger")
    host = "127.0.0.79"
    with socket.socket() as probe:
        try:
            probe.bind((host, 79))
        except OSError as exc:
            pytest.skip(f"cannot bind {host}:79 ({exc.strerror})")
    sockvisor.unit("finger", f"""
        listen: [{{tcp: "{host}:79"}}]
        mode: accept
        exec: [/usr/sbin/in.fingerd]
    """)
    sockvisor.start()
    out = run("finger", f"root@{host}").stdout
    assert "Login: root" in out
    ev = sockvisor.wait_event("child_exited", unit="finger")
    assert ev["remote"].startswith("127.0.0.1:")


def test_tftpd_wait_service(sockvisor: Sockvisor, short_tmp: Path) -> None:
    """in.tftpd (tftpd-hpa), an inetd "wait" service, runs as mode: service with pass: stdio and serves tftp."""
    need("/usr/sbin/in.tftpd", package="tftpd-hpa")
    need("tftp", package="tftp-hpa")
    port = free_port(socket.SOCK_DGRAM)
    root = short_tmp / "tftp"
    root.mkdir()
    (root / "boot.txt").write_text("tftp payload\n")
    root.chmod(0o755)
    (root / "boot.txt").chmod(0o644)
    sockvisor.unit("tftp", f"""
        listen: [{{udp: "127.0.0.1:{port}"}}]
        mode: service
        pass: stdio
        exec: [/usr/sbin/in.tftpd, --user, root, --secure, "{root}"]
    """)
    sockvisor.start()
    dest = short_tmp / "got.txt"
    run("tftp", "-m", "binary", "127.0.0.1", str(port), "-c", "get", "boot.txt", str(dest))
    assert dest.read_text() == "tftp payload\n"
