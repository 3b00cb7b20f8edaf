"""The demand this node's API sees for each model: requests in flight, averaged over time (pure).

The meter integrates the count of a model's requests in flight over time into ten-second
buckets (request-seconds per bucket), so that a bucket's sum over its length is the average
number in flight then, whatever the requests' lengths (Little's law). `report` gives, per
model, the average over the last half minute and each bucket of the last two minutes: what
`scheduler.replica_demand` grows and shrinks replicas by, once summed over the mesh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ...scheduler.replica_demand import DEMAND_FIGURES

BUCKET_S = 10.0
RECENT_BUCKETS = 3  # the last half minute
PEAK_BUCKETS = DEMAND_FIGURES  # the last two minutes
MAX_METERED_MODELS = 32  # models measured at once; requests for more are not measured


@dataclass
class _Model:
    since: float  # integrated up to here
    in_flight: int = 0
    buckets: dict[int, float] = field(default_factory=dict)  # bucket -> request-seconds


@dataclass
class DemandMeter:
    _models: dict[str, _Model] = field(default_factory=dict)

    def change(self, model_id: str, now: float, delta: int) -> None:
        """A request for `model_id` started (+1) or ended (-1) at `now`."""
        model = self._models.get(model_id)
        if model is None:
            self._forget_idle(now)
            if delta <= 0 or len(self._models) >= MAX_METERED_MODELS:
                return
            model = self._models[model_id] = _Model(since=now)
        _advance(model, now)
        model.in_flight = max(0, model.in_flight + delta)

    def report(self, now: float) -> dict[str, list[float]]:
        """`{model: [recent, bucket, ...]}` for every model with demand in the last two
        minutes: the average over the last half minute, then each full bucket's average,
        newest first, rounded to hundredths (as gossiped)."""
        self._forget_idle(now)
        answer = {}
        current = _bucket(now)
        window = (RECENT_BUCKETS - 1) * BUCKET_S + (now - current * BUCKET_S)
        for model_id, model in sorted(self._models.items()):  # all advanced to `now`
            recent_sum = sum(model.buckets.get(current - b, 0.0) for b in range(RECENT_BUCKETS))
            recent = recent_sum / window
            full = [
                model.buckets.get(current - back, 0.0) / BUCKET_S for back in range(1, PEAK_BUCKETS)
            ]
            while full and round(full[-1], 2) == 0:
                full.pop()  # the quiet old buckets need no bytes in gossip
            answer[model_id] = [round(value, 2) for value in (recent, *full)]
        return answer

    def _forget_idle(self, now: float) -> None:
        for model_id, model in list(self._models.items()):
            _advance(model, now)
            if model.in_flight == 0 and not model.buckets:
                del self._models[model_id]


def _bucket(at: float) -> int:
    return math.floor(at / BUCKET_S)


def _advance(model: _Model, now: float) -> None:
    """Adds the requests in flight since `model.since` to the buckets and drops buckets older
    than two minutes."""
    oldest = _bucket(now) - PEAK_BUCKETS + 1
    start = max(model.since, oldest * BUCKET_S)
    if model.in_flight and now > start:
        at = start
        while at < now:
            bucket = _bucket(at)
            end = min(now, max((bucket + 1) * BUCKET_S, at + 1e-6))  # float rounding
            model.buckets[bucket] = model.buckets.get(bucket, 0.0) + model.in_flight * (end - at)
            at = end
    model.since = max(model.since, now)
    for bucket in [b for b in model.buckets if b < oldest]:
        del model.buckets[bucket]
