"""Bulk probe sizing: whole blocks, bounded, growing with the link, about a second long."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from sharedllm.mesh.link_stats import (
    PROBE_BLOCK_BYTES,
    PROBE_TARGET_S,
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
