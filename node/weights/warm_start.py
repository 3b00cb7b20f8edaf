"""Getting workers ready before their primary loads a placement.

A worker is ready for a placement when its rpc-server is up and its weight cache holds the
tensors of its layers: filled from its own copy of the model file (see `cache`), or
fetched from a node that holds the file (see `fetch` and `share`). The primary asks
each worker over a `READY` stream and starts llama-server once every one has said yes, so the
load finds warm caches and live rpc-servers instead of failing and retrying.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import trio

from ...mesh.records import RecordError
from ...mesh.transport.framing import FrameError, receive_frame, send_frame
from ...mesh.transport.seam import MeshStream, TransportError
from ...mesh.transport.tunnel import OpenStream, TunnelRequest
from ..models.gguf_header import GgufFormatError
from .cache import FillReport, cached_layer_tensors, fill_cache, rpc_cache_entries
from .fetch import OpenWeights, WeightFetch
from .native_hash import NativeFnv, NativeHashUnavailable
from .share_wire import WeightShareError

READY = "/sharedllm/ready/1"
READY_ANSWER = b"ok"
_RETRY_S = 1.0
_log = logging.getLogger("sharedllm.warm_start")


class WeightFiller:
    """Fills the rpc-server cache of this node from the model files it holds, or from peers."""

    def __init__(self, cache_dir: Path, llama_cache: Path, *, enabled: bool = True) -> None:
        self._cache_dir = cache_dir
        self.entries = rpc_cache_entries(llama_cache)
        self._enabled = enabled
        self._fnv: NativeFnv | None = None

    async def fill(self, model_id: str, model: Path, first_layer: int, last_layer: int) -> None:
        """Writes the missing entries for the layers; logs and carries on if it cannot."""
        if not self._enabled:
            return
        stop = threading.Event()
        try:
            report = await trio.to_thread.run_sync(
                self._fill_blocking, model, first_layer, last_layer, stop, abandon_on_cancel=True
            )
        except (OSError, GgufFormatError, NativeHashUnavailable) as err:
            _log.warning(
                "model %s: weight cache not filled, the load sends weights: %s", model_id, err
            )
            return
        finally:
            stop.set()  # a cancelled fill stops at the next tensor
        _log.info(
            "model %s: weight cache for layers %d-%d: %s",
            model_id,
            first_layer,
            last_layer,
            report.summary(),
        )

    async def fetch(
        self, model_id: str, holders: Sequence[str], open_stream: OpenWeights, layers: range
    ) -> None:
        """Gets the entries for the layers from `holders` (this node lacks the file); logs and
        carries on if it cannot (the load then sends the weights)."""
        if not self._enabled:
            return
        try:
            if self._fnv is None:
                self._fnv = await trio.to_thread.run_sync(NativeFnv, self._cache_dir)
            fetch = WeightFetch(
                open_stream, holders, model_id, layers[0], layers[-1], self.entries, self._fnv
            )
            fetch.on_progress = _progress_log(f"model {model_id}: weights from peers")
            report = await fetch.run()
        except (OSError, NativeHashUnavailable, WeightShareError) as err:
            _log.warning("model %s: weights not fetched, the load sends them: %s", model_id, err)
            return
        _log.info(
            "model %s: weights for layers %d-%d from peers: %s",
            model_id,
            layers[0],
            layers[-1],
            report.summary(),
        )

    def _fill_blocking(
        self, model: Path, first: int, last: int, stop: threading.Event
    ) -> FillReport:
        if self._fnv is None:
            self._fnv = NativeFnv(self._cache_dir)
        spans = cached_layer_tensors(model, first, last)
        return fill_cache(self.entries, model, spans, self._fnv, stop=stop.is_set)


def _progress_log(what: str) -> Callable[[int, int], None]:
    """Logs a long transfer at each tenth of the way (the node's output is a log, not a bar)."""
    logged = set()

    def progress(done: int, total: int) -> None:
        tenth = 10 * done // max(total, 1)
        if tenth not in logged:
            logged.add(tenth)
            _log.info("%s: %d%% (%.0f of %.0f MB)", what, 10 * tenth, done / 1e6, total / 1e6)

    return progress


ReadyCheck = Callable[[TunnelRequest, str], Awaitable[bytes]]


async def answer_ready(stream: MeshStream, check: ReadyCheck) -> None:
    """The worker's side: `check(request, peer)` waits until ready and returns the answer
    (`READY_ANSWER`, or why not)."""
    try:
        request = TunnelRequest.decode(await receive_frame(stream))
        answer = await check(request, stream.remote_peer)
        await send_frame(stream, answer[:300])
    except (RecordError, FrameError, TransportError) as err:
        _log.info("ready check from %s failed: %s", stream.remote_peer, err)
    finally:
        await stream.aclose()


async def await_ready(open_stream: OpenStream, request: TunnelRequest, peer_name: str) -> None:
    """The primary's side: asks until the worker says it is ready (the caller bounds the
    time; a worker that never answers leaves the load to find out)."""
    while True:
        try:
            stream = await open_stream()
            try:
                await send_frame(stream, request.encode())
                answer = await receive_frame(stream, timeout_s=24 * 3600.0)
            finally:
                await stream.aclose()
            if answer == READY_ANSWER:
                return
            _log.info(
                "worker %s not ready for %s: %s",
                peer_name,
                request.model_id,
                answer.decode(errors="replace"),
            )
        except (TransportError, FrameError) as err:
            _log.info("worker %s not reachable for a ready check: %s", peer_name, err)
        await trio.sleep(_RETRY_S)
