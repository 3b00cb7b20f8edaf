"""What members gossip about speculative drafts: the rates their engines learned, and the
draft models they hold for a model (pure).

Both come from peers, so both are checked and bounded like every other gossiped value: an
impossible rate, a malformed profile or an unknown mode is dropped, never trusted.
"""

from __future__ import annotations

from ..scheduler.model_profile import ModelProfile, profile_from_dict
from ..scheduler.speculation import DRAFTING_MODES, DraftRate
from .gossip_values import by_model, is_count, is_finite

MAX_DRAFT_TOKENS = 10**9  # tokens a reported rate may rest on (bounds one member's weight)
MAX_RATE_ENTRIES = 32  # models one node reports draft rates for; more are ignored
ModeRate = tuple[str, str, DraftRate]  # (model id, speculation mode, rate)


def draft_rate_entries(raw: object) -> tuple[ModeRate, ...]:
    """A member's gossiped draft rates, `{model: {mode: [accepted per token, drafted per
    token, tokens]}}` (a bare list is an n-gram rate, as nodes before draft models gossip
    it): malformed or impossible entries are dropped, and only the first `MAX_RATE_ENTRIES`
    models count."""
    found = []
    for model_id, figures in by_model(raw, MAX_RATE_ENTRIES):
        by_mode = {"ngram": figures} if isinstance(figures, list | tuple) else figures
        if not isinstance(by_mode, dict):
            continue
        for mode in DRAFTING_MODES:
            if (rate := _gossiped_rate(by_mode.get(mode))) is not None:
                found.append((model_id, mode, rate))
    return tuple(found)


def _gossiped_rate(figures: object) -> DraftRate | None:
    """`[accepted per token, drafted per token, tokens]`, if well formed and possible."""
    if not isinstance(figures, list | tuple) or len(figures) != 3:
        return None
    accepted, drafted, tokens = figures
    if is_finite(accepted) and is_finite(drafted) and is_count(tokens) and tokens > 0:
        tokens = min(tokens, MAX_DRAFT_TOKENS)
        return DraftRate.of(accepted * tokens, drafted * tokens, tokens)
    return None


def draft_profile(entry: object) -> ModelProfile | None:
    """The draft model a holder's model entry offers (`{"draft": {"profile": ...}}`): its
    profile, or None when it offers none or a malformed one."""
    draft = entry.get("draft") if isinstance(entry, dict) else None
    if not isinstance(draft, dict):
        return None
    try:
        return profile_from_dict(draft.get("profile"))
    except ValueError:
        return None
