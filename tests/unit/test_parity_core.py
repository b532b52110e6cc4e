"""The pure parts of the parity keys: environment file syntax, access_times windows, the builtin replies."""

from __future__ import annotations

import struct

import pytest

from supervisor import envfile
from supervisor.builtins import chargen_line, time_reply
from supervisor.policy import in_windows


@pytest.mark.parametrize(("text", "want"), [
    ("A=1\nB=2\n", [("A", "1"), ("B", "2")]),
    ("  A = spaced value  \n", [("A", "spaced value")]),
    ("# c\n; c\n\nA=1", [("A", "1")]),
    ('A="x \\"y\\" \\\\ \\$z"\n', [("A", 'x "y" \\ $z')]),
    ("A='lit $x \\n'\n", [("A", "lit $x \\n")]),
    ('A="multi\nline"\n', [("A", "multi\nline")]),
    ("A=con\\\ntinued\nB=2\n", [("A", "continued"), ("B", "2")]),
    ("A=esc\\ aped\n", [("A", "esc aped")]),
    ("A=\n", [("A", "")]),
    ("A=1\nA=2\n", [("A", "1"), ("A", "2")]),
])
def test_envfile_parses_systemd_syntax(text: str, want: list[tuple[str, str]]) -> None:
    """EnvironmentFile= syntax: comments, trimming, double and single quotes, escapes, continuations."""
    assert envfile.parse(text) == want


@pytest.mark.parametrize(("text", "line", "message"), [
    ("A=1\njunk\n", 2, "expected NAME=value, got 'junk'"),
    ("1A=x\n", 1, "invalid variable name '1A'"),
    ('A="open\n', 1, "A: unterminated double quote"),
    ("A='open\n", 1, "A: unterminated single quote"),
    ('A="x" y\n', 1, "A: unexpected text after the closing quote: 'y'"),
])
def test_envfile_errors_name_the_line(text: str, line: int, message: str) -> None:
    """A malformed line is an error with its line number (the configuration is refused, nothing half-applied)."""
    with pytest.raises(envfile.EnvFileError) as raised:
        envfile.parse(text)
    assert raised.value.line == line and str(raised.value) == message


def test_access_windows_include_start_exclude_end_and_wrap_midnight() -> None:
    """08:00-12:30 holds 08:00 but not 12:30; 22:00-02:00 wraps midnight."""
    day = [(8 * 60, 12 * 60 + 30)]
    assert in_windows(day, 8 * 60) and not in_windows(day, 12 * 60 + 30) and not in_windows(day, 7 * 60 + 59)
    night = [(22 * 60, 2 * 60)]
    assert in_windows(night, 23 * 60) and in_windows(night, 60) and not in_windows(night, 12 * 60)


def test_builtin_replies() -> None:
    """RFC 868 counts from 1900; RFC 864 lines are 72 printable characters shifted by one each line."""
    assert struct.unpack("!I", time_reply(0.0))[0] == 2208988800
    assert chargen_line(0) == bytes(range(32, 104)) + b"\r\n"
    assert chargen_line(1)[:71] == chargen_line(0)[1:72]
    assert chargen_line(95) == chargen_line(0)


@pytest.mark.parametrize(("text", "messages"), [
    ("mode: accept\nlisten: [{tcp: 127.0.0.1:7}]\nbuiltin: echo\nexec: [/bin/cat]\n",
     ["sockets.d/u.yaml:4:1: exec: a unit has either exec or builtin, not both"]),
    ("listen: [{tcp: 127.0.0.1:7}]\nbuiltin: echo\n",
     ["sockets.d/u.yaml:1:10: listen[0].tcp: a builtin in mode: service answers datagrams (udp, unix-dgram); "
      "for tcp use mode: accept"]),
    ("mode: accept\nlisten: [{tcp: 127.0.0.1:7}]\nbuiltin: qotd\n",
     ["sockets.d/u.yaml:3:10: builtin: expected echo, discard, daytime, chargen or time, got string 'qotd'"]),
    ("mode: accept\nlisten: [{tcp: 127.0.0.1:7}]\nbuiltin: echo\naccess_times: ['25:00-26:00', '08:00']\n",
     ["sockets.d/u.yaml:4:16: access_times[0]: '25:00-26:00': hours are 0-23 and minutes 0-59",
      "sockets.d/u.yaml:4:31: access_times[1]: expected a window like \"08:00-12:30\", got '08:00'"]),
    ("listen: [{udp: 127.0.0.1:7}]\nbuiltin: echo\nbanner: /etc/motd\n",
     ["sockets.d/u.yaml:3:1: banner: only applies to mode: accept or proxy (this unit is mode: service)"]),
    ("mode: accept\nlisten: [{tcp: 127.0.0.1:7}]\nbuiltin: echo\nenvironment_files: [relative.env]\n",
     ["sockets.d/u.yaml:4:21: environment_files[0]: expected an absolute path (optionally after -), "
      "got 'relative.env'"]),
])
def test_parity_config_errors_are_located(tmp_path: object, text: str, messages: list[str]) -> None:
    """Each misuse of a parity key is one located line naming the key."""
    from pathlib import Path

    from supervisor.config import load_config
    from supervisor.errors import ConfigError

    root = Path(str(tmp_path))
    (root / "sockets.d").mkdir()
    (root / "sockets.d" / "u.yaml").write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(str(root))
    assert sorted(str(p) for p in raised.value.problems) == sorted(messages)


@pytest.mark.parametrize(("text", "messages"), [
    ("listen: [{netlink: kobject-uevnt 1}]\nexec: [/bin/true]\n",
     ["sockets.d/u.yaml:1:20: listen[0].netlink: unknown netlink family 'kobject-uevnt'; did you mean "
      "'kobject-uevent'?"]),
    ("listen: [{mqueue: queue}]\nexec: [/bin/true]\n",
     ["sockets.d/u.yaml:1:19: listen[0].mqueue: a message queue name is / and one component, like /myqueue; "
      "got 'queue'"]),
    ("listen: [{vsock: 'x:5'}]\nexec: [/bin/true]\n",
     ["sockets.d/u.yaml:1:18: listen[0].vsock: invalid vsock CID 'x'"]),
    ("mode: accept\nlisten: [{special: /dev/null}]\nexec: [/bin/true]\n",
     ["sockets.d/u.yaml:2:20: listen[0].special: a special listener has no connections to accept; "
      "use mode: service"]),
    ("listen: [{tcp: 127.0.0.1:80, writable: true, protocol: udplite}]\nexec: [/bin/true]\n",
     ["sockets.d/u.yaml:1:30: listen[0].writable: only applies to special listeners, not tcp",
      "sockets.d/u.yaml:1:56: listen[0].protocol: udplite is for udp listeners, not tcp"]),
])
def test_new_listen_kinds_config_errors(tmp_path: object, text: str, messages: list[str]) -> None:
    """The new listen kinds and options are checked with located errors like the others."""
    from pathlib import Path

    from supervisor.config import load_config
    from supervisor.errors import ConfigError

    root = Path(str(tmp_path))
    (root / "sockets.d").mkdir()
    (root / "sockets.d" / "u.yaml").write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(str(root))
    assert sorted(str(p) for p in raised.value.problems) == sorted(messages)


def test_new_listen_kinds_parse() -> None:
    """netlink, special, mqueue and vsock entries load, with normalized addresses."""
    import tempfile
    from pathlib import Path

    from supervisor.config import load_config
    from supervisor.model import ListenKind

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "sockets.d").mkdir()
        (Path(d) / "sockets.d" / "u.yaml").write_text(
            "listen:\n  - netlink: kobject-uevent 1\n  - special: /proc/kmsg\n  - mqueue: /q\n"
            "    mqueue_max_messages: 4\n  - vsock: ':1024'\nexec: [/bin/true]\n")
        unit = load_config(d).units[0]
    assert [(e.kind, e.address) for e in unit.listen] == [
        (ListenKind.NETLINK, "kobject-uevent 1"), (ListenKind.SPECIAL, "/proc/kmsg"), (ListenKind.MQUEUE, "/q"),
        (ListenKind.VSOCK, "4294967295:1024")]
