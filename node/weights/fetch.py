"""A worker's side of weight sharing: fetching the entries of its layers from holders, resuming
dropped streams, and checking each entry before the engine may see it."""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ...mesh.records import RecordError
from ...mesh.transport.framing import FrameError, receive_frame, send_frame
from ...mesh.transport.seam import MeshStream, TransportError
from .cache import (
    entry_matches,
    entry_name,
    read_checked,
    stamp,
    write_checked,
)
from .native_hash import NativeFnv
from .share_wire import (
    ANSWER_TIMEOUT_S,
    CHUNK_BYTES,
    RECEIVE_TIMEOUT_S,
    ManifestEntry,
    WeightRequest,
    WeightShareError,
    decode_manifest,
    decode_tensor_answer,
)


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
                    return decode_manifest(await receive_frame(stream, ANSWER_TIMEOUT_S))
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
            remaining = decode_tensor_answer(await receive_frame(stream, ANSWER_TIMEOUT_S))
            if remaining != item.size - have:
                raise WeightShareError(f"holder offers {remaining} bytes, {item.size - have} due")
            with part.open("ab") as out:
                while remaining > 0:
                    chunk = b""
                    with trio.move_on_after(RECEIVE_TIMEOUT_S) as waited:
                        chunk = await stream.receive_some(min(remaining, CHUNK_BYTES))
                    if waited.cancelled_caught:
                        raise TransportError(f"nothing from the holder for {RECEIVE_TIMEOUT_S} s")
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
