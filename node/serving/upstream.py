"""Where the HTTP API sends a request: the small interface between the API and the engine.

Today a node forwards to its own llama-server over loopback HTTP. The mesh will forward to the
current primary over a mesh stream; both satisfy `Upstream`, and the API never knows which.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import trio

from ...scheduler.model_profile import ModelProfile
from .replica_choice import InFlight, ReplicaKey

# Headers that describe one hop's connection, not the message: never forwarded.
_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "host",
        "upgrade",
        "proxy-connection",
        "te",
        "trailer",
        "content-encoding",
    }
)


class UpstreamUnavailable(Exception):
    """The engine for this model cannot take requests now (the message says why). `transient`:
    the mesh is re-planning, loading or restarting and will likely serve again soon, so a
    request may wait for it; otherwise (nothing can be planned) it is refused at once."""

    def __init__(self, reason: str, transient: bool = False) -> None:
        super().__init__(reason)
        self.transient = transient


class UpstreamBroken(Exception):
    """The engine went away in the middle of an answer."""


@dataclass(frozen=True)
class ForwardRequest:
    method: str
    path: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


class ForwardResponse(Protocol):
    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def body(self) -> AsyncIterator[bytes]:
        """Yields the answer as it arrives; raises `UpstreamBroken` if it is cut off."""
        ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    async def open(self, request: ForwardRequest) -> ForwardResponse:
        """Sends the request; raises `UpstreamUnavailable` if it cannot be delivered."""
        ...


def forwardable_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS}


class _HttpxResponse:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status_code = response.status_code
        self.headers = forwardable_headers(response.headers)

    async def body(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as err:
            raise UpstreamBroken(
                f"engine connection lost mid-answer ({type(err).__name__})"
            ) from None

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpUpstream:
    """Forwards to an HTTP server on loopback (the local llama-server)."""

    def __init__(self, client: httpx.AsyncClient, base_url: str) -> None:
        self._client = client
        self._base_url = base_url.rstrip("/")

    async def open(self, request: ForwardRequest) -> ForwardResponse:
        outgoing = self._client.build_request(
            request.method,
            self._base_url + request.path,
            content=request.body,
            headers=forwardable_headers(request.headers),
        )
        try:
            response = await self._client.send(outgoing, stream=True)
        except httpx.HTTPError as err:
            raise UpstreamUnavailable(
                f"engine not reachable ({type(err).__name__})", transient=True
            ) from None
        return _HttpxResponse(response)


class CountedUpstream:
    """An upstream whose requests count as in flight to their replica from open to close;
    one it cannot deliver marks the replica failed, so the retry goes to another."""

    def __init__(self, inner: Upstream, in_flight: InFlight, key: ReplicaKey) -> None:
        self._inner, self._in_flight, self._key = inner, in_flight, key

    async def open(self, request: ForwardRequest) -> ForwardResponse:
        token = self._in_flight.start(self._key, trio.current_time())
        try:
            answer = await self._inner.open(request)
        except UpstreamUnavailable:
            self._in_flight.fail(self._key, trio.current_time())
            self._in_flight.end(token, trio.current_time())
            raise
        except BaseException:
            self._in_flight.end(token, trio.current_time())
            raise
        return _Counted(answer, lambda: self._in_flight.end(token, trio.current_time()))


class _Counted:
    def __init__(self, inner: ForwardResponse, ended: Callable[[], None]) -> None:
        self._inner, self._ended = inner, ended
        self.status_code = inner.status_code
        self.headers = inner.headers

    def body(self) -> AsyncIterator[bytes]:
        return self._inner.body()

    async def aclose(self) -> None:
        self._ended()
        await self._inner.aclose()


class ModelNotFound(Exception):
    """No model of that name is offered."""


class ModelRequired(Exception):
    """A request names no model, and the mesh offers several."""


@dataclass(frozen=True)
class ModelEntry:
    model_id: str
    created: int
    kind: str = "text"  # what it answers: text, embedding or rerank
    owned_by: str = "sharedllm"
    profile: ModelProfile | None = None  # its shape, as its holders gossip it
    context: int = 0  # the context length it is served with (0: not known)

    def as_openai(self) -> dict[str, Any]:
        return {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": self.owned_by,
            "kind": self.kind,
        }
