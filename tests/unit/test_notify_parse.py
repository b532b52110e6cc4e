"""The sd_notify message parser: KEY=VALUE lines in, a dict or None (drop it) out."""

from __future__ import annotations

import pytest

from supervisor.notifyd import parse


@pytest.mark.parametrize(("data", "fields"), [
    (b"READY=1", {"READY": "1"}),
    (b"READY=1\n", {"READY": "1"}),
    (b"READY=1\nSTATUS=serving 3 clients\n", {"READY": "1", "STATUS": "serving 3 clients"}),
    (b"WATCHDOG=1", {"WATCHDOG": "1"}),
    (b"FDSTORE=1\nFDNAME=conn-7", {"FDSTORE": "1", "FDNAME": "conn-7"}),
    (b"STATUS=a=b=c", {"STATUS": "a=b=c"}),  # only the first '=' separates
    (b"STATUS=", {"STATUS": ""}),
    (b"STATUS=caf\xc3\xa9", {"STATUS": "caf\u00e9"}),
    (b"STATUS=old\nSTATUS=new", {"STATUS": "new"}),  # the last value wins
])
def test_good_messages(data: bytes, fields: dict[str, str]) -> None:
    """Well-formed KEY=VALUE lines become a dict of their fields."""
    assert parse(data) == fields


@pytest.mark.parametrize("data", [b"", b"\n", b"\n\n\n"])
def test_empty_message_is_empty_dict(data: bytes) -> None:
    """A message with no lines is valid and carries no fields."""
    assert parse(data) == {}


def test_empty_lines_are_skipped() -> None:
    """Blank lines between fields are ignored rather than rejected."""
    assert parse(b"\nREADY=1\n\n\nSTATUS=ok\n\n") == {"READY": "1", "STATUS": "ok"}


@pytest.mark.parametrize("data", [
    b"READY",
    b"READY=1\nGARBAGE",
    b"GARBAGE\nREADY=1",
    b"=1",
    b"READY=1\n=x",
])
def test_line_without_key_and_equals_is_malformed(data: bytes) -> None:
    """A line without '=' or with an empty key makes the whole message malformed (None), not partly applied."""
    assert parse(data) is None


@pytest.mark.parametrize("data", [b"\xff\xfe", b"STATUS=\xc3", b"READY=1\nSTATUS=\x80"])
def test_bad_utf8_is_malformed(data: bytes) -> None:
    """A message that is not UTF-8 is malformed (None), even when its other lines are fine."""
    assert parse(data) is None
