"""The one decoder of API request bodies: a JSON object that the engine can take as it is.

Python's `json` accepts what llama-server refuses with a 500 (`NaN`, `Infinity`, numbers that
overflow to infinity, strings holding a lone surrogate) and fails with a `RecursionError` on a
body nested 100,000 deep. Each of these is the client's mistake and gets a 400 from the node.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 128


class RequestBodyError(ValueError):
    """The body is not a JSON object the engine can take (the message says why)."""


def _no_constants(name: str) -> Any:
    raise RequestBodyError(f"request body holds {name}, which is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RequestBodyError(f"request body holds a number out of range ({text[:40]})")
    return value


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body, parse_constant=_no_constants, parse_float=_finite)
    except RecursionError:
        raise RequestBodyError(f"request body is nested deeper than {MAX_DEPTH} levels") from None
    except RequestBodyError:
        raise
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestBodyError(f"request body is not valid JSON: {err}") from None
    if not isinstance(payload, dict):
        raise RequestBodyError("request body must be a JSON object")
    _check_values(payload)
    return payload


def _check_values(payload: dict[str, Any]) -> None:
    """Depth and Unicode, walked without recursion."""
    pending: list[tuple[Any, int]] = [(payload, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > MAX_DEPTH:
            raise RequestBodyError(f"request body is nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, str):
            _check_text(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key)
                pending.append((item, depth + 1))
        elif isinstance(value, list):
            pending.extend((item, depth + 1) for item in value)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestBodyError("request body holds a string that is not valid Unicode") from None
