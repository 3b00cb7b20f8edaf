"""Revocations as their own grow-only set, kept in step between members by a small exchange.

Revocations only grow and every node keeps all of them, so they cannot ride inside each node's
gossiped state (32 KiB: 170 revocations with a default reason filled it). A state carries only
a summary of its node's set (count and hash); a member whose summary differs from ours is
asked for the difference:

    A -> B  ids:    every peer A has revoked (32-byte keys, at most `MAX_REVOCATIONS`)
    B -> A  batch:  the keys of A's that B lacks, and B's revocations that A lacks
    A -> B  batch:  the revocations B asked for

Each batch carries at most `MAX_PER_BATCH` revocations, so a node far behind catches up over a
few exchanges. Merging is a set union of mesh-signed records: every order converges.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from . import records
from .identity import public_key_of_peer_id
from .membership import MAX_REVOCATIONS, Revocation
from .records import MAX_FRAME_BYTES, RecordError

REVOCATIONS = "/sharedllm/revocations/1"
MAX_PER_BATCH = 512  # a revocation encodes to < 1.1 KB (reasons may be UTF-8): under a frame
_KEY_BYTES = 32
_IDS_KIND = "revoked-ids"
_BATCH_KIND = "revocation-batch"


def summary_of(revoked: Iterable[str]) -> str:
    """`count:hash` of a set of revoked peer ids: equal summaries mean equal sets."""
    ids = sorted(revoked)
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
    return f"{len(ids)}:{digest}"


def _join_keys(peer_ids: Iterable[str]) -> bytes:
    return b"".join(public_key_of_peer_id(peer) for peer in peer_ids)


def _split_keys(data: bytes, limit: int) -> frozenset[bytes]:
    if len(data) % _KEY_BYTES or len(data) > limit * _KEY_BYTES:
        raise RecordError(f"a key list holds at most {limit} keys of {_KEY_BYTES} bytes")
    return frozenset(data[i : i + _KEY_BYTES] for i in range(0, len(data), _KEY_BYTES))


@dataclass(frozen=True)
class RevokedIds:
    """Every peer a node has revoked, as public keys."""

    keys: frozenset[bytes]

    @staticmethod
    def of(revocations: Mapping[str, Revocation]) -> RevokedIds:
        return RevokedIds(frozenset(public_key_of_peer_id(p) for p in revocations))

    def encode(self) -> bytes:
        return records.encode(_IDS_KIND, [b"".join(sorted(self.keys))])

    @staticmethod
    def decode(data: bytes) -> RevokedIds:
        (joined,) = records.decode(
            data, _IDS_KIND, [bytes], max_bytes=MAX_REVOCATIONS * _KEY_BYTES + 64
        )
        return RevokedIds(_split_keys(joined, MAX_REVOCATIONS))


@dataclass(frozen=True)
class RevocationBatch:
    """Keys the sender wants, and revocations the receiver lacks."""

    wanted: frozenset[bytes]
    revocations: tuple[Revocation, ...]

    def encode(self) -> bytes:
        body = [b"".join(sorted(self.wanted)), [r.encode() for r in self.revocations]]
        return records.encode(_BATCH_KIND, body)

    @staticmethod
    def decode(data: bytes) -> RevocationBatch:
        wanted, raw = records.decode(
            data, _BATCH_KIND, [bytes, list], max_bytes=MAX_FRAME_BYTES, max_items=MAX_PER_BATCH
        )
        revocations = []
        for item in raw:
            if not isinstance(item, bytes):
                raise RecordError("a revocation batch holds encoded revocations")
            revocations.append(Revocation.decode(item))
        return RevocationBatch(_split_keys(wanted, MAX_PER_BATCH), tuple(revocations))


def answer(ours: Mapping[str, Revocation], theirs: RevokedIds) -> RevocationBatch:
    """B's answer to A's ids: what B lacks of A's, and what A lacks of B's (each bounded)."""
    keys = {public_key_of_peer_id(peer): rev for peer, rev in ours.items()}
    wanted = sorted(theirs.keys - keys.keys())[:MAX_PER_BATCH]
    given = sorted(keys.keys() - theirs.keys)[:MAX_PER_BATCH]
    return RevocationBatch(frozenset(wanted), tuple(keys[key] for key in given))


def provide(ours: Mapping[str, Revocation], wanted: frozenset[bytes]) -> RevocationBatch:
    """A's last message: the revocations B asked for that A has."""
    keys = {public_key_of_peer_id(peer): rev for peer, rev in ours.items()}
    given = [keys[key] for key in sorted(wanted) if key in keys][:MAX_PER_BATCH]
    return RevocationBatch(frozenset(), tuple(given))
