"""The primary's llama-server listens on a Unix socket in a directory only this user can open.

A loopback TCP port would answer every local process of every user (chat, /props with the
model's path, /slots), bypassing the node's API key. The node reaches the socket itself: its
own API requests through an HTTP client bound to the socket, other members' requests through
the API tunnel, whose far end connects to the same socket.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx

UNIX_PREFIX = "unix:"
ENGINE_BASE_URL = "http://engine"  # the host is ignored on a Unix socket


@contextlib.contextmanager
def private_socket_dir() -> Iterator[Path]:
    """A fresh 0700 directory with a short path (a socket path must fit in 108 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="sharedllm-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def unix_endpoint(path: Path) -> str:
    return f"{UNIX_PREFIX}{path}"


def socket_path(endpoint: str) -> str | None:
    """The socket's path if `endpoint` names a Unix socket, else None (a host:port)."""
    return endpoint[len(UNIX_PREFIX) :] if endpoint.startswith(UNIX_PREFIX) else None


def engine_client(path: Path, timeout: httpx.Timeout) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=ENGINE_BASE_URL, transport=httpx.AsyncHTTPTransport(uds=str(path)), timeout=timeout
    )
