"""Broken configurations: each is reported as exact, located one-line messages.

Every case writes files into a fresh config directory and asserts the full
list of messages ``sockvisor check`` would print (``str(problem)``), so the
file, line, column, key path and wording are all pinned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisor.config import load_config
from supervisor.errors import ConfigError

OK_LISTEN = "listen: [{tcp: 127.0.0.1:8080}]\n"
OK_EXEC = "exec: [/bin/true]\n"


@dataclass(frozen=True)
class Case:
    """One broken configuration and every message it must produce."""

    id: str
    files: dict[str, str]
    messages: list[str]


def unit(text: str, file: str = "sockets.d/web.yaml") -> dict[str, str]:
    return {file: text}


CASES = [
    Case(
        "wrong-type-backlog",
        unit("listen:\n  - tcp: 127.0.0.1:8080\n    backlog: lots\n" + OK_EXEC),
        ["sockets.d/web.yaml:3:14: listen[0].backlog: expected an integer, got string 'lots'"],
    ),
    Case(
        "backlog-not-positive",
        unit("listen:\n  - tcp: 127.0.0.1:8080\n    backlog: 0\n" + OK_EXEC),
        ["sockets.d/web.yaml:3:14: listen[0].backlog: 0 is out of range (1-2147483647)"],
    ),
    Case(
        "unknown-unit-key-did-you-mean",
        unit(OK_LISTEN + OK_EXEC + "restrat: always\n"),
        ["sockets.d/web.yaml:3:1: restrat: unknown key; did you mean 'restart'?"],
    ),
    Case(
        "unknown-unit-key-no-hint",
        unit(OK_LISTEN + OK_EXEC + "colour: red\n"),
        ["sockets.d/web.yaml:3:1: colour: unknown key"],
    ),
    Case(
        "unknown-listen-key-did-you-mean",
        unit("listen:\n  - tcp: 127.0.0.1:8080\n    nodelya: true\n" + OK_EXEC),
        ["sockets.d/web.yaml:3:5: listen[0].nodelya: unknown key; did you mean 'nodelay'?"],
    ),
    Case(
        "listen-option-at-unit-level",
        unit(OK_LISTEN + OK_EXEC + "backlog: 10\n"),
        ["sockets.d/web.yaml:3:1: backlog: is a listen option; put it under a listen entry"],
    ),
    Case(
        "unit-key-inside-listen",
        unit("listen:\n  - tcp: 127.0.0.1:8080\n    exec: /bin/x\n" + OK_EXEC),
        ["sockets.d/web.yaml:3:5: listen[0].exec: is a unit key, not a listen option"],
    ),
    Case(
        "port-out-of-range",
        unit("name: web\nlisten:\n  - tcp: 127.0.0.1:8080\n  - tcp: 127.0.0.1:70000\n" + OK_EXEC),
        ["sockets.d/web.yaml:4:10: listen[1].tcp: port 70000 is out of range (1-65535)"],
    ),
    Case(
        "bare-port-out-of-range",
        unit("listen:\n  - udp: 0\n" + OK_EXEC),
        ["sockets.d/web.yaml:2:10: listen[0].udp: port 0 is out of range (1-65535)"],
    ),
    Case(
        "host-name-not-resolved",
        unit("listen:\n  - tcp: localhost:80\n" + OK_EXEC),
        ["sockets.d/web.yaml:2:10: listen[0].tcp: 'localhost' is not an IP address (host names are not resolved)"],
    ),
    Case(
        "ipv6-without-brackets",
        unit('listen:\n  - tcp: "::1:80"\n' + OK_EXEC),
        ["sockets.d/web.yaml:2:10: listen[0].tcp: IPv6 addresses need brackets: [::1]:80"],
    ),
    Case(
        "relative-unix-path",
        unit("listen:\n  - unix: run/web.sock\n" + OK_EXEC),
        [
            "sockets.d/web.yaml:2:11: listen[0].unix: unix socket path must be absolute or start with '@' "
            "(abstract): 'run/web.sock'"
        ],
    ),
    Case(
        "unix-path-too-long",
        unit("listen:\n  - unix: /" + "s" * 120 + "\n" + OK_EXEC),
        [
            "sockets.d/web.yaml:2:11: listen[0].unix: unix socket path is 121 bytes long; the limit is 107 "
            "(sun_path is 108 bytes)"
        ],
    ),
    Case(
        "fifo-relative",
        unit("listen:\n  - fifo: x.fifo\n" + OK_EXEC),
        ["sockets.d/web.yaml:2:11: listen[0].fifo: fifo path must be absolute: 'x.fifo'"],
    ),
    Case(
        "unquoted-octal-mode",
        unit("listen:\n  - unix: /run/web.sock\n    mode: 0660\n" + OK_EXEC),
        ['sockets.d/web.yaml:3:11: listen[0].mode: a file mode must be a quoted octal string; quote it: mode: "0660"'],
    ),
    Case(
        "unquoted-decimal-mode",
        unit("listen:\n  - unix: /run/web.sock\n    mode: 660\n" + OK_EXEC),
        ['sockets.d/web.yaml:3:11: listen[0].mode: a file mode must be a quoted octal string; quote it: mode: "0660"'],
    ),
    Case(
        "unquoted-umask",
        unit(OK_LISTEN + OK_EXEC + "umask: 027\n"),
        ['sockets.d/web.yaml:3:8: umask: a file mode must be a quoted octal string; quote it: umask: "027"'],
    ),
    Case(
        "unquoted-control-mode",
        {"sockvisor.yaml": "control:\n  mode: 600\n"},
        ['sockvisor.yaml:2:9: control.mode: a file mode must be a quoted octal string; quote it: mode: "0600"'],
    ),
    Case(
        "mode-option-on-tcp",
        unit('listen:\n  - tcp: 127.0.0.1:80\n    mode: "0600"\n' + OK_EXEC),
        [
            "sockets.d/web.yaml:3:5: listen[0].mode: only applies to unix, unix-dgram, unix-seqpacket, fifo and "
            "mqueue listeners, not tcp"
        ],
    ),
    Case(
        "nodelay-on-udp",
        unit("listen:\n  - udp: 127.0.0.1:53\n    nodelay: true\n" + OK_EXEC),
        ["sockets.d/web.yaml:3:5: listen[0].nodelay: only applies to tcp listeners, not udp"],
    ),
    Case(
        "backlog-on-udp",
        unit("listen:\n  - udp: 127.0.0.1:53\n    backlog: 5\n" + OK_EXEC),
        ["sockets.d/web.yaml:3:5: listen[0].backlog: only applies to tcp, unix, unix-seqpacket and vsock "
         "listeners, not udp"],
    ),
    Case(
        # Every option's kind set must have a name: a set without one was a KeyError traceback.
        "buffer-option-on-special",
        unit("listen:\n  - special: /dev/null\n    receive_buffer: 4096\n" + OK_EXEC),
        ["sockets.d/web.yaml:3:5: listen[0].receive_buffer: only applies to tcp, udp, unix, unix-dgram, "
         "unix-seqpacket, netlink and vsock listeners, not special"],
    ),
    Case(
        "writable-on-mqueue",
        unit("listen:\n  - mqueue: /q\n    writable: true\n" + OK_EXEC),
        ["sockets.d/web.yaml:3:5: listen[0].writable: only applies to special listeners, not mqueue"],
    ),
    Case(
        "ipv6-only-on-ipv4",
        unit("listen:\n  - tcp: 127.0.0.1:80\n    ipv6_only: true\n" + OK_EXEC),
        ["sockets.d/web.yaml:3:5: listen[0].ipv6_only: only applies to IPv6 addresses"],
    ),
    Case(
        "mode-on-abstract-socket",
        unit('listen:\n  - unix: "@web"\n    mode: "0600"\n' + OK_EXEC),
        ["sockets.d/web.yaml:3:5: listen[0].mode: has no effect on an abstract socket (@name)"],
    ),
    Case(
        "two-kinds-in-one-entry",
        unit("listen:\n  - tcp: 127.0.0.1:80\n    udp: 127.0.0.1:80\n" + OK_EXEC),
        ["sockets.d/web.yaml:3:5: listen[0].udp: one kind per listen entry; this one already has 'tcp'"],
    ),
    Case(
        "no-kind-in-entry",
        unit("listen:\n  - backlog: 5\n" + OK_EXEC),
        ["sockets.d/web.yaml:2:5: listen[0]: needs one of tcp, udp, unix, unix-dgram, unix-seqpacket, fifo, "
         "netlink, special, mqueue, vsock"],
    ),
    Case(
        "listen-not-a-list",
        unit("listen: {tcp: 80}\n" + OK_EXEC),
        ["sockets.d/web.yaml:1:9: listen: expected a list of listen entries, got a mapping"],
    ),
    Case(
        "listen-missing",
        unit(OK_EXEC),
        ["sockets.d/web.yaml:1:1: listen: missing: a unit needs at least one listen entry"],
    ),
    Case(
        "exec-missing",
        unit(OK_LISTEN),
        ["sockets.d/web.yaml:1:1: exec: missing: a unit needs a command to run"],
    ),
    Case(
        "exec-empty",
        unit(OK_LISTEN + "exec: []\n"),
        ["sockets.d/web.yaml:2:7: exec: must not be empty"],
    ),
    Case(
        "exec-unbalanced-quote",
        unit(OK_LISTEN + 'exec: "/bin/x \'y"\n'),
        ["sockets.d/web.yaml:2:7: exec: cannot split the command: No closing quotation"],
    ),
    Case(
        "exec-item-not-a-string",
        unit(OK_LISTEN + "exec: [/bin/x, {a: 1}]\n"),
        ["sockets.d/web.yaml:2:16: exec[1]: expected a string, got a mapping"],
    ),
    Case(
        "datagram-udp-in-accept",
        unit("mode: accept\nlisten:\n  - udp: 127.0.0.1:53\n" + OK_EXEC),
        ["sockets.d/web.yaml:3:10: listen[0].udp: a udp listener has no connections to accept; use mode: service"],
    ),
    Case(
        "datagram-unix-dgram-in-accept",
        unit("mode: accept\nlisten:\n  - unix-dgram: /run/log.sock\n" + OK_EXEC),
        [
            "sockets.d/web.yaml:3:17: listen[0].unix-dgram: a unix-dgram listener has no connections to accept; "
            "use mode: service"
        ],
    ),
    Case(
        "datagram-fifo-in-accept",
        unit("mode: accept\nlisten:\n  - fifo: /run/x.fifo\n" + OK_EXEC),
        ["sockets.d/web.yaml:3:11: listen[0].fifo: a fifo listener has no connections to accept; use mode: service"],
    ),
    Case(
        "duplicate-names-across-files",
        {
            "sockets.d/a.yaml": "name: web\n" + OK_LISTEN + OK_EXEC,
            "sockets.d/b.yaml": "name: web\nlisten: [{tcp: 127.0.0.1:9090}]\n" + OK_EXEC,
        },
        ["sockets.d/b.yaml:1:7: name: duplicate unit name 'web'; first defined at sockets.d/a.yaml:1:7"],
    ),
    Case(
        "duplicate-name-from-stem",
        {
            "sockets.d/a.yaml": "name: b\n" + OK_LISTEN + OK_EXEC,
            "sockets.d/b.yaml": "listen: [{tcp: 127.0.0.1:9090}]\n" + OK_EXEC,
        },
        ["sockets.d/b.yaml:1:1: name: duplicate unit name 'b'; first defined at sockets.d/a.yaml:1:7"],
    ),
    Case(
        "duplicate-address-across-units",
        {
            "sockets.d/a.yaml": OK_LISTEN + OK_EXEC,
            "sockets.d/b.yaml": OK_EXEC + OK_LISTEN,
        },
        ["sockets.d/b.yaml:2:10: listen[0].tcp: 127.0.0.1:8080 is already used by unit 'a' at sockets.d/a.yaml:1:10"],
    ),
    Case(
        "yaml-syntax-error",
        unit("listen: [{tcp: 80}\n" + OK_EXEC),
        ["sockets.d/web.yaml:2:1: invalid YAML: did not find expected ',' or ']' (while parsing a flow sequence)"],
    ),
    Case(
        "yaml-bad-indentation",
        unit("listen:\n  - tcp: 80\n   backlog: 5\n" + OK_EXEC),
        [
            "sockets.d/web.yaml:3:4: invalid YAML: did not find expected '-' indicator (while parsing a block "
            "collection)"
        ],
    ),
    Case(
        "empty-file",
        unit(""),
        ["sockets.d/web.yaml:1:1: file is empty: expected a unit mapping"],
    ),
    Case(
        "comments-only-file",
        unit("# nothing yet\n"),
        ["sockets.d/web.yaml:1:1: file is empty: expected a unit mapping"],
    ),
    Case(
        "document-not-a-mapping",
        unit("- tcp: 80\n"),
        ["sockets.d/web.yaml:1:1: expected a unit mapping, got a list"],
    ),
    Case(
        "multi-doc-without-names",
        unit("name: a\nlisten: [{tcp: 1}]\n" + OK_EXEC + "---\nlisten: [{tcp: 2}]\n" + OK_EXEC),
        ["sockets.d/web.yaml:5:1: name: missing: a file with several units needs a name in each"],
    ),
    Case(
        "invalid-unit-name",
        unit('name: "web server"\n' + OK_LISTEN + OK_EXEC),
        ["sockets.d/web.yaml:1:7: name: invalid unit name 'web server': use 1-64 of A-Z a-z 0-9 _ . @ -"],
    ),
    Case(
        "invalid-name-from-file-stem",
        unit(OK_LISTEN + OK_EXEC, file="sockets.d/my web.yaml"),
        [
            "sockets.d/my web.yaml:1:1: name: the file name gives the invalid unit name 'my web': add a name "
            "(1-64 of A-Z a-z 0-9 _ . @ -)"
        ],
    ),
    Case(
        "duplicate-key",
        unit(OK_LISTEN + OK_EXEC + "mode: service\nmode: accept\n"),
        ["sockets.d/web.yaml:4:1: mode: duplicate key (first given at line 3)"],
    ),
    Case(
        "bad-duration",
        unit(OK_LISTEN + OK_EXEC + "restart_delay: soon\n"),
        [
            "sockets.d/web.yaml:3:16: restart_delay: invalid duration 'soon': expected seconds or a number with a "
            "unit (250ms, 10s, 2m, 1h)"
        ],
    ),
    Case(
        "negative-duration",
        unit(OK_LISTEN + OK_EXEC + "stop_timeout: -1\n"),
        ["sockets.d/web.yaml:3:15: stop_timeout: duration must not be negative, got -1"],
    ),
    Case(
        "restart-delay-max-below-delay",
        unit(OK_LISTEN + OK_EXEC + "restart_delay: 5s\nrestart_delay_max: 1s\n"),
        ["sockets.d/web.yaml:4:20: restart_delay_max: must be at least restart_delay (5s)"],
    ),
    Case(
        "stderr-connection-outside-accept",
        unit(OK_LISTEN + OK_EXEC + "stderr: connection\n"),
        ["sockets.d/web.yaml:3:9: stderr: connection only applies to mode: accept (this unit is mode: service)"],
    ),
    Case(
        "bad-enum-with-hint",
        unit(OK_LISTEN + OK_EXEC + "mode: acept\n"),
        ["sockets.d/web.yaml:3:7: mode: expected service, accept, pool or proxy, got string 'acept'; "
         "did you mean 'accept'?"],
    ),
    Case(
        "string-is-not-a-bool",
        unit(OK_LISTEN + OK_EXEC + 'enabled: "yes"\n'),
        ["sockets.d/web.yaml:3:10: enabled: expected true or false, got string 'yes'"],
    ),
    Case(
        "accept-key-in-service-mode",
        unit(OK_LISTEN + OK_EXEC + "max_connections: 5\n"),
        ["sockets.d/web.yaml:3:1: max_connections: only applies to mode: accept or proxy (this unit is mode: service)"],
    ),
    Case(
        "pool-key-in-accept-mode",
        unit(OK_LISTEN + OK_EXEC + "mode: accept\nworkers: 4\n"),
        ["sockets.d/web.yaml:4:1: workers: only applies to mode: pool (this unit is mode: accept)"],
    ),
    Case(
        "pass-stdio-with-two-listeners",
        unit("listen: [{tcp: 1}, {tcp: 2}]\n" + OK_EXEC + "pass: stdio\n"),
        ["sockets.d/web.yaml:3:7: pass: stdio needs exactly one listen entry in mode: service (this unit has 2)"],
    ),
    Case(
        "pool-needs-pass-fds",
        unit(OK_LISTEN + OK_EXEC + "mode: pool\npass: stdio\n"),
        ["sockets.d/web.yaml:4:7: pass: must be fds in mode: pool (each worker gets every listening fd)"],
    ),
    Case(
        "workers-zero",
        unit(OK_LISTEN + OK_EXEC + "mode: pool\nworkers: 0\n"),
        ["sockets.d/web.yaml:4:10: workers: 0 is out of range (1-4096)"],
    ),
    Case(
        "nice-out-of-range",
        unit(OK_LISTEN + OK_EXEC + "nice: 30\n"),
        ["sockets.d/web.yaml:3:7: nice: 30 is out of range (-20 to 19)"],
    ),
    Case(
        "bad-signal",
        unit(OK_LISTEN + OK_EXEC + "stop_signal: SIGFOO\n"),
        ["sockets.d/web.yaml:3:14: stop_signal: unknown signal 'SIGFOO'"],
    ),
    Case(
        "environment-boolean",
        unit(OK_LISTEN + OK_EXEC + "environment:\n  DEBUG: yes\n"),
        ['sockets.d/web.yaml:4:10: environment.DEBUG: a boolean is ambiguous here; quote it: DEBUG: "yes"'],
    ),
    Case(
        "environment-bad-name",
        unit(OK_LISTEN + OK_EXEC + "environment:\n  1X: a\n"),
        [
            "sockets.d/web.yaml:4:3: environment.1X: invalid variable name: use A-Z a-z 0-9 _ , not starting "
            "with a digit"
        ],
    ),
    Case(
        "environment-reserved",
        unit(OK_LISTEN + OK_EXEC + "environment: {LISTEN_FDS: 3}\n"),
        ["sockets.d/web.yaml:3:15: environment.LISTEN_FDS: is set by sockvisor and cannot be overridden"],
    ),
    Case(
        "unknown-limit-with-hint",
        unit(OK_LISTEN + OK_EXEC + "limits:\n  nofle: 1024\n"),
        ["sockets.d/web.yaml:4:3: limits.nofle: unknown key; did you mean 'nofile'?"],
    ),
    Case(
        "limit-soft-above-hard",
        unit(OK_LISTEN + OK_EXEC + "limits:\n  nofile: {soft: 10, hard: 5}\n"),
        ["sockets.d/web.yaml:4:11: limits.nofile: soft limit is above the hard limit"],
    ),
    Case(
        "limit-garbage",
        unit(OK_LISTEN + OK_EXEC + "limits:\n  core: lots\n"),
        ["sockets.d/web.yaml:4:9: limits.core: expected a number, a size like 64K, or infinity, got string 'lots'"],
    ),
    Case(
        "allow-host-name",
        unit(OK_LISTEN + OK_EXEC + "mode: accept\nallow: [10.0.0.0/8, example.com]\n"),
        ["sockets.d/web.yaml:4:21: allow[1]: 'example.com' is not an address, a CIDR or uid:N"],
    ),
    Case(
        "start-limit-missing-interval",
        unit(OK_LISTEN + OK_EXEC + "start_limit: {burst: 5}\n"),
        ["sockets.d/web.yaml:3:14: start_limit.interval: missing"],
    ),
    Case(
        "fd-name-with-colon",
        unit("listen:\n  - tcp: 127.0.0.1:80\n    name: a:b\n" + OK_EXEC),
        ["sockets.d/web.yaml:3:11: listen[0].name: invalid fd name 'a:b': printable ASCII without ':'"],
    ),
    Case(
        "main-config-unknown-key-and-level",
        {"sockvisor.yaml": "includ: [x]\nlog: {level: verbose}\n"},
        [
            "sockvisor.yaml:1:1: includ: unknown key; did you mean 'include'?",
            "sockvisor.yaml:2:14: log.level: expected debug, info, warning or error, got string 'verbose'",
        ],
    ),
]


def _problems(root: Path, files: dict[str, str]) -> list[str]:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(str(root))
    return [str(problem) for problem in raised.value.problems]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_broken_config_is_reported_exactly(tmp_path: Path, case: Case) -> None:
    """Each broken config yields exactly the listed located messages, and nothing else."""
    assert _problems(tmp_path, case.files) == case.messages


def test_every_problem_is_reported_in_one_pass(tmp_path: Path) -> None:
    """Problems in several keys, entries and files are all reported together, in reading order per file."""
    files = {
        "sockvisor.yaml": "log: {format: yaml}\n",
        "sockets.d/a.yaml": (
            "name: a\n"
            "listen:\n"
            "  - tcp: 127.0.0.1:70000\n"
            "    nodelya: true\n"
            "  - udp: 127.0.0.1:53\n"
            "mode: accept\n"
            "exec: /bin/cat\n"
            "workers: 2\n"
            "restart_delay: soon\n"
        ),
        "sockets.d/b.yaml": "",
        "sockets.d/c.yaml": "name: a\nlisten: [{unix: rel.sock}]\n",
    }
    assert _problems(tmp_path, files) == [
        "sockvisor.yaml:1:15: log.format: expected json or console, got string 'yaml'",
        "sockets.d/a.yaml:3:10: listen[0].tcp: port 70000 is out of range (1-65535)",
        "sockets.d/a.yaml:4:5: listen[0].nodelya: unknown key; did you mean 'nodelay'?",
        "sockets.d/a.yaml:5:10: listen[1].udp: a udp listener has no connections to accept; use mode: service",
        "sockets.d/a.yaml:8:1: workers: only applies to mode: pool (this unit is mode: accept)",
        "sockets.d/a.yaml:9:16: restart_delay: invalid duration 'soon': expected seconds or a number with a unit "
        "(250ms, 10s, 2m, 1h)",
        "sockets.d/b.yaml:1:1: file is empty: expected a unit mapping",
        "sockets.d/c.yaml:1:1: exec: missing: a unit needs a command to run",
        "sockets.d/c.yaml:2:17: listen[0].unix: unix socket path must be absolute or start with '@' (abstract): "
        "'rel.sock'",
        "sockets.d/c.yaml:1:7: name: duplicate unit name 'a'; first defined at sockets.d/a.yaml:1:7",
    ]


def test_invalid_utf8_is_one_problem(tmp_path: Path) -> None:
    """A unit file that is not UTF-8 is reported as such, not as a traceback."""
    (tmp_path / "sockets.d").mkdir()
    (tmp_path / "sockets.d/bin.yaml").write_bytes(b"name: \xff\n")
    with pytest.raises(ConfigError) as raised:
        load_config(str(tmp_path))
    assert [str(p) for p in raised.value.problems] == ["sockets.d/bin.yaml:1:7: not UTF-8 text (byte 0xff at offset 6)"]


def test_recursive_alias_is_a_problem(tmp_path: Path) -> None:
    """A self-referencing alias is a located problem rather than infinite recursion."""
    (tmp_path / "sockets.d").mkdir()
    (tmp_path / "sockets.d/r.yaml").write_text("listen: &a [*a]\nexec: /x\n")
    with pytest.raises(ConfigError) as raised:
        load_config(str(tmp_path))
    messages = [str(p) for p in raised.value.problems]
    assert "sockets.d/r.yaml:1:9: listen[0]: recursive alias" in messages


def test_every_option_kind_set_has_a_name_for_errors() -> None:
    """Each per-listen option, set on a kind it does not apply to, gets a sentence, not a KeyError."""
    from supervisor import schema
    from supervisor.model import ListenKind

    for key, kinds in schema.LISTEN_OPTIONS.items():
        name = schema.kind_group_name(kinds)
        assert name and "frozenset" not in name, key
        for kind in ListenKind:
            assert (kind.value in name.replace(",", " ").split()) == (kind in kinds) or name == "any", (key, kind)
