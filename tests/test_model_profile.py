"""Model profiles travel in gossip: they round-trip, and anything malformed from a peer is a
ValueError, never a crash or a silently wrong profile."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from sharedllm.scheduler.model_profile import ModelProfile, profile_from_dict, profile_to_dict

PROFILE = ModelProfile("m", "llama", (10, 20, 30), 5, 0, 1, 64, 128, 32000, 4096)


def test_round_trip() -> None:
    assert profile_from_dict(profile_to_dict(PROFILE)) == PROFILE


values = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4)


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(st.sampled_from(sorted(profile_to_dict(PROFILE))), values | st.lists(values))
)
def test_malformed_profiles_are_value_errors(changes: dict[str, Any]) -> None:
    data = {**profile_to_dict(PROFILE), **changes}
    try:
        profile = profile_from_dict(data)
    except ValueError:
        return
    assert all(isinstance(size, int) and size >= 0 for size in profile.layer_weight_bytes)
    assert profile.layer_count > 0
