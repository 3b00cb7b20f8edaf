"""An Ollama-compatible face: `/api/version`, `/api/tags`, `/api/show`, `/api/ps`, `/api/chat`
and `/api/generate` (NDJSON streams), mapped onto the engine's OpenAI endpoints, because many
local tools speak only Ollama's API. Model management (`pull`, `push`, `create`, `delete`,
`copy`) is not offered: a mesh's models are the files its members hold.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import AsyncIterator
from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..serving.replica_choice import affinity_of
from ..serving.upstream import ForwardRequest, ForwardResponse, ModelEntry, UpstreamBroken
from .errors import Shape, error_response
from .forwarding import ModelRouter, bad_request, open_upstream, read_json_object, resolve_model
from .metrics import NodeMetrics
from .ollama_models import model_show, model_tag
from .ollama_wire import (
    OllamaRequestError,
    SseEvents,
    chat_request,
    final_fields,
    generate_request,
    ollama_message,
)

# The Ollama API version whose endpoints and fields this face follows.
OLLAMA_API_VERSION = "0.6.3"
_NDJSON = "application/x-ndjson"
_MAX_ANSWER_BYTES = 64 * 1024 * 1024


def ollama_routes(router: ModelRouter, metrics: NodeMetrics) -> list[Route]:
    async def version(_request: Request) -> Response:
        return JSONResponse({"version": OLLAMA_API_VERSION})

    async def tags(_request: Request) -> Response:
        return JSONResponse({"models": [model_tag(m) for m in router.models()]})

    async def running(_request: Request) -> Response:
        ready = router.health()[1]
        models = [model_tag(m) for m in router.models()]
        return JSONResponse({"models": [m for m in models if ready.get(m["name"]) == "ready"]})

    async def show(request: Request) -> Response:
        parsed = await read_json_object(request, Shape.OLLAMA)
        if isinstance(parsed, Response):
            return parsed
        payload = parsed[1]
        model_id = resolve_model(router, payload.get("model", payload.get("name")), Shape.OLLAMA)
        if isinstance(model_id, Response):
            return model_id
        entry = next((m for m in router.models() if m.model_id == model_id), None)
        if entry is None:  # resolved to a model whose holder is restarting
            entry = ModelEntry(model_id, 0)
        return JSONResponse(model_show(entry))

    async def chat(request: Request) -> Response:
        return await _translated(router, metrics, request, chat=True)

    async def generate(request: Request) -> Response:
        return await _translated(router, metrics, request, chat=False)

    return [
        Route("/api/version", version, methods=["GET"]),
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/ps", running, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]),
    ]


async def _translated(
    router: ModelRouter, metrics: NodeMetrics, request: Request, *, chat: bool
) -> Response:
    parsed = await read_json_object(request, Shape.OLLAMA)
    if isinstance(parsed, Response):
        return parsed
    payload = parsed[1]
    model_id = resolve_model(router, payload.get("model"), Shape.OLLAMA)
    if isinstance(model_id, Response):
        return model_id
    try:
        if chat:
            path, body = "/v1/chat/completions", chat_request(payload, model_id)
        else:
            path, body = generate_request(payload, model_id)
    except OllamaRequestError as err:
        return bad_request(Shape.OLLAMA, str(err))
    forward = ForwardRequest(
        "POST", path, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    answer = await open_upstream(
        router,
        metrics,
        request,
        model_id=model_id,
        forward=forward,
        shape=Shape.OLLAMA,
        affinity=affinity_of(payload),
    )
    if isinstance(answer, Response):
        return answer
    stamp = {"model": model_id, "created_at": datetime.datetime.now(datetime.UTC).isoformat()}
    if answer.status_code != 200 or not body["stream"]:
        return await _whole_answer(answer, stamp, chat=chat)
    return StreamingResponse(_ndjson(answer, stamp, chat=chat), media_type=_NDJSON)


async def _whole_answer(answer: ForwardResponse, stamp: dict[str, Any], *, chat: bool) -> Response:
    body = bytearray()
    try:
        async for chunk in answer.body():
            body += chunk
            if len(body) > _MAX_ANSWER_BYTES:
                break
    except UpstreamBroken as err:
        return error_response(Shape.OLLAMA, 502, str(err), kind="service_unavailable")
    finally:
        with trio.CancelScope(shield=True):
            await answer.aclose()
    try:
        openai = json.loads(body)
    except ValueError:
        openai = None
    if not isinstance(openai, dict):
        return error_response(Shape.OLLAMA, 502, "the engine's answer was not JSON", kind="")
    if answer.status_code != 200:
        error = openai.get("error")
        message = error.get("message") if isinstance(error, dict) else str(error)
        return error_response(Shape.OLLAMA, answer.status_code, str(message), kind="")
    choices = openai.get("choices")
    first = choices[0] if isinstance(choices, list) and choices else None
    choice: dict[str, Any] = first if isinstance(first, dict) else {}
    finish = choice.get("finish_reason")
    line = {**stamp, **_content(choice, chat, delta=False), **final_fields(openai, finish)}
    return JSONResponse(line)


def _content(choice: dict[str, Any], chat: bool, *, delta: bool) -> dict[str, Any]:
    if chat:
        message = choice.get("delta" if delta else "message") or {}
        return {"message": ollama_message(message if isinstance(message, dict) else {})}
    if "text" in choice:
        return {"response": choice.get("text") or ""}
    message = choice.get("delta" if delta else "message") or {}
    return {"response": (message.get("content") if isinstance(message, dict) else "") or ""}


async def _ndjson(
    answer: ForwardResponse, stamp: dict[str, Any], *, chat: bool
) -> AsyncIterator[bytes]:
    """The engine's SSE stream as Ollama's NDJSON lines. Tool calls stream in pieces in
    OpenAI's format and whole in Ollama's: they are gathered and sent before the last line."""
    events, calls = SseEvents(), _ToolCalls()
    finish: str | None = None
    last: dict[str, Any] = {}
    try:
        async for chunk in answer.body():
            for event in events.feed(chunk):
                last = event if event.get("usage") or event.get("timings") else last
                choices = event.get("choices") or []
                if not choices or not isinstance(choices[0], dict):
                    continue
                finish = choices[0].get("finish_reason") or finish
                calls.add(choices[0].get("delta"))
                piece = _content(choices[0], chat, delta=True)
                text = piece.get("response") or piece.get("message", {}).get("content")
                if text:
                    piece.get("message", {}).pop("tool_calls", None)
                    yield _line({**stamp, **piece, "done": False})
    except (UpstreamBroken, OllamaRequestError) as err:
        yield _line({**stamp, "error": str(err), "done": True})
        return
    finally:
        with trio.CancelScope(shield=True):
            await answer.aclose()
    if chat and calls.found:
        message = ollama_message({"content": "", "tool_calls": calls.whole()})
        yield _line({**stamp, "message": message, "done": False})
    empty = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
    yield _line({**stamp, **empty, **final_fields(last, finish)})


class _ToolCalls:
    """OpenAI's streamed tool-call pieces, put back together by index."""

    def __init__(self) -> None:
        self._names: dict[int, str] = {}
        self._arguments: dict[int, str] = {}

    @property
    def found(self) -> bool:
        return bool(self._names)

    def add(self, delta: object) -> None:
        pieces = delta.get("tool_calls") if isinstance(delta, dict) else None
        for piece in pieces if isinstance(pieces, list) else []:
            if not isinstance(piece, dict) or not isinstance(piece.get("index", 0), int):
                continue
            index, function = piece.get("index", 0), piece.get("function") or {}
            if not isinstance(function, dict) or len(self._names) >= 64:
                continue
            self._names[index] = self._names.get(index, "") + str(function.get("name") or "")
            more = str(function.get("arguments") or "")
            self._arguments[index] = (self._arguments.get(index, "") + more)[:_MAX_ANSWER_BYTES]

    def whole(self) -> list[dict[str, Any]]:
        return [
            {"function": {"name": self._names[i], "arguments": self._arguments.get(i, "")}}
            for i in sorted(self._names)
        ]


def _line(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode() + b"\n"
