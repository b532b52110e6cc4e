"""The handover document (``supervisor.handover``): what one image writes, the next reads back.

Only the daemon itself writes it (into a memfd it hands to its own next image), but the reader
must still survive anything: a state from another version, or a corrupt one, is a fresh start
(HandoverError), never a traceback; a malformed entry is dropped, not trusted.
"""

from __future__ import annotations

import json
import random

import pytest

from supervisor import handover
from supervisor.handover import Conn, HandoverError, State, UnitHandover


def sample() -> State:
    unit = UnitHandover(
        name="held", mode="accept", listen={"tcp:127.0.0.1:80": 7}, strays=[41],
        conns=[Conn(42, "127.0.0.1:5000", "127.0.0.1", None, 12.5), Conn(43, "pid=9,uid=1000", None, 1000, 13.0),
               Conn(44, "[::1]:6000", None, None, 14.0)],
    )  # fmt: skip
    return State(units={"held": unit}, children=[41, 42, 43, 44], started_at=1.0)


def test_accept_connections_round_trip() -> None:
    back = handover.from_json(handover.to_json(sample()))
    unit = back.units["held"]
    assert unit.conns == sample().units["held"].conns
    assert unit.strays == [41] and back.children == [41, 42, 43, 44]


def test_a_state_without_conns_reads_as_none() -> None:
    """An older image's state: its accept children come as strays, and there are no connections."""
    doc = json.loads(handover.to_json(sample()))
    del doc["units"][0]["conns"]
    assert handover.from_json(json.dumps(doc).encode()).units["held"].conns == []


@pytest.mark.parametrize("entry", [
    "42", 42, None, {}, [], [42], [42, "r", None, None],  # not a 5-list
    [True, "r", None, None, 1.0], [0, "r", None, None, 1.0], [-3, "r", None, None, 1.0],  # no pid
    [42.0, "r", None, None, 1.0], ["42", "r", None, None, 1.0],
    [42, None, None, None, 1.0], [42, 7, None, None, 1.0],  # no remote text
    [42, "r", 7, None, 1.0], [42, "r", ["127.0.0.1"], None, 1.0],  # a host that is no string
    [42, "r", None, "1000", 1.0], [42, "r", None, True, 1.0], [42, "r", None, 1.5, 1.0],  # a uid that is no int
])  # fmt: skip
def test_a_malformed_connection_is_dropped(entry: object) -> None:
    doc = json.loads(handover.to_json(sample()))
    doc["units"][0]["conns"] = [entry, [45, "127.0.0.1:1", "127.0.0.1", None, 2.0]]
    assert [c.pid for c in handover.from_json(json.dumps(doc).encode()).units["held"].conns] == [45]


def test_a_bad_start_time_is_replaced_and_a_pid_past_a_c_int_dropped() -> None:
    doc = json.loads(handover.to_json(sample()))
    doc["units"][0]["conns"] = [[46, "r", None, None, "soon"], [2**40, "r", None, None, 1.0],
                                [47, "r", None, 2**40, 1.0]]
    doc["units"][0]["strays"] = [2**31, 48]
    doc["children"] = [2**63, 46]
    state = handover.from_json(json.dumps(doc).encode())
    conns = state.units["held"].conns
    assert [c.pid for c in conns] == [46] and isinstance(conns[0].started, float)
    assert state.units["held"].strays == [48] and state.children == [46]


def test_a_number_of_5000_digits_is_no_state() -> None:
    """json refuses to convert it (int_max_str_digits): the whole document is unreadable, a fresh start."""
    raw = handover.to_json(sample()).replace(b"[42,", b"[" + b"9" * 5000 + b",")
    with pytest.raises(HandoverError, match="not JSON"):
        handover.from_json(raw)


def test_mangled_documents_raise_handover_error_or_parse() -> None:
    """Random damage to a valid document: HandoverError or a State, never another exception."""
    raw = handover.to_json(sample())
    rng = random.Random(7)
    for _ in range(2000):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            data[at] = rng.choice(b'[]{},:"0123456789-.etruflasn \\')
        try:
            state = handover.from_json(bytes(data))
        except HandoverError:
            continue
        assert isinstance(state, State)
        for unit in state.units.values():
            assert all(isinstance(c.pid, int) and c.pid > 0 and isinstance(c.remote, str) for c in unit.conns)


def _paths(node: object, path: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*path, i))
    return out


def _replaced(doc: object, path: tuple[object, ...], value: object) -> object:
    if not path:
        return value
    copy = json.loads(json.dumps(doc))
    node = copy
    for key in path[:-1]:
        node = node[key]  # type: ignore[index]
    node[path[-1]] = value  # type: ignore[index]
    return copy


def test_every_field_of_the_wrong_type_parses_or_is_refused() -> None:
    """Each value in a full document, in turn, replaced by one of another type: never another exception."""
    from supervisor.lifecycle import Exit, Slot, SlotState

    state = sample()
    state.units["held"].slots = [Slot(state=SlotState.RUNNING, pid=50, started_at=1.0, start_times=(1.0, 2.0),
                                      last_exit=Exit(code=1, signal=None))]
    state.units["held"].fd_store = [("conn", 9)]
    state.units["held"].notify = ("/run/sockvisor/notify/held", 8)
    state.units["held"].nodes = {"tcp:127.0.0.1:80": (1, 2)}
    state.units["held"].extras = {"tcp:127.0.0.1:80": [10, 11]}
    state.units["held"].counters = {"accepted": 3, "last_exit": [42, 0, None, 1.0]}
    state.control = (5, (3, 4))
    state.requester = 6
    doc = json.loads(handover.to_json(state))
    wrong = [5, -1, 2**70, 1.5, "x", None, True, {}, [], [[]], {"a": []}]
    for path in _paths(doc):
        for value in wrong:
            raw = json.dumps(_replaced(doc, path, value)).encode()
            try:
                back = handover.from_json(raw)
            except HandoverError:
                continue
            assert isinstance(back, State), (path, value)
            assert all(isinstance(fd, int) and 0 <= fd < 2**31 for fd in back.fds()), (path, value)
