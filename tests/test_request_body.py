"""API request bodies: what Python's json takes but the engine refuses is the client's 400."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sharedllm.node.api.request_body import MAX_DEPTH, RequestBodyError, parse_json_object


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "nested deeper"),
        (b'{"a": ' + b"[" * 200 + b"]" * 200 + b"}", "nested deeper"),
        (b'{"temperature": NaN}', "NaN"),
        (b'{"temperature": -Infinity}', "Infinity"),
        (b'{"max_tokens": 1e400}', "out of range"),
        (b'{"prompt": "\\ud800"}', "not valid Unicode"),
        (b'{"\\udfff": 1}', "not valid Unicode"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
    ],
)
def test_bodies_the_engine_would_refuse_are_the_client_s_error(body: bytes, reason: str) -> None:
    with pytest.raises(RequestBodyError, match=reason):
        parse_json_object(body)


def test_ordinary_bodies_pass() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "héllo 🙂"}], "top_p": 0.5}
    assert parse_json_object(json.dumps(body).encode()) == body
    nested: object = 1
    for _ in range(MAX_DEPTH - 2):
        nested = [nested]
    assert parse_json_object(json.dumps({"a": nested}).encode())


@given(st.binary(max_size=200))
def test_any_bytes_are_an_object_or_a_request_body_error(data: bytes) -> None:
    with contextlib.suppress(RequestBodyError):
        assert isinstance(parse_json_object(data), dict)
