"""What wraps every request: the API key, counting answers, and CORS for browser clients."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response, shape_of
from .metrics import NodeMetrics

# Paths answered without the key: the health check (load balancers, `docker` health checks).
_OPEN_PATHS = frozenset({"/health"})


class RequireKey:
    """Answers 401 to any request but `/health` without the key, sent as OpenAI clients do
    (`Authorization: Bearer KEY`) or as Anthropic clients do (`x-api-key: KEY`)."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self._app = app
        self._bearer, self._bare = f"Bearer {key}".encode(), key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in _OPEN_PATHS:
            await self._app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        bearer, bare = headers.get(b"authorization", b""), headers.get(b"x-api-key", b"")
        # Both compared whatever the first gives: the time taken says nothing of the key.
        by_bearer = hmac.compare_digest(bearer, self._bearer)
        by_header = hmac.compare_digest(bare, self._bare)
        if by_bearer or by_header:
            await self._app(scope, receive, send)
            return
        refusal = error_response(
            shape_of(scope.get("path", "")),
            401,
            "missing or wrong API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
            kind="invalid_request_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await refusal(scope, receive, send)


class CountRequests:
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


def with_cors(app: ASGIApp, origins: Sequence[str]) -> ASGIApp:
    """Lets browser pages of `origins` ("*" for any) call the API: preflights are answered
    before the key check (browsers send no credentials on them), and answers carry the CORS
    headers. With no origins configured, browsers keep their same-origin rule."""
    if not origins:
        return app
    return CORSMiddleware(
        app,
        allow_origins=list(origins),
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["*"],
        expose_headers=["Retry-After"],
        max_age=600,
    )
