"""Weights from peers: a worker without the model file gets the tensors of its layers from a
node that holds the file, over authenticated mesh streams, before its primary loads.

The holder answers two requests on `WEIGHTS` streams: the manifest of a layer range (each big
tensor's name, size and cache entry name, the FNV-1a-64 of its bytes) and the bytes of one entry
from an offset on. The worker writes each entry to `<entry>.part` in its rpc-server cache,
resumes from the part's size after a dropped stream (from the same or another holder), checks
the finished part against its name and only then renames it into place: the engine never sees
a partial or wrong entry. The holder paces what it sends with one token bucket for all its
streams, so a worker's fetch leaves room for the serving traffic on the same links.

This module is the holder's side; `fetch` is the worker's, `share_wire` their messages.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

from ...mesh.records import RecordError
from ...mesh.transport.framing import FrameError, receive_frame, send_frame
from ...mesh.transport.seam import MeshStream, TransportError
from ..models.gguf_header import GgufFormatError
from .cache import (
    cached_layer_tensors,
    entry_name,
)
from .native_hash import NativeFnv, NativeHashUnavailable
from .share_wire import (
    CHUNK_BYTES,
    ManifestEntry,
    TokenBucket,
    WeightRequest,
    WeightShareError,
    encode_manifest,
    encode_tensor_answer,
)

_log = logging.getLogger("sharedllm.weight_share")


# -- the holder's side -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Located:
    path: Path
    offset: int
    size: int


class WeightShare:
    """Answers `WEIGHTS` streams from the model files this node holds."""

    def __init__(self, models: Mapping[str, Path], cache_dir: Path, rate_mbps: float) -> None:
        self._models = dict(models)
        self._cache_dir = cache_dir
        self._bucket = TokenBucket(rate_mbps * 1e6 / 8, burst_bytes=4 * CHUNK_BYTES)
        self._located: dict[str, _Located] = {}
        self._manifests: dict[tuple[str, int, int], list[ManifestEntry]] = {}
        self._hashing = trio.Lock()
        self._fnv: NativeFnv | None = None

    async def serve(self, stream: MeshStream) -> None:
        try:
            request = WeightRequest.decode(await receive_frame(stream))
            if request.kind == "manifest":
                await self._send_manifest(stream, request)
            else:
                await self._send_tensor(stream, request)
        except (RecordError, FrameError, TransportError) as err:
            _log.info("weights request from %s failed: %s", stream.remote_peer, err)
        finally:
            await stream.aclose()

    async def _send_manifest(self, stream: MeshStream, request: WeightRequest) -> None:
        try:
            entries = await self.manifest(request.model_id, request.first_layer, request.last_layer)
        except WeightShareError as err:
            await send_frame(stream, encode_manifest([], str(err)))
            return
        await send_frame(stream, encode_manifest(entries))

    async def manifest(self, model_id: str, first: int, last: int) -> list[ManifestEntry]:
        """The big tensors of the layers, with their entry names (hashed once, in a thread)."""
        model = self._models.get(model_id)
        if model is None:
            raise WeightShareError(f"this node does not hold {model_id}")
        key = (model_id, first, last)
        async with self._hashing:
            if key not in self._manifests:
                try:
                    self._manifests[key] = await trio.to_thread.run_sync(
                        self._hash_layers, model, first, last, abandon_on_cancel=True
                    )
                except (OSError, GgufFormatError, NativeHashUnavailable) as err:
                    raise WeightShareError(f"cannot read {model_id}: {err}") from None
        return self._manifests[key]

    def _hash_layers(self, model: Path, first: int, last: int) -> list[ManifestEntry]:
        if self._fnv is None:
            self._fnv = NativeFnv(self._cache_dir)
        entries = []
        spans = cached_layer_tensors(model, first, last)
        with (
            model.open("rb") as handle,
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) as data,
        ):
            for span in spans:
                tensor = memoryview(data)[span.offset : span.offset + span.size]
                try:
                    name = entry_name(self._fnv, tensor)
                finally:
                    tensor.release()
                self._located[name] = _Located(model, span.offset, span.size)
                entries.append(ManifestEntry(span.name, span.size, name))
        return entries

    async def _send_tensor(self, stream: MeshStream, request: WeightRequest) -> None:
        located = self._located.get(request.entry)
        if located is None:  # asked before a manifest (we restarted): hash that range again
            try:
                await self.manifest(request.model_id, request.first_layer, request.last_layer)
            except WeightShareError as err:
                await send_frame(stream, encode_tensor_answer(0, str(err)))
                return
            located = self._located.get(request.entry)
        if located is None or request.offset > located.size:
            await send_frame(stream, encode_tensor_answer(0, f"no entry {request.entry} here"))
            return
        await send_frame(stream, encode_tensor_answer(located.size - request.offset))
        with located.path.open("rb") as handle:
            position = request.offset
            while position < located.size:
                size = min(CHUNK_BYTES, located.size - position)
                await trio.sleep(self._bucket.reserve(size, trio.current_time()))
                chunk = await trio.to_thread.run_sync(
                    os.pread, handle.fileno(), size, located.offset + position
                )
                if len(chunk) != size:
                    raise TransportError(f"{located.path} changed while being sent")
                await stream.send_all(chunk)
                position += size


# -- the worker's side -----------------------------------------------------------------------------
