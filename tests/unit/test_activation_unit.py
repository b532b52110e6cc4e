"""Pure parts of the activation library and of `sockvisor activate`: number and name parsing,
address parsing, option parsing and the child's environment. No sockets, no processes."""

from __future__ import annotations

import socket

import pytest

from supervisor import activate, activation


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("7", 7),
        (" 7", 7),
        ("+7", 7),
        ("-7", -7),
        ("0x1f", 31),
        ("010", 8),
        ("0", 0),
        ("7 ", None),
        ("", None),
        ("0x", None),
        ("08", None),
        ("1e3", None),
        ("٣", None),
    ],
)
def test_c_integer_parsing_is_strtol_base_0(text: str, value: int | None) -> None:
    """Numbers in LISTEN_*/WATCHDOG_* parse as libsystemd's strtol(..., 0) with no trailing text."""
    assert activation._parse_c_integer(text) == value


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("", [""]),
        ("a", ["a"]),
        ("a:b", ["a", "b"]),
        ("a::b", ["a", "", "b"]),
        (":", ["", ""]),
        ("a\\:b", ["a:b"]),
        ("a\\\\b", ["a\\b"]),
        ("'a:b'", ["'a", "b'"]),
    ],
)
def test_fdnames_split_like_libsystemd(text: str, names: list[str]) -> None:
    """LISTEN_FDNAMES splits on every ':' (no coalescing) and a backslash escapes one character."""
    assert activation._split_names(text) == names


def test_fdnames_trailing_backslash_is_an_error() -> None:
    """A lone trailing backslash in LISTEN_FDNAMES is malformed, as in libsystemd."""
    with pytest.raises(ValueError):
        activation._split_names("a\\")


@pytest.mark.parametrize(
    ("text", "family", "sockaddr"),
    [
        ("127.0.0.1:8080", socket.AF_INET, ("127.0.0.1", 8080)),
        ("[::1]:8080", socket.AF_INET6, ("::1", 8080, 0, 0)),
        ("[fe80::1%1]:80", socket.AF_INET6, ("fe80::1", 80, 0, 1)),
        ("/run/x.sock", socket.AF_UNIX, "/run/x.sock"),
        ("@abstract", socket.AF_UNIX, b"\0abstract"),
    ],
)
def test_parse_address_accepts_systemd_forms(text: str, family: int, sockaddr: object) -> None:
    """-l takes IPv4:PORT, [IPv6]:PORT, /path and @abstract as systemd-socket-activate does."""
    parsed = activate.parse_address(text)
    assert (parsed.family, parsed.sockaddr) == (family, sockaddr)


def test_bare_port_is_dual_stack_any() -> None:
    """A bare port listens on all addresses ([::] when IPv6 works, else 0.0.0.0)."""
    parsed = activate.parse_address("8080")
    assert parsed.sockaddr in (("::", 8080, 0, 0), ("0.0.0.0", 8080))


@pytest.mark.parametrize(
    "text", ["0", "70000", "localhost:80", "::1:80", "x.sock", "127.0.0.1", "[::1]:0", "[nope]:80", "@", "1.2.3:4"]
)
def test_parse_address_rejects_what_systemd_rejects(text: str) -> None:
    """Malformed -l addresses are usage errors, as systemd-socket-activate refuses them."""
    with pytest.raises(activate.UsageError):
        activate.parse_address(text)


def test_options_stop_at_the_command() -> None:
    """Options after the command belong to the command, with or without `--`."""
    for argv in (["-l", "80", "cmd", "-l", "x"], ["-l", "80", "--", "cmd", "-l", "x"]):
        assert activate.parse_args(argv).command == ("cmd", "-l", "x")


def test_fdname_splitting_follows_systemd_socket_activate() -> None:
    """--fdname splits on ':', drops empty pieces, and an empty option is one empty name."""
    assert activate.parse_args(["--fdname", "a::b", "--fdname", "", "-l", "80", "c"]).fdnames == ("a", "b", "")


def test_child_environment_is_built_fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """The child gets TERM/PATH/USER/HOME, LISTEN_*, one name repeated for all fds, then -E."""
    for name, value in {"PATH": "/bin", "HOME": "/h", "TERM": "t", "USER": "u", "SECRET": "s", "KEEP": "k"}.items():
        monkeypatch.setenv(name, value)
    options = activate.parse_args(["-l", "80", "--fdname", "web", "-E", "KEEP", "-E", "X=1", "-E", "GONE", "c"])
    env = activate.child_environment(options, 2, 42)
    assert env == {
        "PATH": "/bin",
        "HOME": "/h",
        "TERM": "t",
        "USER": "u",
        "LISTEN_FDS": "2",
        "LISTEN_PID": "42",
        "LISTEN_FDNAMES": "web:web",
        "KEEP": "k",
        "X": "1",
        "GONE": "",
    }


def test_inetd_environment_has_no_listen_variables() -> None:
    """With --inetd the socket is stdin/stdout and no LISTEN_* variables are set."""
    options = activate.parse_args(["--inetd", "-l", "80", "c"])
    assert not any(k.startswith("LISTEN_") for k in activate.child_environment(options, 1, 42))
