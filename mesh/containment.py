"""One guard for every stream handler, on both planes: a fault ends its own stream, nothing else.

A peer's stream reaches code that parses its bytes, reads files and talks to engines. Whatever
goes wrong there — a malformed message, a peer that hangs up mid-echo, a model file moved away
— must cost that one stream: it is closed, counted by protocol and error type (for `/metrics`)
and logged at most once per interval per kind, so a flood of bad streams cannot flood the log
either. The node's nursery never sees the exception.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .transport.seam import MeshStream, StreamHandler, TransportError

_log = logging.getLogger("sharedllm.mesh.faults")
MAX_FAULT_KINDS = 256  # (plane, protocol, error type) keys counted; the rest count as "other"


@dataclass
class RateLimitedLog:
    """At most one line per key per `interval_s`; the lines held back are counted in the next."""

    clock: Callable[[], float]
    interval_s: float = 10.0
    max_keys: int = 1024
    _last: dict[str, float] = field(default_factory=dict)
    _held_back: dict[str, int] = field(default_factory=dict)

    def emit(self, key: str, message: str, *args: object) -> bool:
        """Logs `message` unless a line for `key` went out within the interval; returns whether
        it was logged."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._held_back[key] = self._held_back.get(key, 0) + 1
            return False
        if last is None and len(self._last) >= self.max_keys:
            self._forget_old(now)
        held = self._held_back.pop(key, 0)
        suffix = f" ({held} more like it since)" if held else ""
        _log.warning(message + suffix, *args)
        self._last[key] = now
        return True

    def _forget_old(self, now: float) -> None:
        for key in [k for k, at in self._last.items() if now - at >= self.interval_s]:
            del self._last[key]
            self._held_back.pop(key, None)
        while len(self._last) >= self.max_keys:  # all recent: drop the oldest
            oldest = min(self._last, key=self._last.__getitem__)
            del self._last[oldest]
            self._held_back.pop(oldest, None)


@dataclass
class HandlerFaults:
    """Faults of stream handlers, counted by (plane, protocol, error type)."""

    clock: Callable[[], float]
    counts: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.log = RateLimitedLog(self.clock)

    def record(self, plane: str, protocol: str, error: BaseException, peer: str) -> None:
        kind = (plane, protocol, type(error).__name__)
        if kind not in self.counts and len(self.counts) >= MAX_FAULT_KINDS:
            kind = (plane, "other", "other")
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if isinstance(error, TransportError):
            # The peer went away mid-stream: what networks do, counted but not worth a warning.
            _log.debug("%s stream from %s lost: %s", protocol, peer, _short(error))
            return
        self.log.emit(
            "/".join(kind),
            "%s stream from %s failed (%s): %s",
            protocol,
            peer,
            type(error).__name__,
            _short(error),
        )

    def total(self) -> int:
        return sum(self.counts.values())

    def as_rows(self) -> list[dict[str, str | int]]:
        """For the status view and `/metrics`."""
        return [
            {"plane": plane, "protocol": protocol, "error": error, "count": count}
            for (plane, protocol, error), count in sorted(self.counts.items())
        ]


def contained(
    plane: str, protocol: str, handler: StreamHandler, faults: HandlerFaults
) -> StreamHandler:
    """`handler`, with any exception it raises turned into a closed stream and a count."""

    async def guarded(stream: MeshStream) -> None:
        try:
            await handler(stream)
        except Exception as err:  # noqa: BLE001 - the one place that contains every fault
            faults.record(plane, protocol, err, stream.remote_peer)
            with trio.CancelScope(shield=True):
                await _close_quietly(stream)

    return guarded


async def _close_quietly(stream: MeshStream) -> None:
    # The stream is already broken: closing it is best effort.
    with trio.move_on_after(1.0), contextlib.suppress(Exception):
        await stream.aclose()


def _short(error: BaseException, limit: int = 200) -> str:
    text = str(error)
    return text if len(text) <= limit else text[:limit] + "..."
