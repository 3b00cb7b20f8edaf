"""Checks on single values a member gossiped: numbers a plan may rest on (pure).

A member's state is a peer's word: a count may be a bool, a float may be NaN or infinite. Each
reader of gossip keeps only values these checks pass.
"""

from __future__ import annotations

import math
from typing import TypeGuard


def is_finite(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_positive(value: object) -> TypeGuard[int | float]:
    return is_finite(value) and value > 0
