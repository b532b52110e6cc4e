"""Helpers for reload tests and the reload soak: socket inodes of a process, and a bounded client load."""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from dataclasses import dataclass, field

SYS_PIDFD_GETFD = 438  # x86_64 and aarch64 (asm-generic) alike


def listen_inode(port: int) -> int | None:
    """The inode of the TCP socket listening on ``port`` (any address), from /proc/net/tcp{,6}."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                local, state, inode = cols[1], cols[3], int(cols[9])
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return inode
    return None


def socket_inodes(pid: int) -> dict[int, int]:
    """fd -> socket inode for every socket ``pid`` holds."""
    out: dict[int, int] = {}
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            target = os.readlink(f"{base}/{name}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            out[int(name)] = int(target[8:-1])
    return out


def daemon_listener(pid: int, port: int) -> tuple[int, int]:
    """(fd, inode) of the daemon's listening socket on ``port``; fails if the daemon holds none."""
    inode = listen_inode(port)
    assert inode is not None, f"nothing listens on {port}"
    fds = [fd for fd, ino in socket_inodes(pid).items() if ino == inode]
    assert fds, f"the daemon {pid} does not hold the socket listening on {port}"
    return fds[0], inode


def steal_fd(pid: int, fd: int) -> socket.socket:
    """A duplicate of another process's socket fd (pidfd_getfd; needs ptrace rights, e.g. root or same uid)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        dup = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if dup < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(pidfd)
    return socket.socket(fileno=dup)


@dataclass
class Load:
    """Sequential connections to one port on a thread, until ``stop``: counts ok and failed exchanges."""

    port: int
    expect: bytes
    ok: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _progress: threading.Condition = field(default_factory=threading.Condition)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                    s.shutdown(socket.SHUT_WR)
                    data = b""
                    while chunk := s.recv(4096):
                        data += chunk
                if data == self.expect:
                    with self._progress:
                        self.ok += 1
                        self._progress.notify_all()
                else:
                    self.failed += 1
                    self.failures.append(f"reply {data!r}")
            except OSError as exc:
                self.failed += 1
                self.failures.append(repr(exc))

    def wait_ok(self, n: int, timeout: float = 10.0) -> None:
        """Block until ``n`` more exchanges succeeded than now (so reloads overlap real traffic)."""
        with self._progress:
            target = self.ok + n
            done = self._progress.wait_for(lambda: self.ok >= target, timeout)
        assert done, f"load made no progress: {self.failures[-3:]}"

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
