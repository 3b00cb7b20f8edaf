"""What a model's speculative drafts yield, learned from its engine's counters (sans-I/O).

The primary reads its llama-server's `/metrics` now and then: tokens generated, drafted and
accepted since the engine started. The meter keeps each model's counts, for each way of
drafting (n-grams, a draft model), over a recent window of tokens (older ones weigh less as
new ones come), gossips them, and the planner predicts with them whether speculation pays on
the model's split. An engine that does not speculate teaches nothing about drafts; what was
learned is forgotten after half an hour without news, so that a placement that turned
speculation off tries it again (the workload may have changed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...scheduler.speculation import DRAFTING_MODES, DraftRate

MAX_METRICS_BYTES = 64 * 1024  # llama-server's /metrics is ~3 KB; more is not read
_PREFIX = "llamacpp:"
_NAMES = {
    "tokens_predicted_total": "tokens",
    "spec_decode_num_draft_tokens_total": "drafted",
    "spec_decode_num_accepted_tokens_total": "accepted",
}
MIN_LEARNED_TOKENS = 64  # fewer generated tokens say too little to plan by
MAX_METERED_ENGINES = 16  # engines (and models) one node meters at once
Engine = tuple[str, int]  # a model's engine here: (model id, epoch)
Learning = tuple[str, str]  # (model id, speculation mode)


@dataclass(frozen=True)
class EngineCounters:
    """llama-server's running totals since it started."""

    tokens: float
    drafted: float
    accepted: float


def parse_engine_counters(text: str) -> EngineCounters | None:
    """The counters in a Prometheus text exposition; None if one is missing or malformed."""
    if len(text) > MAX_METRICS_BYTES:
        return None
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        key = _NAMES.get(name.removeprefix(_PREFIX)) if name.startswith(_PREFIX) else None
        if key is None:
            continue
        try:
            number = float(value.strip())
        except ValueError:
            return None
        if not number >= 0 or number == float("inf"):
            return None
        found[key] = number
    if len(found) != len(_NAMES):
        return None
    return EngineCounters(found["tokens"], found["drafted"], found["accepted"])


@dataclass
class _Learned:
    accepted: float = 0.0
    drafted: float = 0.0
    tokens: float = 0.0
    at: float = 0.0


@dataclass
class DraftMeter:
    window_tokens: float = 4096.0  # the recent workload: older tokens weigh less
    forget_after_s: float = 1800.0
    _last: dict[Engine, EngineCounters] = field(default_factory=dict)
    _learned: dict[Learning, _Learned] = field(default_factory=dict)

    def observe(self, engine: Engine, counters: EngineCounters, mode: str, now: float) -> None:
        """One reading of an engine of a model, drafting in `mode`. Counters that went down
        belong to a restarted engine: they count from zero."""
        last = self._last.get(engine)
        if engine not in self._last and len(self._last) >= MAX_METERED_ENGINES:
            return
        self._last[engine] = counters
        if last is None or mode not in DRAFTING_MODES:
            return
        if counters.tokens < last.tokens or counters.drafted < last.drafted:
            last = EngineCounters(0.0, 0.0, 0.0)
        tokens = counters.tokens - last.tokens
        drafted, accepted = counters.drafted - last.drafted, counters.accepted - last.accepted
        if tokens <= 0 or not 0 <= accepted <= min(drafted, tokens):
            return
        key = (engine[0], mode)
        if key not in self._learned and len(self._learned) >= MAX_METERED_ENGINES:
            return
        learned = self._learned.setdefault(key, _Learned())
        learned.accepted += accepted
        learned.drafted += drafted
        learned.tokens += tokens
        learned.at = now
        if learned.tokens > self.window_tokens:
            keep = self.window_tokens / learned.tokens
            learned.accepted *= keep
            learned.drafted *= keep
            learned.tokens = self.window_tokens

    def forget(self, engine: Engine) -> None:
        """The engine stopped: a later one of its model starts from a new baseline."""
        self._last.pop(engine, None)

    def rates(self, now: float) -> dict[str, dict[str, DraftRate]]:
        """Each model's rate in each mode, learned over enough tokens, lately enough."""
        stale = [k for k, got in self._learned.items() if now - got.at > self.forget_after_s]
        for key in stale:
            del self._learned[key]
        rates: dict[str, dict[str, DraftRate]] = {}
        for (model_id, mode), learned in sorted(self._learned.items()):
            if learned.tokens >= MIN_LEARNED_TOKENS:
                rate = DraftRate.of(learned.accepted, learned.drafted, int(learned.tokens))
                if rate is not None:
                    rates.setdefault(model_id, {})[mode] = rate
        return rates

    def gossip(self, now: float) -> dict[str, dict[str, list[float | int]]]:
        """`{model: {mode: [accepted per token, drafted per token, tokens]}}`, to two
        significant digits (plans need no finer, and a state that rarely changes is cheap to
        gossip)."""
        return {
            model_id: {
                mode: [
                    _coarse(r.accepted_per_token),
                    _coarse(r.drafted_per_token),
                    int(_coarse(r.tokens)),
                ]
                for mode, r in by_mode.items()
            }
            for model_id, by_mode in self.rates(now).items()
        }


def _coarse(value: float) -> float:
    return float(f"{value:.2g}")
