"""A limit on failed data-plane handshakes per source address (sans-I/O: the caller gives `now`).

Authenticating a connection costs a TLS handshake and a signature check; a stranger can make
us pay that as often as it likes. A source address whose handshakes keep failing is closed at
once, before TLS, until its window has passed. Members on the same address (NAT, one host)
fail rarely — a revoked node retries every few seconds — and stay far under the limit.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class FailedHandshakeLimiter:
    max_failures: int = 20  # per source address per window
    window_s: float = 10.0
    max_sources: int = 4096  # addresses tracked; the longest quiet are forgotten first
    _windows: OrderedDict[str, tuple[float, int]] = field(default_factory=OrderedDict)

    def allows(self, source: str, now: float) -> bool:
        window = self._windows.get(source)
        if window is None:
            return True
        started, failures = window
        if now - started >= self.window_s:
            del self._windows[source]
            return True
        return failures < self.max_failures

    def failed(self, source: str, now: float) -> None:
        started, failures = self._windows.pop(source, (now, 0))
        if now - started >= self.window_s:
            started, failures = now, 0
        self._windows[source] = (started, failures + 1)  # now the most recent
        while len(self._windows) > self.max_sources:
            self._windows.popitem(last=False)

    def tracked(self) -> int:
        return len(self._windows)
