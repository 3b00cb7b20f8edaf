"""Values users write in settings that need more than a type: sizes and API hosts (pure)."""

from __future__ import annotations

import ipaddress
import re


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in "512MB", "6GiB", "1.5g" or "1048576" (K/M/G/T, decimal or binary)."""
    found = _SIZE.match(text)
    if found is None:
        raise ValueError("expected a size such as 512MB, 6GiB or 8G")
    number, unit, binary = found.groups()
    base = 1024 if binary else 1000
    power = "kmgt".find(unit.lower()) + 1 if unit else 0
    size = int(float(number) * base**power)
    if size <= 0:
        raise ValueError("the size must be positive")
    return size
