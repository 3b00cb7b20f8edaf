"""Bulk probe sizing: whole blocks, bounded, growing with the link, about a second long; a
round of probes ends once one was long enough to time or as big as allowed."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from sharedllm.mesh.link_stats import (
    PROBE_BLOCK_BYTES,
    PROBE_TARGET_S,
    PeerLink,
    bandwidth_at_most,
    next_probe_bytes,
)

LARGEST = 4 * 1024 * 1024


@given(st.floats(0.0, 1e6), st.floats(0.0, 1e6))
def test_a_probe_is_whole_blocks_bounded_and_grows_with_the_link(low: float, high: float) -> None:
    low, high = sorted((low, high))
    small, big = next_probe_bytes(low, LARGEST), next_probe_bytes(high, LARGEST)
    for size in (small, big):
        assert PROBE_BLOCK_BYTES <= size <= LARGEST and size % PROBE_BLOCK_BYTES == 0
    assert small <= big


def test_a_probe_takes_about_the_target_time_where_the_bounds_allow() -> None:
    size = next_probe_bytes(16.0, LARGEST)  # 16 Mbit/s: 2 MB a second
    assert abs(size * 8 / 16e6 - PROBE_TARGET_S) < PROBE_BLOCK_BYTES * 8 / 16e6
    assert next_probe_bytes(1.0, LARGEST) == PROBE_BLOCK_BYTES  # a slow link: one block
    assert next_probe_bytes(10_000.0, LARGEST) == LARGEST


def test_an_unfinished_probe_bounds_the_bandwidth() -> None:
    assert bandwidth_at_most(PROBE_BLOCK_BYTES, 20.0) < 0.11


@given(st.lists(st.floats(1e-6, 100.0), min_size=1, max_size=20))
def test_a_round_of_probes_grows_until_one_is_timed_and_never_past_the_largest(
    seconds_each: list[float],
) -> None:
    link = PeerLink()
    for seconds in seconds_each:
        size = link.probe_size(LARGEST)
        assert PROBE_BLOCK_BYTES <= size <= LARGEST
        again = link.probed(size, seconds, LARGEST)
        assert link.bandwidth_mbps == size * 8 / seconds / 1e6
        assert again == (seconds < PROBE_TARGET_S / 4 and size < LARGEST)
        if not again:
            break


def test_a_slow_link_is_probed_once_and_a_timed_out_probe_starts_small_again() -> None:
    link = PeerLink()
    assert not link.probed(PROBE_BLOCK_BYTES, 2.0, LARGEST)  # 1 Mbit/s: long enough to time
    link.probe_bytes = LARGEST
    link.probe_timed_out(LARGEST, 20.0)
    assert link.probe_bytes == PROBE_BLOCK_BYTES and link.bandwidth_mbps is not None
    assert link.bandwidth_mbps <= LARGEST * 8 / 20.0 / 1e6
