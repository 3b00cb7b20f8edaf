"""The HTTP API that every node offers: OpenAI's, Anthropic's and Ollama's, and llama-server's
native endpoints, each forwarded to the model's primary wherever in the mesh it runs.

The API checks what it can check cheaply (JSON, model name, required fields), answers errors in
the shape of the API the path belongs to, and forwards the rest without buffering
(`forwarding`). What is forwarded and what never is: `endpoints`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from ..serving.upstream import ForwardRequest, UpstreamBroken
from .endpoints import FORWARDED, PROPS_KEPT, Endpoint
from .errors import Shape, error_response, shape_of
from .forwarding import ModelRouter, forward_json, model_not_found, open_upstream, resolve_model
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import NodeMetrics
from .middleware import CountRequests, RequireKey, with_cors
from .ollama import ollama_routes

# The live status page: static, it draws itself from /mesh/peers
STATUS_PAGE = (resources.files(__package__) / "status_page.html").read_text(encoding="utf-8")
_MAX_PROPS_BYTES = 1024 * 1024


def create_app(
    router: ModelRouter,
    mesh_view: Callable[[], dict[str, Any]] | None = None,
    metrics: NodeMetrics | None = None,
    api_key: str | None = None,
    cors_origins: Sequence[str] = (),
) -> ASGIApp:
    metrics = metrics or NodeMetrics(mesh_view)

    async def list_models(_request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [m.as_openai() for m in router.models()]})

    async def get_model(request: Request) -> Response:
        model_id = request.path_params["model_id"]
        for entry in router.models():
            if entry.model_id == model_id:
                return JSONResponse(entry.as_openai())
        return model_not_found(Shape.OPENAI, model_id)

    async def health(_request: Request) -> Response:
        ready, states = router.health()
        body = {"status": "ok" if ready else "loading", "models": states}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def props(request: Request) -> Response:
        return await _filtered_props(router, metrics, request)

    async def status_page(_request: Request) -> Response:
        return HTMLResponse(STATUS_PAGE)

    async def prometheus(_request: Request) -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    async def mesh_peers(_request: Request) -> Response:
        if mesh_view is None:
            return error_response(
                Shape.OPENAI, 404, "this node runs no mesh", kind="not_found_error"
            )
        return JSONResponse(mesh_view())

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/mesh/peers", mesh_peers, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
        Route("/props", props, methods=["GET"]),
        *(_forwarding_route(router, metrics, endpoint) for endpoint in FORWARDED),
        *ollama_routes(router, metrics),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/", status_page, methods=["GET"]),
    ]
    known = frozenset(route.path for route in routes if "{" not in route.path)
    app: ASGIApp = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    if api_key is not None:
        app = RequireKey(app, key=api_key)
    app = CountRequests(app, metrics=metrics, known=known)  # counts 401s too
    return with_cors(app, cors_origins)  # outermost: preflights carry no key


def _forwarding_route(router: ModelRouter, metrics: NodeMetrics, endpoint: Endpoint) -> Route:
    async def forward(request: Request) -> Response:
        return await forward_json(router, metrics, request, endpoint)

    return Route(endpoint.path, forward, methods=["POST"])


async def _filtered_props(router: ModelRouter, metrics: NodeMetrics, request: Request) -> Response:
    """The engine's `/props` for `?model=`, without what only the primary's machine should
    know (paths, endpoint switches)."""
    model_id = resolve_model(router, request.query_params.get("model"), Shape.OPENAI)
    if isinstance(model_id, Response):
        return model_id
    forward = ForwardRequest("GET", "/props", b"", {})
    answer = await open_upstream(
        router, metrics, request, model_id=model_id, forward=forward, shape=Shape.OPENAI
    )
    if isinstance(answer, Response):
        return answer
    body = bytearray()
    try:
        async for chunk in answer.body():
            body += chunk
            if len(body) > _MAX_PROPS_BYTES:
                break
    except UpstreamBroken as err:
        return error_response(Shape.OPENAI, 502, str(err), kind="service_unavailable")
    finally:
        with trio.CancelScope(shield=True):
            await answer.aclose()
    try:
        engine_props = json.loads(body)
    except ValueError:
        engine_props = None
    if answer.status_code != 200 or not isinstance(engine_props, dict):
        return error_response(
            Shape.OPENAI, 502, "the engine gave no usable /props", kind="service_unavailable"
        )
    kept = {key: value for key, value in engine_props.items() if key in PROPS_KEPT}
    return JSONResponse({**kept, "model_alias": model_id})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(shape_of(request.url.path), exc.status_code, str(exc.detail), kind=kind)
