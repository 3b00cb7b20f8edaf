"""Anti-entropy gossip of signed node states (sans-I/O).

Each node publishes one state: a msgpack map (capacity, addresses, links, its membership proof,
revocations it issued...) with a version that only grows, signed by its own key. Versions are
derived from the publisher's clock (`max(previous + 1, now in ms)`), so a node that restarts
with no memory still publishes newer versions than before.

Exchange is push-pull: a node sends a digest {origin: version} to a peer; the peer answers with
the states the sender lacks or has older, plus the origins it wants; the sender sends those.
Every entry must carry its origin's signature (the key is inside the peer id), and a newer
version replaces an older one, so merging is commutative, idempotent and convergent.
"""

from __future__ import annotations

import array
import functools
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from . import records
from .identity import NodeIdentity, public_key_of_peer_id, verify
from .records import RecordError

MAX_DIGEST_ENTRIES = 10_000
MAX_STATE_BYTES = 32 * 1024
# A digest or exchange names every member: with 10,000 members that is ~600 KB.
MAX_LISTING_BYTES = 768 * 1024
EXCHANGE_STATE_BUDGET = 128 * 1024  # states per exchange message, in encoded bytes
MAX_STATES_PER_MESSAGE = 256
_VERSION_CODE = "Q"  # array type code of an unsigned 64-bit number
_VERSION_BYTES = 8
assert array.array(_VERSION_CODE).itemsize == _VERSION_BYTES


class StateTooLargeError(ValueError):
    """Our own state would exceed the size every peer enforces (`MAX_STATE_BYTES`)."""


@dataclass(frozen=True)
class SignedState:
    origin: str
    version: int
    payload: bytes  # msgpack map
    signature: bytes = b""

    KIND = "state"

    def fields(self) -> list[Any]:
        return [self.origin, self.version, self.payload]

    @staticmethod
    def publish(identity: NodeIdentity, version: int, payload: Mapping[str, Any]) -> SignedState:
        body: bytes = msgpack.packb(dict(payload), use_bin_type=True)
        if len(body) > MAX_STATE_BYTES:
            raise StateTooLargeError(f"state of {len(body)} bytes exceeds {MAX_STATE_BYTES}")
        draft = SignedState(identity.peer_id, version, body)
        signature = identity.sign(records.signing_bytes(draft.KIND, draft.fields()))
        return SignedState(draft.origin, version, body, signature)

    def encode(self) -> bytes:
        return self._encoded

    @functools.cached_property
    def _encoded(self) -> bytes:
        """A state is sent many times and never changes: encode it once."""
        return records.encode(self.KIND, [*self.fields(), self.signature])

    @staticmethod
    def decode(data: bytes) -> SignedState:
        return _decoded_state(bytes(data))

    def signature_ok(self) -> bool:
        return self._signature_ok

    @functools.cached_property
    def _signature_ok(self) -> bool:
        """Checked once per decoded state: a state that comes again (from other peers, or to
        other nodes of the simulator) is the same object (see `_decoded_state`)."""
        try:
            key = public_key_of_peer_id(self.origin)
        except ValueError:
            return False
        return verify(key, self.signature, records.signing_bytes(self.KIND, self.fields()))

    def content(self) -> dict[str, Any]:
        """The payload as a map (a new dict; nested values are shared: do not modify them);
        `RecordError` if it is not one."""
        value = _unpacked_payload(self.payload)
        if value is None:
            raise RecordError("state payload is not a msgpack map")
        return dict(value)


@functools.lru_cache(maxsize=8192)
def _decoded_state(data: bytes) -> SignedState:
    """A state reaches a node from several peers (and, in the simulator, every node in one
    process): decode each encoding once. States are immutable, so sharing them is safe."""
    origin, version, payload, signature = records.decode(
        data, SignedState.KIND, [str, int, bytes, bytes]
    )
    if len(payload) > MAX_STATE_BYTES or version < 0:
        raise RecordError("state too large or with a negative version")
    return SignedState(origin, version, payload, signature)


@functools.lru_cache(maxsize=4096)
def _unpacked_payload(payload: bytes) -> dict[str, Any] | None:
    """A state is decoded by every node it reaches (in the simulator, all in one process)
    and several times on each: unpack each payload once."""
    try:
        value = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError):
        return None
    return value if isinstance(value, dict) else None


def next_version(previous: int, now: float) -> int:
    return max(previous + 1, int(now * 1000))


@dataclass(frozen=True)
class Digest:
    """{origin: version} of every state a node holds.

    A digest names every member and is decoded by every peer it reaches, so it goes as two
    flat fields rather than a map of a thousand entries: the origins joined by newlines (peer
    ids never contain one) and the versions as little-endian unsigned 64-bit numbers (what
    msgpack allows a state's version to be), in the same order. That decodes ~1.8x faster.
    """

    versions: Mapping[str, int]

    KIND = "digest"

    def encode(self) -> bytes:
        numbers = array.array(_VERSION_CODE, self.versions.values())
        if sys.byteorder == "big":
            numbers.byteswap()
        return records.encode(self.KIND, ["\n".join(self.versions), numbers.tobytes()])

    @staticmethod
    def decode(data: bytes) -> Digest:
        origins, packed = records.decode(
            data, Digest.KIND, [str, bytes], max_bytes=MAX_LISTING_BYTES
        )
        count, odd = divmod(len(packed), _VERSION_BYTES)
        if odd:
            raise RecordError("digest versions are not whole 64-bit numbers")
        if count > MAX_DIGEST_ENTRIES:
            raise RecordError(f"digest of {count} entries exceeds {MAX_DIGEST_ENTRIES}")
        names = origins.split("\n") if origins else []
        if len(names) != count:
            raise RecordError("digest names and versions differ in number")
        numbers = array.array(_VERSION_CODE, packed)
        if sys.byteorder == "big":
            numbers.byteswap()
        versions = dict(zip(names, numbers, strict=True))
        if len(versions) != count:
            raise RecordError("digest names a member twice")
        return Digest(versions)


@dataclass(frozen=True)
class Exchange:
    """Answer to a digest (states the asker lacks, and what we want), or the final push."""

    states: tuple[SignedState, ...]
    wanted: tuple[str, ...]
    more: bool = False  # states were left out to keep the message small: ask again soon

    KIND = "exchange"

    def encode(self) -> bytes:
        states = [s.encode() for s in self.states]
        return records.encode(self.KIND, [states, list(self.wanted), self.more])

    @staticmethod
    def decode(data: bytes) -> Exchange:
        states, wanted, more = records.decode(
            data,
            Exchange.KIND,
            [list, list, bool],
            max_bytes=MAX_LISTING_BYTES,
            max_items=MAX_DIGEST_ENTRIES,
        )
        if len(states) > MAX_STATES_PER_MESSAGE or len(wanted) > MAX_DIGEST_ENTRIES:
            raise RecordError("exchange message too large")
        if not all(isinstance(s, bytes) for s in states):
            raise RecordError("exchange states must be byte strings")
        return Exchange(
            tuple(SignedState.decode(s) for s in states),
            records.string_list(wanted, "wanted", MAX_DIGEST_ENTRIES),
            more,
        )


@dataclass
class MergeStats:
    accepted: int = 0
    stale: int = 0
    forged: int = 0
    refused: int = 0  # well signed, but the origin is not a member


@dataclass
class GossipStore:
    """The latest signed state of every origin this node has accepted."""

    states: dict[str, SignedState] = field(default_factory=dict)
    stats: MergeStats = field(default_factory=MergeStats)
    oldest_version: int = 0  # states older than this are refused (see `prune`)
    # origin -> version of `states`, kept alongside: digests and answers compare these maps
    # (in a formed mesh they are mostly equal, which one dict comparison tells).
    _versions: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._versions = {origin: s.version for origin, s in self.states.items()}

    def digest(self) -> Digest:
        return Digest(dict(self._versions))

    def merge(
        self, incoming: Iterable[SignedState], admit: Callable[[SignedState], bool] | None = None
    ) -> list[SignedState]:
        """Keeps each state that is signed by its origin and newer than ours.

        `admit(state) -> bool`, when given, decides membership (e.g. checks the proof inside).
        Returns the states accepted, for the caller to act on.
        """
        accepted: list[SignedState] = []
        for state in incoming:
            current = self.states.get(state.origin)
            if state.version < self.oldest_version or (
                current is not None and state.version <= current.version
            ):
                self.stats.stale += 1
                continue
            if not state.signature_ok():
                self.stats.forged += 1
                continue
            if admit is not None and not admit(state):
                self.stats.refused += 1
                continue
            self.states[state.origin] = state
            self._versions[state.origin] = state.version
            self.stats.accepted += 1
            accepted.append(state)
        return accepted

    def answer(self, remote: Digest) -> Exchange:
        """The states `remote` lacks or has older (bounded), and the origins where it is newer."""
        ours, theirs = self._versions, remote.versions
        if ours == theirs:
            return Exchange((), (), False)
        missing, more = _within_budget(
            self.states[origin]
            for origin, version in ours.items()
            if theirs.get(origin, -1) < version
        )
        wanted = [origin for origin, version in theirs.items() if version > ours.get(origin, -1)]
        return Exchange(tuple(missing), tuple(wanted), more)

    def provide(self, wanted: Iterable[str]) -> Exchange:
        states, more = _within_budget(
            self.states[o] for o in sorted(set(wanted)) if o in self.states
        )
        return Exchange(tuple(states), (), more)

    def forget(self, origin: str) -> None:
        self.states.pop(origin, None)
        self._versions.pop(origin, None)

    def prune(self, oldest_version: int, keep: Callable[[str], bool]) -> list[str]:
        """Forgets every state older than `oldest_version` (but those whose origin `keep`s)
        and refuses such states from now on; returns their origins. Versions follow their
        publisher's wall clock and live members republish often, so with every node pruning
        at the same age, a long-gone member's state cannot come back from a peer that kept it."""
        self.oldest_version = max(self.oldest_version, oldest_version)
        ancient = [
            origin
            for origin, version in self._versions.items()
            if version < self.oldest_version and not keep(origin)
        ]
        for origin in ancient:
            self.forget(origin)
        return ancient


def _within_budget(states: Iterable[SignedState]) -> tuple[list[SignedState], bool]:
    """As many states as fit one message (the rest follow in later rounds), and whether some
    were left out."""
    chosen: list[SignedState] = []
    used = 0
    for state in states:
        size = len(state.encode())
        if len(chosen) >= MAX_STATES_PER_MESSAGE or used + size > EXCHANGE_STATE_BUDGET:
            return chosen, True
        chosen.append(state)
        used += size
    return chosen, False
