"""control.parse_request: the request grammar, pure; every malformed line is an error reply, never an exception."""

from __future__ import annotations

import pytest

from supervisor.control import Command, Request, parse_request


@pytest.mark.parametrize(("line", "error"), [
    (b"not json", "malformed request"),
    (b"\xff\xfe", "malformed request"),
    (b"[1, 2]", "malformed request"),
    (b'"status"', "malformed request"),
    (b"[" * 100_000 + b"]" * 100_000, "malformed request"),
    (b'{"cmd": "frobnicate"}', "unknown command 'frobnicate'"),
    (b'{"cmd": ["status"]}', "unknown command"),
    (b'{"cmd": ' + b"9" * 5000 + b"}", "malformed request"),  # past int_max_str_digits
    (b'{"cmd": "status", "unit": 7}', "unit must be a string"),
    (b'{"cmd": "start"}', "start needs a unit name"),
    (b'{"cmd": "stop", "unit": null}', "stop needs a unit name"),
    (b'{}', "unknown command None"),
])
def test_malformed_requests_get_an_error_reply(line: bytes, error: str) -> None:
    reply = parse_request(line)
    assert not isinstance(reply, Request)
    assert reply["ok"] is False and error in reply["error"], reply


@pytest.mark.parametrize(("line", "expected"), [
    (b'{"cmd": "status"}', Request(Command.STATUS)),
    (b'{"cmd": "status", "unit": "web"}', Request(Command.STATUS, "web")),
    (b'{"cmd": "restart", "unit": "web", "extra": 1}\n', Request(Command.RESTART, "web")),
    (b'{"cmd": "reload"}', Request(Command.RELOAD)),
])
def test_valid_requests_parse_to_a_typed_request(line: bytes, expected: Request) -> None:
    assert parse_request(line) == expected
