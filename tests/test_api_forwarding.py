"""Forwarding in-process, against a router whose upstream fails: every failure of the upstream
is answered in the API's shape (never a 500), with the client's request untouched."""

from __future__ import annotations

from collections.abc import Sequence

import httpx
from sharedllm.node.api.app import create_app
from sharedllm.node.serving.upstream import (
    ForwardRequest,
    ForwardResponse,
    ModelEntry,
    ModelNotFound,
    Upstream,
    UpstreamUnavailable,
)


class _FailingUpstream:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def open(self, request: ForwardRequest) -> ForwardResponse:
        raise self.error


class _Router:
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    def models(self) -> Sequence[ModelEntry]:
        return [ModelEntry("m", 0)]

    def resolve(self, name: str | None) -> str:
        if name not in (None, "m"):
            raise ModelNotFound(str(name))
        return "m"

    def route(self, model_id: str, affinity: str | None = None) -> Upstream:
        return self.upstream

    def health(self) -> tuple[bool, dict[str, str]]:
        return True, {"m": "ready"}


async def _post(error: Exception, path: str, body: dict[str, object]) -> httpx.Response:
    app = create_app(_Router(_FailingUpstream(error)))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
        return await client.post(path, json=body)


async def test_an_upstream_that_cannot_be_reached_is_a_503_in_each_api_s_shape() -> None:
    """The failure is raised inside the task that also watches for the client leaving; it must
    reach the handler as itself (trio wraps a nursery's errors in a group: that was a 500)."""
    refused = UpstreamUnavailable("nothing can be planned", transient=False)
    chat: dict[str, object] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    openai = await _post(refused, "/v1/chat/completions", chat)
    assert openai.status_code == 503 and openai.json()["error"]["code"] == "model_not_ready"
    assert openai.headers["retry-after"]
    anthropic = await _post(refused, "/v1/messages", {**chat, "max_tokens": 4})
    assert anthropic.status_code == 503 and anthropic.json()["type"] == "error"
    ollama = await _post(refused, "/api/chat", chat)
    assert ollama.status_code == 503 and "nothing can be planned" in ollama.json()["error"]


async def test_a_model_gone_while_routing_is_a_404() -> None:
    gone = await _post(ModelNotFound("m"), "/completion", {"prompt": "x"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
