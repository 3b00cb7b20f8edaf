"""The OpenAI-compatible HTTP API that every node offers.

The API checks what it can check cheaply (JSON, model name, required fields), answers errors in
OpenAI's JSON shape, and forwards the rest to the model's `Upstream` without buffering: a
streamed answer (Server-Sent Events) reaches the client token by token.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from importlib import resources
from typing import Any, Protocol

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..serving.upstream import (
    ForwardRequest,
    ForwardResponse,
    ModelEntry,
    ModelNotFound,
    Upstream,
    UpstreamBroken,
    UpstreamUnavailable,
)
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import AnswerTail, NodeMetrics
from .request_body import RequestBodyError, parse_json_object

MAX_BODY_BYTES = 32 * 1024 * 1024
RETRY_AFTER_S = 5
# How long a request waits for a model that is re-planning, loading or restarting before it
# is answered 503 (under common client timeouts of 30-60 s).
RECOVERY_WAIT_S = 20.0
RECOVERY_POLL_S = 0.5
_log = logging.getLogger("sharedllm.api")
# The live status page: static, it draws itself from /mesh/peers
STATUS_PAGE = (resources.files(__package__) / "status_page.html").read_text(encoding="utf-8")


class ModelRouter(Protocol):
    def models(self) -> Sequence[ModelEntry]: ...

    def route(self, model_id: str) -> Upstream:
        """The upstream serving `model_id`; raises `ModelNotFound` or `UpstreamUnavailable`."""
        ...

    def health(self) -> tuple[bool, dict[str, str]]:
        """Whether every model is ready, and each model's state in words."""
        ...


def openai_error(
    status: int,
    message: str,
    *,
    kind: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _bad_request(message: str, param: str | None = None) -> JSONResponse:
    return openai_error(400, message, kind="invalid_request_error", param=param)


def create_app(
    router: ModelRouter,
    mesh_view: Callable[[], dict[str, Any]] | None = None,
    metrics: NodeMetrics | None = None,
    api_key: str | None = None,
) -> Starlette:
    metrics = metrics or NodeMetrics(mesh_view)

    async def list_models(_request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [m.as_openai() for m in router.models()]})

    async def get_model(request: Request) -> Response:
        model_id = request.path_params["model_id"]
        for entry in router.models():
            if entry.model_id == model_id:
                return JSONResponse(entry.as_openai())
        return _model_not_found(model_id)

    async def health(_request: Request) -> Response:
        ready, states = router.health()
        body = {"status": "ok" if ready else "loading", "models": states}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def chat_completions(request: Request) -> Response:
        return await _forward(router, metrics, request, required=("messages", list))

    async def completions(request: Request) -> Response:
        return await _forward(router, metrics, request, required=("prompt", (str, list)))

    async def status_page(_request: Request) -> Response:
        return HTMLResponse(STATUS_PAGE)

    async def prometheus(_request: Request) -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    async def mesh_peers(_request: Request) -> Response:
        if mesh_view is None:
            return openai_error(404, "this node runs no mesh", kind="not_found_error")
        return JSONResponse(mesh_view())

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/mesh/peers", mesh_peers, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/", status_page, methods=["GET"]),
    ]
    known = frozenset(route.path for route in routes if "{" not in route.path)
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    if api_key is not None:
        app.add_middleware(_RequireKey, key=api_key)
    app.add_middleware(_CountRequests, metrics=metrics, known=known)  # outermost: counts 401s
    return app


class _RequireKey:
    """Answers 401 to any request but `/health` without `Authorization: Bearer <key>`."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self._app, self._expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == "/health":
            await self._app(scope, receive, send)
            return
        given = dict(scope.get("headers", [])).get(b"authorization", b"")
        if hmac.compare_digest(given, self._expected):
            await self._app(scope, receive, send)
            return
        refusal = openai_error(
            401,
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            kind="invalid_request_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await refusal(scope, receive, send)


class _CountRequests:
    """Counts every answer by endpoint (unknown paths as one) and status."""

    def __init__(self, app: ASGIApp, metrics: NodeMetrics, known: frozenset[str]) -> None:
        self._app, self._metrics, self._known = app, metrics, known

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = (
            path
            if path in self._known
            else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        )

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self._app(scope, receive, counted)


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return openai_error(exc.status_code, str(exc.detail), kind=kind)


def _model_not_found(model_id: str) -> JSONResponse:
    return openai_error(
        404,
        f"The model '{model_id}' does not exist",
        kind="invalid_request_error",
        code="model_not_found",
        param="model",
    )


async def _forward(
    router: ModelRouter,
    metrics: NodeMetrics,
    request: Request,
    required: tuple[str, type | tuple[type, ...]],
) -> Response:
    parsed = await _read_json_object(request)
    if isinstance(parsed, Response):
        return parsed
    body, payload = parsed
    field_name, field_type = required
    if field_name not in payload:
        return _bad_request(f"'{field_name}' is a required property", param=field_name)
    if not isinstance(payload[field_name], field_type):
        return _bad_request(f"'{field_name}' has the wrong type", param=field_name)
    model_id = payload.get("model")
    if model_id is None:
        offered = router.models()
        if len(offered) != 1:
            return _bad_request("'model' is a required property", param="model")
        model_id = offered[0].model_id
    if not isinstance(model_id, str):
        return _bad_request("'model' must be a string", param="model")
    forward = ForwardRequest("POST", request.url.path, body, {"content-type": "application/json"})
    give_up_at = trio.current_time() + RECOVERY_WAIT_S
    while True:
        try:
            answer = await router.route(model_id).open(forward)
        except ModelNotFound:
            return _model_not_found(model_id)
        except UpstreamUnavailable as err:
            # Nothing was sent to the client yet: while the mesh re-plans or reloads, the
            # request waits for it (bounded), then goes to the new placement.
            if err.transient and trio.current_time() < give_up_at:
                await trio.sleep(RECOVERY_POLL_S)
                continue
            metrics.refused(model_id)
            return openai_error(
                503,
                f"model {model_id}: {err}",
                kind="service_unavailable",
                code="model_not_ready",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        return _stream_back(answer, model_id, metrics)


async def _read_json_object(request: Request) -> tuple[bytes, dict[str, Any]] | Response:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return openai_error(
            413, f"request body over {MAX_BODY_BYTES} bytes", kind="invalid_request_error"
        )
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return openai_error(
                    413, f"request body over {MAX_BODY_BYTES} bytes", kind="invalid_request_error"
                )
    except ClientDisconnect:
        return _bad_request("client disconnected before sending the whole body")
    try:
        return bytes(body), parse_json_object(bytes(body))
    except RequestBodyError as err:
        return _bad_request(str(err))


def _stream_back(answer: ForwardResponse, model_id: str, metrics: NodeMetrics) -> Response:
    is_sse = answer.headers.get("content-type", "").startswith("text/event-stream")

    async def relay() -> AsyncIterator[bytes]:
        tail = AnswerTail()
        try:
            async for chunk in answer.body():
                tail.add(chunk)
                yield chunk
            metrics.answered(model_id, answer.status_code, tail.bytes())
        except UpstreamBroken as err:
            _log.warning("answer cut off: %s", err)
            metrics.cut(model_id)
            if is_sse:
                error = {
                    "error": {
                        "message": str(err),
                        "type": "service_unavailable",
                        "code": "upstream_lost",
                    }
                }
                yield f"data: {json.dumps(error)}\n\n".encode()
        finally:
            with trio.CancelScope(shield=True):
                await answer.aclose()

    headers = {k: v for k, v in answer.headers.items() if k.lower() != "content-type"}
    media_type = answer.headers.get("content-type")
    return StreamingResponse(
        relay(), status_code=answer.status_code, headers=headers, media_type=media_type
    )
