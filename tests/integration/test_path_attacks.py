"""Issue 9 item 2: a local user (nobody) attacks the paths of unix sockets, the control socket and activate.

Every attacker step runs as uid 65534 through ``setpriv``, in a sticky world-writable directory
the test makes; the daemon (or the binding code) runs as root, as in production.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor import control, sockets
from supervisor.errors import BindError
from supervisor.model import Listen, ListenKind
from tests.conftest import REPO, Sockvisor

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                       reason="needs root and setpriv to act as nobody"),
]


def nobody(code: str, timeout: float = 30) -> None:
    """Run Python ``code`` as nobody; it must succeed."""
    subprocess.run([*AS_NOBODY, sys.executable, "-c", textwrap.dedent(code)], check=True, timeout=timeout)


def snapshot(directory: Path) -> dict[str, tuple[int, int, int, int]]:
    """Name -> (inode, mode, uid, size) of every entry, without following links."""
    out = {}
    for entry in os.scandir(directory):
        st = entry.stat(follow_symlinks=False)
        out[entry.name] = (st.st_ino, st.st_mode, st.st_uid, st.st_size)
    return out


@pytest.fixture
def shared(short_tmp: Path) -> Path:
    """A sticky, world-writable, root-owned directory (like /tmp) for the attacker to play in."""
    d = short_tmp / "pub"
    d.mkdir()
    os.chmod(d, 0o1777)
    return d


@pytest.fixture
def vault(short_tmp: Path) -> Iterator[Path]:
    """A root-only directory holding a root file (s.sock, 0600) and a stale root socket (old.sock)."""
    d = short_tmp / "vault"
    d.mkdir(mode=0o700)
    (d / "s.sock").write_text("root's file\n")
    os.chmod(d / "s.sock", 0o600)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(d / "old.sock"))
    yield d


def run_daemon(sv: Sockvisor, unit: str) -> subprocess.CompletedProcess[str]:
    """Run the real daemon on ``unit`` expecting it to refuse at start; returns the finished process."""
    sv.unit("web", unit)
    return subprocess.run([sys.executable, "-m", "supervisor", "run", "--config", str(sv.config)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def error_lines(res: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in res.stderr.splitlines() if "cannot bind" in line]


@pytest.mark.parametrize("name", ["old.sock", "sub/s.sock"])
def test_symlinked_parent_is_refused_and_the_root_only_dir_is_untouched(
    sockvisor: Sockvisor, shared: Path, vault: Path, name: str
) -> None:
    """A parent symlink nobody planted into a root-only dir: exit 1 naming it; nothing unlinked or made there."""
    nobody(f"import os; os.symlink({str(vault)!r}, {str(shared / 'p')!r})")
    before = snapshot(vault)
    res = run_daemon(sockvisor, f"""
        listen: [{{unix: "{shared}/p/{name}", mode: "0666"}}]
        exec: [/bin/true]
    """)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    lines = error_lines(res)
    assert lines and f"{shared}/p is a symlink owned by uid {NOBODY} (nobody); refusing to follow it" in lines[-1]
    assert snapshot(vault) == before, "nothing in the root-only directory changed"


def test_parent_owned_by_nobody_is_refused_with_its_path(sockvisor: Sockvisor, shared: Path) -> None:
    """A parent directory nobody made (so nobody could swap the node) is refused, and the error names it."""
    nobody(f"import os; os.mkdir({str(shared / 'mine')!r}, 0o755)")
    res = run_daemon(sockvisor, f"""
        listen: [{{unix: "{shared}/mine/s.sock"}}]
        exec: [/bin/true]
    """)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    (line,) = error_lines(res)
    assert f"unit web: cannot bind unix:{shared}/mine/s.sock: directory {shared}/mine is owned by uid {NOBODY}" in line
    assert os.listdir(shared / "mine") == []


def test_group_or_world_writable_parent_is_refused(short_tmp: Path) -> None:
    """A root-owned parent that others may write to (not sticky) is refused as well."""
    d = short_tmp / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(BindError, match=f"directory {d} is writable by every user and not sticky"):
        sockets.bind(Listen(kind=ListenKind.UNIX, address=f"{d}/s.sock", name="t"), unit="web")
    assert os.listdir(d) == []


def test_another_users_stale_node_in_a_sticky_dir_is_refused_not_unlinked(shared: Path) -> None:
    """In a sticky directory only our own node is touched: nobody's stale socket stays, the bind is refused."""
    path = shared / "s.sock"
    nobody(f"import socket; socket.socket(socket.AF_UNIX).bind({str(path)!r})")
    ino = os.lstat(path).st_ino
    with pytest.raises(BindError, match=f"the socket {path} belongs to uid {NOBODY}"):
        sockets.bind(Listen(kind=ListenKind.UNIX, address=str(path), name="t"), unit="web")
    assert os.lstat(path).st_ino == ino


def test_own_stale_node_and_symlinks_in_a_sticky_dir_are_handled(shared: Path) -> None:
    """Our own stale node in a sticky directory is replaced, and symlinks are made and removed there."""
    path = shared / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    listen = Listen(kind=ListenKind.UNIX, address=str(path), name="t", mode=0o660,
                    symlinks=(str(shared / "link.sock"),))
    bound = sockets.bind(listen, unit="web")
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
    assert os.readlink(shared / "link.sock") == str(path)
    bound.close()
    assert os.listdir(shared) == []


def test_nobodys_symlink_in_the_way_of_a_symlink_is_refused(shared: Path, vault: Path) -> None:
    """A symlink nobody put where our symlink goes is neither followed nor replaced."""
    nobody(f"import os; os.symlink({str(vault / 's.sock')!r}, {str(shared / 'link')!r})")
    listen = Listen(kind=ListenKind.UNIX, address=str(shared / "s.sock"), name="t", symlinks=(str(shared / "link"),))
    with pytest.raises(BindError, match=f"the symlink {shared}/link belongs to uid {NOBODY}"):
        sockets.bind(listen, unit="web")
    assert os.readlink(shared / "link") == str(vault / "s.sock")
    assert not (shared / "s.sock").exists(), "the failed bind removed its node"


SWAPPER = """
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE = 2
shared, vault = sys.argv[1], sys.argv[2]
os.mkdir(f"{shared}/p", 0o777)                 # a real directory, nobody's
os.symlink(vault, f"{shared}/q")                # a link into root's directory
p, q = f"{shared}/p".encode(), f"{shared}/q".encode()
x = f"{shared}/x.sock"
print("ready", flush=True)
deadline = time.monotonic() + 60
swaps = 0
while time.monotonic() < deadline:
    # p flips between the directory and the link, atomically.
    libc.renameat2(-100, p, -100, q, RENAME_EXCHANGE)
    swaps += 1
    try:
        os.symlink(f"{vault}/s.sock", x)        # and a link at the last name
        os.unlink(x)
    except OSError:
        pass
"""


def test_bind_versus_symlink_swap_race_has_no_hits(shared: Path, vault: Path) -> None:
    """Binding 3,000 times while nobody swaps the parent for a link never chmods root's file or touches its dir."""
    before = snapshot(vault)
    attacker = subprocess.Popen([*AS_NOBODY, sys.executable, "-c", SWAPPER, str(shared), str(vault)],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert attacker.stdout is not None and attacker.stdout.readline().strip() == "ready"
        entries = [Listen(kind=ListenKind.UNIX, address=f"{shared}/p/s.sock", name="t", mode=0o666),
                   Listen(kind=ListenKind.UNIX, address=f"{shared}/x.sock", name="t", mode=0o666)]
        hits = bound = refused = 0
        started = time.monotonic()
        for i in range(3000):
            try:
                sockets.bind(entries[i % 2], unit="web").close()
                bound += 1
            except BindError:
                refused += 1
            if stat.S_IMODE(os.lstat(vault / "s.sock").st_mode) != 0o600:
                hits += 1
                os.chmod(vault / "s.sock", 0o600)
        elapsed = time.monotonic() - started
    finally:
        attacker.kill()
        attacker.communicate()
    print(f"3000 binds in {elapsed:.2f}s: {bound} bound, {refused} refused, {hits} hits")
    assert hits == 0
    assert snapshot(vault) == before, "no node in the root-only directory changed"
    assert refused >= 1500, "every bind below nobody's directory or link was refused"


def test_control_socket_path_holding_a_regular_file_is_left_alone(sockvisor: Sockvisor) -> None:
    """A regular file at the control socket path is an error (exit 1, one line), and the file stays as it was."""
    sockvisor.control.write_text("precious\n")
    ino = os.lstat(sockvisor.control).st_ino
    res = subprocess.run([sys.executable, "-m", "supervisor", "run", "--config", str(sockvisor.config)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert f"{sockvisor.control} exists and is not a socket; refusing to replace it" in res.stderr
    assert sockvisor.control.read_text() == "precious\n" and os.lstat(sockvisor.control).st_ino == ino


def test_control_socket_under_a_nobody_link_is_refused(sockvisor: Sockvisor, shared: Path, vault: Path) -> None:
    """The control socket walks its parents like a unit socket: nobody's link is not followed into root's dir."""
    nobody(f"import os; os.symlink({str(vault)!r}, {str(shared / 'p')!r})")
    before = snapshot(vault)
    (sockvisor.config / "sockvisor.yaml").write_text(
        f"control:\n  socket: {shared}/p/old.sock\nlog:\n  format: json\n")
    res = subprocess.run([sys.executable, "-m", "supervisor", "run", "--config", str(sockvisor.config)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 1
    assert f"{shared}/p is a symlink owned by uid {NOBODY}" in res.stderr
    assert snapshot(vault) == before


def test_activate_refuses_a_parent_nobody_owns(shared: Path) -> None:
    """sockvisor activate walks its unix paths by the same rule: nobody's directory is refused with its path."""
    nobody(f"import os; os.mkdir({str(shared / 'mine')!r}, 0o755)")
    res = subprocess.run([sys.executable, "-m", "supervisor.activate", "--now", "-l", f"{shared}/mine/a.sock", "true"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        f"sockvisor activate: cannot listen on {shared}/mine/a.sock: directory {shared}/mine is owned by"
        f" uid {NOBODY} (nobody), not root or the daemon's user; refusing to use it"
    ]


REFUSED_LOOP = """
import sys
from supervisor import control
from supervisor.errors import ControlError
counts = {}
for _ in range(int(sys.argv[2])):
    try:
        key = control.request(sys.argv[1], {"cmd": "status"}).get("error")
    except ControlError as exc:
        key = "ControlError: " + str(exc)
    counts[key] = counts.get(key, 0) + 1
print(counts)
"""

REFUSAL = "permission denied: only root or the daemon's user"


def test_cli_as_nobody_always_reports_the_refusal_reason(sockvisor: Sockvisor) -> None:
    """A refused non-root client reads the daemon's reason every time (2,000 requests, 5 CLI runs), no EPIPE."""
    sockvisor.write_main('')
    (sockvisor.config / "sockvisor.yaml").write_text(
        f'control:\n  socket: {sockvisor.control}\n  mode: "0666"\nlog:\n  format: json\n  level: info\n')
    sockvisor.start()
    loop = subprocess.run([*AS_NOBODY, sys.executable, "-c", REFUSED_LOOP, str(sockvisor.control), "2000"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, check=True)
    assert loop.stdout.strip() == repr({REFUSAL: 2000})
    for _ in range(5):
        res = subprocess.run([*AS_NOBODY, sys.executable, "-m", "supervisor", "status", "--control",
                              str(sockvisor.control)], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert res.returncode == 1
        assert res.stderr.strip().splitlines()[-1].endswith(REFUSAL), res.stderr
        assert "Broken pipe" not in res.stderr
    assert control.request(str(sockvisor.control), {"cmd": "status"})["ok"] is True
