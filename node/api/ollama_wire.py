"""Translating between Ollama's API and the OpenAI one the engine speaks (pure).

Ollama's `/api/chat` and `/api/generate` carry sampling settings in `options`, a structured
output as `format`, tool-call arguments as objects, and stream NDJSON lines; the engine takes
OpenAI requests and streams Server-Sent Events. These functions map one onto the other.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

# Ollama option -> OpenAI (or llama-server) request field
_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "num_predict": "max_tokens",
    "repeat_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
_MAX_EVENT_BYTES = 4 * 1024 * 1024


class OllamaRequestError(ValueError):
    """An Ollama request the node cannot translate; the message says why."""


def chat_request(ollama: dict[str, Any], model_id: str) -> dict[str, Any]:
    """The OpenAI chat request for an Ollama `/api/chat` body."""
    messages = ollama.get("messages")
    if not isinstance(messages, list):
        raise OllamaRequestError("'messages' must be an array")
    body = _common(ollama, model_id)
    body["messages"] = [_message(m) for m in messages]
    tools = ollama.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise OllamaRequestError("'tools' must be an array")
        body["tools"] = tools
    return body


def generate_request(ollama: dict[str, Any], model_id: str) -> tuple[str, dict[str, Any]]:
    """The engine path and OpenAI request for an Ollama `/api/generate` body: a raw prompt is
    completed as it is, any other goes through the model's chat template."""
    prompt = ollama.get("prompt", "")
    if not isinstance(prompt, str):
        raise OllamaRequestError("'prompt' must be a string")
    body = _common(ollama, model_id)
    if ollama.get("raw") is True:
        body["prompt"] = prompt
        return "/v1/completions", body
    system = ollama.get("system")
    messages = [] if not isinstance(system, str) or not system else [_text("system", system)]
    body["messages"] = [*messages, _text("user", prompt)]
    return "/v1/chat/completions", body


def _common(ollama: dict[str, Any], model_id: str) -> dict[str, Any]:
    stream = ollama.get("stream", True)  # Ollama streams unless told not to
    if not isinstance(stream, bool):
        raise OllamaRequestError("'stream' must be true or false")
    options = ollama.get("options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise OllamaRequestError("'options' must be an object")
    body: dict[str, Any] = {"model": model_id, "stream": stream}
    for name, field in _OPTIONS.items():
        if name in options:
            body[field] = options[name]
    if stream:
        body["stream_options"] = {"include_usage": True}
    wanted = ollama.get("format")
    if wanted == "json":
        body["response_format"] = {"type": "json_object"}
    elif isinstance(wanted, dict):
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": wanted, "strict": True},
        }
    elif wanted not in (None, ""):
        raise OllamaRequestError("'format' must be \"json\" or a JSON schema")
    return body


def _text(role: str, content: str) -> dict[str, Any]:
    return {"role": role, "content": content}


def _message(message: object) -> dict[str, Any]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise OllamaRequestError("each message needs a 'role' and a 'content'")
    if message.get("images"):
        raise OllamaRequestError("images are not supported by the models this mesh serves")
    out: dict[str, Any] = {"role": message["role"], "content": message.get("content") or ""}
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        out["tool_calls"] = [_openai_call(index, call) for index, call in enumerate(calls)]
    if isinstance(message.get("tool_name"), str):
        out["name"] = message["tool_name"]
    return out


def _openai_call(index: int, call: object) -> dict[str, Any]:
    function = call.get("function", {}) if isinstance(call, dict) else {}
    arguments = function.get("arguments", {}) if isinstance(function, dict) else {}
    return {
        "id": f"call_{index}",
        "type": "function",
        "function": {
            "name": function.get("name", "") if isinstance(function, dict) else "",
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
        },
    }


# -- answers ---------------------------------------------------------------------------------


def ollama_message(openai_message: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI assistant message (or stream delta) as Ollama writes it."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": openai_message.get("content") or "",
    }
    calls = openai_message.get("tool_calls")
    if isinstance(calls, list) and calls:
        message["tool_calls"] = [_ollama_call(call) for call in calls]
    return message


def _ollama_call(call: object) -> dict[str, Any]:
    function = call.get("function", {}) if isinstance(call, dict) else {}
    raw = function.get("arguments", "") if isinstance(function, dict) else ""
    try:
        arguments = json.loads(raw) if isinstance(raw, str) and raw else {}
    except ValueError:
        arguments = {"raw": raw}
    name = function.get("name", "") if isinstance(function, dict) else ""
    return {"function": {"name": name, "arguments": arguments}}


def final_fields(answer: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    """The counts and durations Ollama puts on its last line, from an OpenAI answer's usage and
    llama-server's timings."""
    usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
    timings = answer.get("timings") if isinstance(answer.get("timings"), dict) else {}
    assert isinstance(usage, dict) and isinstance(timings, dict)
    prompt_ns = int(float(timings.get("prompt_ms", 0) or 0) * 1e6)
    eval_ns = int(float(timings.get("predicted_ms", 0) or 0) * 1e6)
    return {
        "done": True,
        "done_reason": "length" if finish_reason == "length" else "stop",
        "total_duration": prompt_ns + eval_ns,
        "load_duration": 0,
        "prompt_eval_count": int(usage.get("prompt_tokens", 0) or 0),
        "prompt_eval_duration": prompt_ns,
        "eval_count": int(usage.get("completion_tokens", 0) or 0),
        "eval_duration": eval_ns,
    }


class SseEvents:
    """Splits a Server-Sent Events byte stream into its JSON `data:` payloads (bounded)."""

    def __init__(self) -> None:
        self._pending = bytearray()
        self.done = False

    def feed(self, chunk: bytes) -> Iterator[dict[str, Any]]:
        self._pending += chunk
        if len(self._pending) > _MAX_EVENT_BYTES:
            raise OllamaRequestError("the engine sent an event over 4 MiB")
        while b"\n\n" in self._pending:
            event, _, rest = bytes(self._pending).partition(b"\n\n")
            self._pending = bytearray(rest)
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    self.done = True
                    continue
                try:
                    parsed = json.loads(data)
                except ValueError:
                    continue
                if isinstance(parsed, dict):
                    yield parsed
