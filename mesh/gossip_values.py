"""Checks on single values a member gossiped: numbers a plan may rest on (pure).

A member's state is a peer's word: a count may be a bool, a float may be NaN or infinite. Each
reader of gossip keeps only values these checks pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import islice
from typing import TypeGuard

from ..scheduler.placement import is_model_id


def is_finite(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_positive(value: object) -> TypeGuard[int | float]:
    return is_finite(value) and value > 0


def by_model(raw: object, most: int) -> Iterator[tuple[str, object]]:
    """`{model: value}` as gossiped: the entries with a well-formed model id, among the first
    `most` (a member reports about at most that many models)."""
    if not isinstance(raw, dict):
        return
    for model_id, value in islice(raw.items(), most):
        if isinstance(model_id, str) and is_model_id(model_id):
            yield model_id, value
