"""The tally of llama.cpp RPC requests crossing a tunnel."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st
from sharedllm.node.engine.rpc_traffic import COMMANDS, RpcTally

requests = st.lists(
    st.tuples(st.integers(0, len(COMMANDS) - 1), st.binary(max_size=300)), max_size=20
)


def _framed(items: list[tuple[int, bytes]]) -> bytes:
    return b"".join(bytes([command]) + struct.pack("<Q", len(p)) + p for command, p in items)


def _expected(items: list[tuple[int, bytes]]) -> dict[str, dict[str, int]]:
    found: dict[str, dict[str, int]] = {}
    for command, payload in items:
        entry = found.setdefault(COMMANDS[command], {"requests": 0, "bytes": 0})
        entry["requests"] += 1
        entry["bytes"] += len(payload)
    return found


@given(requests, st.lists(st.integers(1, 64), min_size=1))
def test_requests_are_counted_however_the_stream_is_cut(
    items: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    stream, tally = _framed(items), RpcTally()
    reader = tally.reader()
    position, turn = 0, 0
    while position < len(stream):
        step = cuts[turn % len(cuts)]
        reader(stream[position : position + step])
        position, turn = position + step, turn + 1
    assert tally.as_dict() == _expected(items)


def test_connections_count_into_one_tally() -> None:
    tally = RpcTally()
    first, second = tally.reader(), tally.reader()
    first(_framed([(10, b"g" * 5)])[:4])  # a request cut short on one connection
    second(_framed([(8, b"x" * 7)]))
    first(_framed([(10, b"g" * 5)])[4:])
    assert tally.as_dict() == {
        "GRAPH_COMPUTE": {"requests": 1, "bytes": 5},
        "GET_TENSOR": {"requests": 1, "bytes": 7},
    }


def test_a_stream_of_another_protocol_stops_being_counted() -> None:
    tally = RpcTally()
    reader = tally.reader()
    reader(_framed([(14, b"h" * 3)]) + b"\xff" + b"\x00" * 8 + _framed([(8, b"")]))
    assert tally.as_dict() == {"HELLO": {"requests": 1, "bytes": 3}}
