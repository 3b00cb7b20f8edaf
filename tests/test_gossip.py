"""Gossip merge is commutative, idempotent and convergent; forged, stale and non-member states
are refused and counted; push-pull exchange spreads a state to every node in O(log N) rounds."""

from __future__ import annotations

import contextlib
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sharedllm.mesh import records
from sharedllm.mesh.gossip import Digest, Exchange, GossipStore, SignedState, next_version
from sharedllm.mesh.identity import NodeIdentity
from sharedllm.mesh.records import RecordError

_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
IDENTITIES = [NodeIdentity.from_seed(bytes([i + 1]) * 32) for i in range(6)]
STATES = [
    SignedState.publish(identity, version, {"ram": version * 10, "name": f"n{i}"})
    for i, identity in enumerate(IDENTITIES)
    for version in (1, 2, 3)
]


def _merged(states: list[SignedState]) -> dict[str, int]:
    store = GossipStore()
    store.merge(states)
    return {origin: s.version for origin, s in store.states.items()}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(STATES), max_size=30), st.randoms(use_true_random=False))
def test_merge_is_order_independent_and_idempotent(
    picked: list[SignedState], rng: random.Random
) -> None:
    shuffled = list(picked)
    rng.shuffle(shuffled)
    assert _merged(picked) == _merged(shuffled) == _merged(picked + picked)
    expected: dict[str, int] = {}
    for state in picked:
        expected[state.origin] = max(expected.get(state.origin, 0), state.version)
    assert _merged(picked) == expected


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from(STATES), max_size=20), st.lists(st.sampled_from(STATES), max_size=20)
)
def test_two_stores_converge_after_one_push_pull(
    left: list[SignedState], right: list[SignedState]
) -> None:
    a, b = GossipStore(), GossipStore()
    a.merge(left)
    b.merge(right)
    answer = b.answer(a.digest())
    a.merge(answer.states)
    b.merge(a.provide(answer.wanted).states)
    assert a.digest() == b.digest()


def test_forged_stale_and_refused_states_are_counted() -> None:
    store = GossipStore()
    good = SignedState.publish(IDENTITIES[0], 5, {"x": 1})
    spoofed = SignedState(IDENTITIES[1].peer_id, 9, good.payload, good.signature)  # origin spoofing
    assert store.merge([good, spoofed]) == [good]
    assert store.stats.forged == 1
    store.merge([SignedState.publish(IDENTITIES[0], 4, {"x": 0})])  # replayed old version
    assert store.stats.stale == 1
    outsider = SignedState.publish(IDENTITIES[2], 1, {})
    assert store.merge([outsider], admit=lambda s: s.origin != IDENTITIES[2].peer_id) == []
    assert store.stats.refused == 1


def test_codecs_round_trip_and_refuse_oversized_digests() -> None:
    state = STATES[0]
    assert SignedState.decode(state.encode()) == state
    assert state.content() == {"ram": 10, "name": "n0"}
    exchange = Exchange((state,), ("a",))
    assert Exchange.decode(exchange.encode()) == exchange
    digest = Digest({"a": 1})
    assert Digest.decode(digest.encode()) == digest
    with pytest.raises(RecordError):  # refused while decoding, before any use
        Digest.decode(Digest({f"p{i}": i for i in range(10_001)}).encode())


@given(
    st.dictionaries(
        st.text(_BASE58, min_size=1, max_size=60),  # peer ids
        st.integers(min_value=0, max_value=2**64 - 1),
        max_size=50,
    )
)
def test_digests_round_trip(versions: dict[str, int]) -> None:
    assert Digest.decode(Digest(versions).encode()).versions == versions


def test_a_digest_with_mismatched_or_repeated_entries_is_refused() -> None:
    for origins, packed in (("a\nb", bytes(8)), ("a", bytes(7)), ("a\na", bytes(16))):
        with pytest.raises(RecordError):
            Digest.decode(records.encode(Digest.KIND, [origins, packed]))


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=400))
def test_gossip_decoders_never_crash(data: bytes) -> None:
    for decoder in (SignedState.decode, Digest.decode, Exchange.decode):
        with contextlib.suppress(RecordError):
            decoder(data)


def test_versions_grow_across_restarts() -> None:
    assert next_version(0, 1000.0) == 1_000_000
    assert next_version(1_000_000, 1000.0) == 1_000_001
    assert next_version(5, 2000.0) == 2_000_000  # a restarted node starts above its old versions


@pytest.mark.parametrize("nodes", [16, 128, 1024])
def test_push_pull_spreads_a_state_in_log_n_rounds(nodes: int) -> None:
    rng = random.Random(nodes)
    stores = [GossipStore() for _ in range(nodes)]
    news = SignedState.publish(IDENTITIES[0], 1, {"hello": True})
    stores[0].merge([news])
    rounds = 0
    while any(news.origin not in s.states for s in stores):
        rounds += 1
        for i, store in enumerate(stores):
            other = rng.randrange(nodes - 1)
            peer = stores[other + (other >= i)]  # any node but this one
            answer = peer.answer(store.digest())
            store.merge(answer.states)
            peer.merge(store.provide(answer.wanted).states)
    print(f"{nodes} nodes: state reached everyone in {rounds} rounds")
    assert rounds <= 2 * math.ceil(math.log2(nodes)) + 2


def test_exchanges_stay_within_their_byte_budget_and_the_rest_follows() -> None:
    identities = [
        NodeIdentity.from_seed(bytes([7, i % 256, i // 256]) * 10 + b"xx") for i in range(300)
    ]
    store = GossipStore()
    store.merge([SignedState.publish(ident, 1, {"pad": "x" * 1500}) for ident in identities])
    receiver = GossipStore()
    rounds = 0
    while len(receiver.states) < 300:
        answer = store.answer(receiver.digest())
        decoded = Exchange.decode(answer.encode())  # within the record limits
        assert 0 < len(decoded.states) < 300
        receiver.merge(decoded.states)
        rounds += 1
    assert rounds >= 4  # 300 states of ~1.6 KB do not fit one 128 KB message
    assert Digest.decode(receiver.digest().encode()).versions == store.digest().versions


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(STATES), max_size=30), st.integers(0, 4))
def test_pruned_states_are_gone_and_never_come_back(states: list[SignedState], oldest: int) -> None:
    store = GossipStore()
    store.merge(states)
    keep = IDENTITIES[0].peer_id
    before = dict(store.digest().versions)
    pruned = store.prune(oldest, keep=lambda origin: origin == keep)
    left = store.digest().versions
    assert set(pruned) == {o for o, v in before.items() if v < oldest and o != keep}
    assert all(v >= oldest or o == keep for o, v in left.items())
    store.merge(states)  # a peer that still had them sends them again: refused
    assert all(v >= oldest or o == keep for o, v in store.digest().versions.items())
