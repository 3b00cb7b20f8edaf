"""Speculative decoding in the cost model: when drafting tokens pays on a split (pure).

With n-gram speculation the primary's engine drafts tokens from n-grams already in the text
and checks them in the same pass as the token it computes anyway. A pass still costs every
worker one round trip, but yields 1 + (drafts accepted) tokens; each drafted token adds a
share of the model's compute to the pass (on a CPU the output head alone is a big matrix per
token). Per generated token, with `a` drafts accepted and `d` drafts checked per token:

    seconds = (1 - a) x plain + d x per_draft

`plain` is the placement's time per token without speculation (compute and round trips);
`per_draft` is what one drafted token adds. How many drafts a model's text accepts depends on
the workload (a copy accepts nearly all, free chat few), so the mesh learns `a` and `d` from
its engines' counters (`DraftRate`); until it has, a prior that tries speculation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

SPECULATION_MODES = ("off", "ngram")
# What a model's holder allows the planner: `auto` lets it choose per placement.
POLICY_MODES: dict[str, tuple[str, ...]] = {
    "off": ("off",),
    "ngram": ("ngram",),
    "auto": ("off", "ngram"),
}


@dataclass(frozen=True)
class DraftRate:
    """Per generated token: drafts the model accepted, and drafts it checked."""

    accepted_per_token: float
    drafted_per_token: float
    tokens: int = 0  # generated tokens the figures rest on (0: assumed, not learned)

    @staticmethod
    def of(accepted: float, drafted: float, tokens: int) -> DraftRate | None:
        """The rate of counted tokens; None when the counts cannot be an engine's (an accepted
        draft is a generated token, so at most one per token, and never more than drafted)."""
        if not all(math.isfinite(v) and v >= 0 for v in (accepted, drafted)) or tokens <= 0:
            return None
        if accepted > drafted or accepted > tokens or drafted > MAX_DRAFTED_PER_TOKEN * tokens:
            return None
        return DraftRate(accepted / tokens, drafted / tokens, tokens)


# ngram-mod drafts up to 64 tokens per pass; a pass yields at least one token.
MAX_DRAFTED_PER_TOKEN = 64.0
# Before anything is learned: a third of tokens accepted from drafts of ~0.6 per token, enough
# for speculation to be tried (and learned) wherever it could pay, as on a split with RTTs.
PRIOR_RATE = DraftRate(0.33, 0.6, 0)


@dataclass(frozen=True)
class SpeculationPolicy:
    """The speculation modes a model's holder allows, and the draft rate learned so far."""

    modes: tuple[str, ...] = ("off",)
    rate: DraftRate = PRIOR_RATE

    @staticmethod
    def named(policy: str, rate: DraftRate | None = None) -> SpeculationPolicy:
        """The policy a holder's setting names (unknown names allow only `off`)."""
        return SpeculationPolicy(POLICY_MODES.get(policy, ("off",)), rate or PRIOR_RATE)

    def only(self, mode: str) -> SpeculationPolicy | None:
        """This policy held to `mode` (how a standing placement is judged); None if the holder
        no longer allows it."""
        return replace(self, modes=(mode,)) if mode in self.modes else None


def seconds_per_token(plain_s: float, per_draft_s: float, mode: str, rate: DraftRate) -> float:
    if mode == "off":
        return plain_s
    return (1.0 - rate.accepted_per_token) * plain_s + rate.drafted_per_token * per_draft_s


def choose_mode(plain_s: float, per_draft_s: float, policy: SpeculationPolicy) -> str:
    """The allowed mode with the least predicted time per token (the first on a tie)."""
    return min(
        policy.modes,
        key=lambda mode: seconds_per_token(plain_s, per_draft_s, mode, policy.rate),
    )


NO_SPECULATION = SpeculationPolicy()
