"""Serving the API over HTTP with hypercorn, on a socket this node opens itself (so that a busy
port is one clear error, found before any slow start-up work)."""

from __future__ import annotations

import logging
import socket

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from ..config import NodeConfig


class ApiBindError(Exception):
    """The API port could not be opened."""


async def serve_api(
    app: object, config: NodeConfig, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    listener = listen_api(config.api_host, config.api_port)
    hyper = HypercornConfig()
    hyper.accesslog = None
    hyper.errorlog = logging.getLogger("sharedllm.api.server")
    hyper.graceful_timeout = 2.0
    host, port = listener.getsockname()[:2]
    # hypercorn adopts the socket and closes it; ours lets go of it, or it would close the same
    # descriptor number again later, when it may belong to another connection
    hyper.bind = [f"fd://{listener.detach()}"]
    url = f"http://{_bracket(host)}:{port}"
    task_status.started(url)
    await serve(app, hyper)  # type: ignore[arg-type]


def listen_api(host: str, port: int) -> socket.socket:
    """Opens the API socket here, so that a busy port is one clear error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, proto)
    except OSError as err:
        raise ApiBindError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(128)
    except OSError as err:
        listener.close()
        raise ApiBindError(
            f"cannot listen on {host}:{port}: {err.strerror} (use --api-port to pick another port)"
        ) from None
    return listener


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
