"""Waiting for a process we started to answer `GET /health` (llama-server, or a node's API).

One blocking loop for every such wait: in the engine's speed measurement and in the tests and
benchmarks that start engines and nodes. It gives up as soon as the process has exited.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

import httpx


class Health(enum.Enum):
    READY = "ready"
    EXITED = "exited"
    TIMED_OUT = "timed out"


def wait_for_health(
    url: str,
    timeout_s: float,
    exited: Callable[[], bool] = lambda: False,
    *,
    any_answer: bool = False,
    interval_s: float = 0.25,
) -> Health:
    """Polls `url`/health until it answers 200 (or anything, with `any_answer`), the process
    has `exited`, or `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if exited():
            return Health.EXITED
        try:
            status = httpx.get(url + "/health", timeout=2).status_code
        except httpx.HTTPError:
            pass
        else:
            if status == 200 or any_answer:
                return Health.READY
        time.sleep(interval_s)
    return Health.TIMED_OUT
