"""The weight-sharing protocol's messages (requests, manifests, tensor answers) and the token
bucket that paces a holder's sending (pure)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ...mesh import records
from ...mesh.records import RecordError

WEIGHTS = "/sharedllm/weights/1"
ENTRY_NAME = re.compile(r"^[0-9a-f]{16}$")
CHUNK_BYTES = 1024 * 1024
MAX_LAYER = 1_000_000
ANSWER_TIMEOUT_S = 600.0  # a holder may hash a few GB before it answers a manifest request
RECEIVE_TIMEOUT_S = 30.0  # a stream that brings nothing for this long is dropped and resumed


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
        if not 0 <= first <= last <= MAX_LAYER or offset < 0:
            raise RecordError("weights request out of range")
        if kind == "tensor" and not ENTRY_NAME.match(entry):
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
            or not ENTRY_NAME.match(item[2])
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
