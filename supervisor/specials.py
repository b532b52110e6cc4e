"""Listeners that are not tcp, udp, unix or fifo: netlink, special files, message queues, vsock.

Each follows systemd's socket unit (systemd.socket(5)):

- ``netlink: "FAMILY [GROUP]"`` (ListenNetlink=): a raw AF_NETLINK socket of that
  protocol, bound with the group as its ``nl_groups``.
- ``special: PATH`` (ListenSpecial=): the path opened read-only (``writable: true``:
  read-write), non-blocking, no controlling tty. Only a character device or a regular
  file under /proc or /sys, as systemd requires. Never removed on stop.
- ``mqueue: /NAME`` (ListenMessageQueue=): ``mq_open(O_RDONLY|O_CREAT|O_NONBLOCK)``
  with the entry's ``mode`` and, when set, ``mqueue_max_messages`` and
  ``mqueue_message_size``; ``remove_on_stop`` unlinks it.
- ``vsock: "CID:PORT"`` (ListenStream=vsock:...): an AF_VSOCK stream socket, listening.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import socket
import stat

from supervisor import addresses, sockopts
from supervisor.model import Listen, ListenKind

AF_VSOCK = getattr(socket, "AF_VSOCK", 40)
KINDS = frozenset({ListenKind.NETLINK, ListenKind.SPECIAL, ListenKind.MQUEUE, ListenKind.VSOCK})


class _MqAttr(ctypes.Structure):
    _fields_ = [("mq_flags", ctypes.c_long), ("mq_maxmsg", ctypes.c_long), ("mq_msgsize", ctypes.c_long),
                ("mq_curmsgs", ctypes.c_long), ("_reserved", ctypes.c_long * 4)]


def _librt() -> ctypes.CDLL:
    name = ctypes.util.find_library("rt") or "librt.so.1"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.mq_open.restype = ctypes.c_int
    lib.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_MqAttr)]
    lib.mq_unlink.argtypes = [ctypes.c_char_p]
    lib.mq_getattr.argtypes = [ctypes.c_int, ctypes.POINTER(_MqAttr)]
    return lib


def mq_attributes(fd: int) -> tuple[int, int]:
    """(max messages, message size) of an open queue."""
    attr = _MqAttr()
    if _librt().mq_getattr(fd, ctypes.byref(attr)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return attr.mq_maxmsg, attr.mq_msgsize


def mq_unlink(name: str) -> None:
    with contextlib.suppress(OSError):
        _librt().mq_unlink(name.encode())


def bind(listen: Listen) -> tuple[int, socket.socket | None]:
    """Open one entry of these kinds: (fd, socket or None). Raises sockopts.Failed."""
    address = listen.address
    assert isinstance(address, str)
    if listen.kind is ListenKind.NETLINK:
        proto, group = addresses.netlink_parts(address)
        with sockopts.step("cannot create the netlink socket",
                           {errno.EPROTONOSUPPORT: "the kernel has no such netlink family"}):
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, proto)
        try:
            sock.setblocking(False)
            sockopts.set_options(sock, listen)
            with sockopts.step("", {errno.EPERM: "joining this group needs CAP_NET_ADMIN"}):
                sock.bind((0, group))
        except BaseException:
            sock.close()
            raise
        return sock.fileno(), sock
    if listen.kind is ListenKind.SPECIAL:
        flags = (os.O_RDWR if listen.writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        with sockopts.step(f"cannot open {address}"):
            fd = os.open(address, flags)
        try:
            st = os.fstat(fd)
            virtual = address.startswith(("/proc/", "/sys/"))
            if not (stat.S_ISCHR(st.st_mode) or (stat.S_ISREG(st.st_mode) and virtual)):
                raise sockopts.Failed(f"{address} is neither a character device nor a file under /proc or /sys")
        except BaseException:
            os.close(fd)
            raise
        return fd, None
    if listen.kind is ListenKind.MQUEUE:
        attr = None
        if listen.mqueue_max_messages is not None or listen.mqueue_message_size is not None:
            attr = _MqAttr(0, listen.mqueue_max_messages or 10, listen.mqueue_message_size or 8192, 0)
        try:
            lib = _librt()
        except OSError as exc:
            raise sockopts.Failed(f"cannot load librt for mq_open: {exc}") from exc
        old = os.umask(0)
        try:
            fd = lib.mq_open(address.encode(), os.O_RDONLY | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC,
                             listen.mode & 0o777, ctypes.byref(attr) if attr is not None else None)
        finally:
            os.umask(old)
        if fd < 0:
            err = ctypes.get_errno()
            hint = {errno.EINVAL: "the sizes exceed /proc/sys/fs/mqueue/msg_max or msgsize_max",
                    errno.ENOSYS: "the kernel has no POSIX message queues"}.get(err, os.strerror(err))
            raise sockopts.Failed(f"cannot open the message queue {address}: {hint}")
        if attr is not None:
            have = mq_attributes(fd)
            if have != (attr.mq_maxmsg, attr.mq_msgsize):
                os.close(fd)
                raise sockopts.Failed(f"the message queue {address} exists with other sizes {have}; remove it "
                                      "or match them")
        return fd, None
    if listen.kind is ListenKind.VSOCK:
        cid, port = (int(x) for x in address.split(":"))
        with sockopts.step("cannot create the vsock socket",
                           {errno.EAFNOSUPPORT: "the kernel has no vsock (module vsock not loaded)"}):
            sock = socket.socket(AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sockopts.set_options(sock, listen)
            with sockopts.step("", {errno.EADDRINUSE: "another socket is bound to it",
                                    errno.EADDRNOTAVAIL: "no such local CID"}):
                sock.bind((cid, port))
            sockopts.listen(sock, listen)
        except BaseException:
            sock.close()
            raise
        return sock.fileno(), sock
    raise sockopts.Failed(f"{listen.kind.value} is not opened here")


def matches(fd: int, listen: Listen) -> bool:
    """Whether an inherited fd is what ``bind`` would have opened for ``listen``."""
    address = listen.address
    if not isinstance(address, str):
        return False
    try:
        st = os.fstat(fd)
        if listen.kind is ListenKind.SPECIAL:
            node = os.stat(address)
            return (node.st_dev, node.st_ino) == (st.st_dev, st.st_ino)
        if listen.kind is ListenKind.MQUEUE:
            node = os.stat("/dev/mqueue" + address)  # where the queue file system is mounted (as systemd checks)
            return (node.st_dev, node.st_ino) == (st.st_dev, st.st_ino)
        if not stat.S_ISSOCK(st.st_mode):
            return False
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    with sock:
        try:
            if listen.kind is ListenKind.NETLINK:
                proto, group = addresses.netlink_parts(address)
                return bool(sock.family == socket.AF_NETLINK
                            and sock.getsockopt(socket.SOL_SOCKET, sockopts.SO_PROTOCOL) == proto
                            and sock.getsockname()[1] == group)
            if listen.kind is ListenKind.VSOCK:
                cid, port = (int(x) for x in address.split(":"))
                name = sock.getsockname()
                return bool(sock.family == AF_VSOCK and name[1] == port
                            and (cid == addresses.VMADDR_CID_ANY or name[0] == cid))
        except OSError:
            return False
    return False
