"""Weights from peers: a worker without the model file gets the tensors of its layers from a
node that holds the file, over authenticated mesh streams, before its primary loads.

The holder answers two requests on `WEIGHTS` streams: the manifest of a layer range (each big
tensor's name, size and cache entry name, the FNV-1a-64 of its bytes) and the bytes of one entry
from an offset on. The worker writes each entry to `<entry>.part` in its rpc-server cache,
resumes from the part's size after a dropped stream (from the same or another holder), checks
the finished part against its name and only then renames it into place: the engine never sees
a partial or wrong entry. The holder paces what it sends with one token bucket for all its
streams, so a worker's fetch leaves room for the serving traffic on the same links.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ...mesh import records
from ...mesh.records import RecordError
from ...mesh.transport.framing import FrameError, receive_frame, send_frame
from ...mesh.transport.seam import MeshStream, TransportError
from ..models.gguf_header import GgufFormatError
from .cache import (
    cached_layer_tensors,
    entry_matches,
    entry_name,
    read_checked,
    stamp,
    write_checked,
)
from .native_hash import NativeFnv, NativeHashUnavailable

WEIGHTS = "/sharedllm/weights/1"
_ENTRY = re.compile(r"^[0-9a-f]{16}$")
_CHUNK = 1024 * 1024
_MAX_LAYER = 1_000_000
_ANSWER_TIMEOUT_S = 600.0  # a holder may hash a few GB before it answers a manifest request
_RECEIVE_TIMEOUT_S = 30.0  # a stream that brings nothing for this long is dropped and resumed
_log = logging.getLogger("sharedllm.weight_share")


class WeightShareError(Exception):
    """A holder refused a request, or the weights could not be fetched from any holder."""


# -- wire ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightRequest:
    """`manifest` of a model's layers, or one `tensor` entry from `offset` on."""

    kind: str
    model_id: str
    first_layer: int
    last_layer: int
    entry: str = ""
    offset: int = 0

    def encode(self) -> bytes:
        fields = [self.kind, self.model_id, self.first_layer, self.last_layer]
        return records.encode("weights-request", [*fields, self.entry, self.offset])

    @staticmethod
    def decode(data: bytes) -> WeightRequest:
        kind, model_id, first, last, entry, offset = records.decode(
            data, "weights-request", [str, str, int, int, str, int], max_bytes=4096
        )
        if kind not in ("manifest", "tensor"):
            raise RecordError(f"unknown weights request {kind!r}")
        if not 0 <= first <= last <= _MAX_LAYER or offset < 0:
            raise RecordError("weights request out of range")
        if kind == "tensor" and not _ENTRY.match(entry):
            raise RecordError("a tensor request names a 16-hex-digit entry")
        return WeightRequest(kind, model_id, first, last, entry, offset)


@dataclass(frozen=True)
class ManifestEntry:
    tensor: str
    size: int
    entry: str


def encode_manifest(entries: Sequence[ManifestEntry], refusal: str = "") -> bytes:
    listed = [[e.tensor, e.size, e.entry] for e in entries]
    return records.encode("weights-manifest", [listed, refusal])


def decode_manifest(data: bytes) -> list[ManifestEntry]:
    listed, refusal = records.decode(data, "weights-manifest", [list, str], max_bytes=1024 * 1024)
    if refusal:
        raise WeightShareError(refusal)
    entries = []
    for item in listed:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not isinstance(item[0], str)
            or not isinstance(item[1], int)
            or isinstance(item[1], bool)
            or item[1] <= 0
            or not isinstance(item[2], str)
            or not _ENTRY.match(item[2])
        ):
            raise RecordError("malformed manifest entry")
        entries.append(ManifestEntry(item[0], item[1], item[2]))
    return entries


def encode_tensor_answer(remaining: int, refusal: str = "") -> bytes:
    return records.encode("weights-tensor", [remaining, refusal])


def decode_tensor_answer(data: bytes) -> int:
    remaining, refusal = records.decode(data, "weights-tensor", [int, str])
    if refusal:
        raise WeightShareError(refusal)
    if remaining < 0:
        raise RecordError("negative tensor size")
    return int(remaining)


# -- pacing --------------------------------------------------------------------------------------


@dataclass
class TokenBucket:
    """Paces bytes to `rate_bytes_per_s` on average, letting `burst_bytes` through at once.

    `reserve` books bytes and says how long to wait before sending them; bookings queue up, so
    streams sharing one bucket share its rate. A rate of 0 means unpaced.
    """

    rate_bytes_per_s: float
    burst_bytes: float
    _tokens: float = field(default=0.0, init=False)
    _at: float | None = field(default=None, init=False)

    def reserve(self, size: int, now: float) -> float:
        if self.rate_bytes_per_s <= 0:
            return 0.0
        if self._at is None:
            self._tokens, self._at = self.burst_bytes, now
        elapsed = max(0.0, now - self._at)
        self._tokens = min(self.burst_bytes, self._tokens + elapsed * self.rate_bytes_per_s)
        self._at = max(self._at, now)
        self._tokens -= size
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate_bytes_per_s


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
        self._bucket = TokenBucket(rate_mbps * 1e6 / 8, burst_bytes=4 * _CHUNK)
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
                size = min(_CHUNK, located.size - position)
                await trio.sleep(self._bucket.reserve(size, trio.current_time()))
                chunk = await trio.to_thread.run_sync(
                    os.pread, handle.fileno(), size, located.offset + position
                )
                if len(chunk) != size:
                    raise TransportError(f"{located.path} changed while being sent")
                await stream.send_all(chunk)
                position += size


# -- the worker's side -----------------------------------------------------------------------------


@dataclass
class FetchReport:
    tensors: int = 0
    already_cached: int = 0
    fetched: int = 0
    bytes_received: int = 0
    resumed: int = 0  # streams that continued a part after a drop
    rejected: int = 0  # finished parts that did not match their name (thrown away)
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"{self.tensors} tensors: {self.already_cached} already cached, {self.fetched} fetched "
            f"({self.bytes_received / 1e6:.0f} MB, {self.resumed} resumed, {self.rejected} "
            f"rejected) in {self.seconds:.1f} s"
        )


OpenWeights = Callable[[str], Awaitable[MeshStream]]  # holder peer id -> a WEIGHTS stream


@dataclass
class WeightFetch:
    """Fetches the entries of one layer range into `entries` from `holders` (tried in turn)."""

    open_stream: OpenWeights
    holders: Sequence[str]
    model_id: str
    first_layer: int
    last_layer: int
    entries: Path
    fnv: NativeFnv
    attempts: int = 8
    retry_s: float = 1.0
    report: FetchReport = field(default_factory=FetchReport)
    # Called after each tensor with (bytes in place, bytes of the whole manifest)
    on_progress: Callable[[int, int], None] | None = None

    async def run(self) -> FetchReport:
        if not self.holders:
            raise WeightShareError(f"no holder of {self.model_id} to fetch weights from")
        started = time.monotonic()
        manifest = await self._manifest()
        self.report.tensors = len(manifest)
        self.entries.mkdir(parents=True, exist_ok=True)
        checked = read_checked(self.entries)
        total, done = sum(item.size for item in manifest), 0
        for item in manifest:
            target = self.entries / item.entry
            if await trio.to_thread.run_sync(
                entry_matches, target, item.entry, item.size, self.fnv, checked
            ):
                self.report.already_cached += 1
            else:
                await self._fetch(item)
                checked[item.entry] = stamp(target)
                write_checked(self.entries, checked)
            done += item.size
            if self.on_progress is not None:
                self.on_progress(done, total)
        self.report.seconds = time.monotonic() - started
        return self.report

    def _holder(self, attempt: int) -> str:
        return self.holders[attempt % len(self.holders)]

    def _request(self, kind: str, entry: str = "", offset: int = 0) -> WeightRequest:
        return WeightRequest(kind, self.model_id, self.first_layer, self.last_layer, entry, offset)

    async def _manifest(self) -> list[ManifestEntry]:
        problems = []
        for attempt in range(self.attempts):
            holder = self._holder(attempt)
            try:
                stream = await self.open_stream(holder)
                try:
                    await send_frame(stream, self._request("manifest").encode())
                    return decode_manifest(await receive_frame(stream, _ANSWER_TIMEOUT_S))
                finally:
                    await stream.aclose()
            except (TransportError, FrameError, RecordError, WeightShareError) as err:
                problems.append(f"{holder[:12]}: {err}")
            await trio.sleep(self.retry_s)
        raise WeightShareError("no manifest: " + "; ".join(problems[-3:]))

    async def _fetch(self, item: ManifestEntry) -> None:
        part = self.entries / f"{item.entry}.part"
        problems = []
        for attempt in range(self.attempts):
            have = part.stat().st_size if part.exists() else 0
            if have > item.size:
                part.unlink()
                have = 0
            if have < item.size:
                self.report.resumed += have > 0
                try:
                    await self._receive(self._holder(attempt), item, part, have)
                except (TransportError, FrameError, RecordError, WeightShareError) as err:
                    problems.append(str(err))
                    await trio.sleep(self.retry_s)
                    continue
            if await trio.to_thread.run_sync(self._finish, part, item):
                self.report.fetched += 1
                return
            self.report.rejected += 1
        raise WeightShareError(
            f"entry {item.entry} ({item.tensor}) not fetched: " + "; ".join(problems[-3:])
        )

    async def _receive(self, holder: str, item: ManifestEntry, part: Path, have: int) -> None:
        stream = await self.open_stream(holder)
        try:
            await send_frame(stream, self._request("tensor", item.entry, have).encode())
            remaining = decode_tensor_answer(await receive_frame(stream, _ANSWER_TIMEOUT_S))
            if remaining != item.size - have:
                raise WeightShareError(f"holder offers {remaining} bytes, {item.size - have} due")
            with part.open("ab") as out:
                while remaining > 0:
                    chunk = b""
                    with trio.move_on_after(_RECEIVE_TIMEOUT_S) as waited:
                        chunk = await stream.receive_some(min(remaining, _CHUNK))
                    if waited.cancelled_caught:
                        raise TransportError(f"nothing from the holder for {_RECEIVE_TIMEOUT_S} s")
                    if not chunk:
                        raise TransportError("holder closed the stream early")
                    out.write(chunk)
                    remaining -= len(chunk)
                    self.report.bytes_received += len(chunk)
        finally:
            await stream.aclose()

    def _finish(self, part: Path, item: ManifestEntry) -> bool:
        """Moves a complete part into place if it is the tensor it is named after."""
        with part.open("rb") as handle:
            if os.fstat(handle.fileno()).st_size != item.size:
                good = False
            else:
                with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) as data:
                    good = entry_name(self.fnv, data) == item.entry
            if good:
                os.fsync(handle.fileno())
        if good:
            os.replace(part, self.entries / item.entry)
        else:
            part.unlink()
        return good
