"""Error answers in the shape each API's clients parse: OpenAI's, Anthropic's, Ollama's.

A client's SDK turns the body into its own exception only if the shape is its API's; one shape
for every path would show Anthropic and Ollama users a parse error instead of the message.
"""

from __future__ import annotations

import enum

from starlette.responses import JSONResponse


class Shape(enum.Enum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    OLLAMA = "ollama"


# Anthropic names its error types after the status (docs: "Errors").
_ANTHROPIC_KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_response(
    shape: Shape,
    status: int,
    message: str,
    *,
    kind: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    if shape is Shape.ANTHROPIC:
        anthropic_kind = _ANTHROPIC_KINDS.get(status, "api_error")
        body = {"type": "error", "error": {"type": anthropic_kind, "message": message}}
        return JSONResponse(body, status_code=status, headers=headers)
    if shape is Shape.OLLAMA:
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def shape_of(path: str) -> Shape:
    """The error shape a path's clients expect."""
    if path.startswith("/v1/messages"):
        return Shape.ANTHROPIC
    if path.startswith("/api/"):
        return Shape.OLLAMA
    return Shape.OPENAI
