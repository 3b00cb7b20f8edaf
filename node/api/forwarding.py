"""Forwarding one request to the model's upstream and its answer back, unbuffered.

The body is checked cheaply first (size, JSON, the endpoint's required fields, the model's
name). While the model re-plans, loads or restarts, the request waits (bounded) and then goes
to the new placement. A client that goes away while the engine still computes a non-streamed
answer cancels it: the upstream connection closes, and the engine stops that work instead of
holding a slot for minutes. A streamed answer (Server-Sent Events) reaches the client chunk by
chunk, and ends the engine's work the same way when the client leaves.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import trio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from ..serving.replica_choice import affinity_of
from ..serving.upstream import (
    ForwardRequest,
    ForwardResponse,
    ModelEntry,
    ModelNotFound,
    ModelRequired,
    Upstream,
    UpstreamBroken,
    UpstreamUnavailable,
)
from .endpoints import Endpoint, problem_with
from .errors import Shape, error_response
from .metrics import AnswerTail, NodeMetrics
from .request_body import RequestBodyError, parse_json_object

MAX_BODY_BYTES = 32 * 1024 * 1024
RETRY_AFTER_S = 5
# How long a request waits for a model that is re-planning, loading or restarting before it
# is answered 503 (under common client timeouts of 30-60 s).
RECOVERY_WAIT_S = 20.0
RECOVERY_POLL_S = 0.5
_log = logging.getLogger("sharedllm.api")
_WHAT_ANSWERS = {
    "text": "a text model: it answers completions and chats, not embeddings or reranking",
    "embedding": "an embedding model: it answers /v1/embeddings, not completions or chats",
    "rerank": "a reranking model: it answers /v1/rerank, not completions or chats",
}


class ModelRouter(Protocol):
    def models(self) -> Sequence[ModelEntry]: ...

    def resolve(self, name: str | None) -> str:
        """The model a request naming `name` (or none) is for; raises `ModelNotFound` or
        `ModelRequired`."""
        ...

    def route(self, model_id: str, affinity: str | None = None) -> Upstream:
        """The upstream serving `model_id` (of its replicas, the one for requests with this
        `affinity`); raises `ModelNotFound` or `UpstreamUnavailable`."""
        ...

    def health(self) -> tuple[bool, dict[str, str]]:
        """Whether every model is ready, and each model's state in words."""
        ...


def bad_request(shape: Shape, message: str, param: str | None = None) -> Response:
    return error_response(shape, 400, message, kind="invalid_request_error", param=param)


def model_not_found(shape: Shape, model_id: str) -> Response:
    return error_response(
        shape,
        404,
        f"The model '{model_id}' does not exist",
        kind="invalid_request_error",
        code="model_not_found",
        param="model",
    )


async def forward_json(
    router: ModelRouter, metrics: NodeMetrics, request: Request, endpoint: Endpoint
) -> Response:
    """Checks a JSON request for `endpoint` and forwards it to its model's upstream."""
    parsed = await read_json_object(request, endpoint.shape)
    if isinstance(parsed, Response):
        return parsed
    body, payload = parsed
    problem = problem_with(endpoint, payload)
    if problem is not None:
        return bad_request(endpoint.shape, *problem)
    model_id = resolve_model(router, payload.get("model"), endpoint.shape)
    if isinstance(model_id, Response):
        return model_id
    kind = next((m.kind for m in router.models() if m.model_id == model_id), "text")
    if kind not in endpoint.kinds:
        message = f"model {model_id} is {_WHAT_ANSWERS[kind]}"
        return bad_request(endpoint.shape, message, param="model")
    forward = ForwardRequest("POST", endpoint.path, body, {"content-type": "application/json"})
    answer = await open_upstream(
        router,
        metrics,
        request,
        model_id=model_id,
        forward=forward,
        shape=endpoint.shape,
        affinity=affinity_of(payload),
    )
    if isinstance(answer, Response):
        return answer
    return stream_back(answer, model_id, metrics)


def resolve_model(router: ModelRouter, name: object, shape: Shape) -> str | Response:
    if name is not None and not isinstance(name, str):
        return bad_request(shape, "'model' must be a string", param="model")
    try:
        return router.resolve(name)
    except ModelRequired as err:
        return bad_request(shape, str(err), param="model")
    except ModelNotFound:
        return model_not_found(shape, str(name))


async def open_upstream(
    router: ModelRouter,
    metrics: NodeMetrics,
    request: Request,
    *,
    model_id: str,
    forward: ForwardRequest,
    shape: Shape,
    affinity: str | None = None,
) -> ForwardResponse | Response:
    """The upstream's answer (its status and headers are in), waiting out a re-plan; an
    error answer if it cannot be had, or the client left meanwhile."""
    give_up_at = trio.current_time() + RECOVERY_WAIT_S
    while True:
        try:
            upstream = router.route(model_id, affinity)
            answer = await _unless_client_leaves(request, upstream, forward)
        except ModelNotFound:
            return model_not_found(shape, model_id)
        except UpstreamUnavailable as err:
            # Nothing was sent to the client yet: while the mesh re-plans or reloads, the
            # request waits for it (bounded), then goes to the new placement.
            if err.transient and trio.current_time() < give_up_at:
                await trio.sleep(RECOVERY_POLL_S)
                continue
            metrics.refused(model_id)
            return error_response(
                shape,
                503,
                f"model {model_id}: {err}",
                kind="service_unavailable",
                code="model_not_ready",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        if answer is None:
            return Response(status_code=499)  # nobody reads it: the client has gone
        return answer


async def _unless_client_leaves(
    request: Request, upstream: Upstream, forward: ForwardRequest
) -> ForwardResponse | None:
    """Opens the upstream request, cancelled (its connection closed, so the engine stops the
    work) if the client disconnects before the answer's headers arrive."""
    answer: ForwardResponse | None = None
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        try:
            answer = await upstream.open(forward)
        except Exception as err:  # noqa: BLE001  (raised below, outside the nursery's group)
            failure = err
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure  # as it is: callers tell UpstreamUnavailable from the rest
    return answer


async def read_json_object(
    request: Request, shape: Shape
) -> tuple[bytes, dict[str, Any]] | Response:
    declared = request.headers.get("content-length")
    too_big = f"request body over {MAX_BODY_BYTES} bytes"
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return error_response(shape, 413, too_big, kind="invalid_request_error")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return error_response(shape, 413, too_big, kind="invalid_request_error")
    except ClientDisconnect:
        return bad_request(shape, "client disconnected before sending the whole body")
    try:
        return bytes(body), parse_json_object(bytes(body))
    except RequestBodyError as err:
        return bad_request(shape, str(err))


def stream_back(answer: ForwardResponse, model_id: str, metrics: NodeMetrics) -> Response:
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
