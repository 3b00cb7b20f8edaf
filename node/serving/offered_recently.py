"""Models some member offered a moment ago: while the only holder restarts, clients must hear
"unavailable, retry" (503), not "no such model" (404), which OpenAI clients treat as final."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

DEFAULT_WINDOW_S = 600.0
MAX_REMEMBERED_MODELS = 256


class RecentlyOffered:
    """When each model was last offered by a live member (bounded: the oldest go first)."""

    def __init__(
        self, window_s: float = DEFAULT_WINDOW_S, max_models: int = MAX_REMEMBERED_MODELS
    ) -> None:
        self.window_s = window_s
        self.max_models = max_models
        self._last_offered: OrderedDict[str, float] = OrderedDict()

    def note(self, offered: Iterable[str], now: float) -> None:
        for model_id in offered:
            self._last_offered[model_id] = now
            self._last_offered.move_to_end(model_id)
        while len(self._last_offered) > self.max_models:
            self._last_offered.popitem(last=False)

    def gone_for(self, model_id: str, now: float) -> float | None:
        """Seconds since the model was last offered, if that is within the window."""
        seen = self._last_offered.get(model_id)
        if seen is None or now - seen > self.window_s:
            return None
        return now - seen

    def missing(self, offered: Iterable[str], now: float) -> list[str]:
        """The models offered within the window that are not offered now."""
        present = set(offered)
        return sorted(
            model_id
            for model_id in self._last_offered
            if model_id not in present and self.gone_for(model_id, now) is not None
        )
