"""The API's pure parts: Ollama requests and answers mapped onto OpenAI's, Server-Sent Events
split into their payloads (bounded), bodies checked per endpoint, errors in each API's shape."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sharedllm.node.api.endpoints import FORWARDED, problem_with
from sharedllm.node.api.errors import Shape, error_response, shape_of
from sharedllm.node.api.ollama_wire import (
    OllamaRequestError,
    SseEvents,
    chat_request,
    final_fields,
    generate_request,
    ollama_message,
)


def test_ollama_chat_maps_options_format_and_tools() -> None:
    body = chat_request(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "options": {"num_predict": 9, "temperature": 0.2, "seed": 4, "unknown": 1},
            "format": {"type": "object"},
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
        "m",
    )
    assert body["model"] == "m" and body["stream"] is True  # Ollama streams by default
    assert body["max_tokens"] == 9 and body["temperature"] == 0.2 and "unknown" not in body
    assert body["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert body["stream_options"] == {"include_usage": True}
    assert body["tools"][0]["function"]["name"] == "f"


def test_ollama_tool_calls_carry_objects_and_openai_strings() -> None:
    asked = chat_request(
        {
            "stream": False,
            "messages": [
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}],
                }
            ],
        },
        "m",
    )
    call = asked["messages"][0]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"x": 1}
    answered = ollama_message(
        {"content": None, "tool_calls": [{"function": {"name": "f", "arguments": '{"x": 2}'}}]}
    )
    assert answered["tool_calls"] == [{"function": {"name": "f", "arguments": {"x": 2}}}]


def test_ollama_generate_is_a_chat_unless_raw() -> None:
    path, body = generate_request({"prompt": "p", "system": "s", "stream": False}, "m")
    assert path == "/v1/chat/completions"
    assert body["messages"] == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "p"},
    ]
    raw_path, raw = generate_request({"prompt": "p", "raw": True}, "m")
    assert raw_path == "/v1/completions" and raw["prompt"] == "p"


@pytest.mark.parametrize(
    "bad",
    [
        {"messages": "hi"},
        {"messages": [], "stream": "yes"},
        {"messages": [], "options": []},
        {"messages": [], "format": "yaml"},
        {"messages": [{"content": "no role"}]},
        {"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
        {"messages": [], "tools": {}},
    ],
)
def test_untranslatable_ollama_requests_are_refused_with_a_reason(bad: dict[str, object]) -> None:
    with pytest.raises(OllamaRequestError):
        chat_request(bad, "m")


def test_ollama_final_line_counts_from_usage_and_timings() -> None:
    answer = {
        "usage": {"prompt_tokens": 5, "completion_tokens": 7},
        "timings": {"prompt_ms": 10.0, "predicted_ms": 20.0},
    }
    final = final_fields(answer, "length")
    assert final["done"] and final["done_reason"] == "length"
    assert final["eval_count"] == 7 and final["prompt_eval_count"] == 5
    assert final["total_duration"] == 30_000_000
    assert final_fields({}, None)["eval_count"] == 0


def test_sse_events_split_across_chunks_and_end_at_done() -> None:
    events = SseEvents()
    stream = b'data: {"a": 1}\n\ndata: {"b"' + b": 2}\n\n: comment\n\ndata: [DONE]\n\n"
    found = [e for i in range(0, len(stream), 7) for e in events.feed(stream[i : i + 7])]
    assert found == [{"a": 1}, {"b": 2}] and events.done


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_sse_events_never_fail_on_any_bytes_but_an_oversized_event(chunks: list[bytes]) -> None:
    events = SseEvents()
    for chunk in chunks:
        for event in events.feed(chunk):
            assert isinstance(event, dict)


def test_an_endless_event_is_refused_not_buffered() -> None:
    events = SseEvents()
    with pytest.raises(OllamaRequestError):
        for _ in range(5):
            list(events.feed(b"x" * (1024 * 1024)))


def test_each_forwarded_endpoint_says_what_its_body_lacks() -> None:
    by_path = {endpoint.path: endpoint for endpoint in FORWARDED}
    assert problem_with(by_path["/v1/chat/completions"], {}) == (
        "'messages' is a required property",
        "messages",
    )
    assert problem_with(by_path["/v1/chat/completions"], {"messages": "x"}) == (
        "'messages' has the wrong type",
        "messages",
    )
    assert problem_with(by_path["/embedding"], {"content": "x"}) is None
    assert problem_with(by_path["/v1/rerank"], {"query": "q"}) == (
        "'documents' is a required property",
        "documents",
    )
    assert problem_with(by_path["/completion"], {"prompt": 3}) == (
        "'prompt' has the wrong type",
        "prompt",
    )
    never = {"/slots", "/props", "/lora-adapters", "/metrics", "/models/load", "/cors-proxy"}
    assert not never & set(by_path)


def test_errors_come_in_the_shape_of_the_path_s_api() -> None:
    assert shape_of("/v1/messages") is Shape.ANTHROPIC
    assert shape_of("/api/chat") is Shape.OLLAMA
    assert shape_of("/v1/chat/completions") is Shape.OPENAI
    anthropic = json.loads(bytes(error_response(Shape.ANTHROPIC, 401, "no", kind="x").body))
    assert anthropic == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "no"},
    }
    assert json.loads(bytes(error_response(Shape.OLLAMA, 400, "bad", kind="x").body)) == {
        "error": "bad"
    }
    openai = json.loads(bytes(error_response(Shape.OPENAI, 400, "bad", kind="invalid").body))
    assert openai["error"]["type"] == "invalid" and openai["error"]["message"] == "bad"
