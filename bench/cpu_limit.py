"""A CPU limit for processes a benchmark starts: a cgroup of ours holding them to a share of
one core (cgroup v2's `cpu.max`, or v1's CFS quota), to stand for a slower machine."""

from __future__ import annotations

import contextlib
from pathlib import Path

_ROOT = Path("/sys/fs/cgroup")
# A short period: a slow machine is slow at every step, while a quota per 100 ms (the default)
# lets work of a few milliseconds, such as a token's layers, run at full speed. The kernel
# wants a quota of 1 ms at least, so a quarter share is the least this period allows.
_PERIOD_US = 4_000
_LEAST_QUOTA_US = 1_000


class CpuLimit:
    def __init__(self, name: str, share: float) -> None:
        quota = max(_LEAST_QUOTA_US, int(share * _PERIOD_US))
        v2 = (_ROOT / "cgroup.controllers").exists()  # v2: one tree; v1: cpu has its own
        self.path = _ROOT / name if v2 else _ROOT / "cpu" / name
        self.path.mkdir()
        try:
            if v2:
                (self.path / "cpu.max").write_text(f"{quota} {_PERIOD_US}\n")
            else:
                (self.path / "cpu.cfs_period_us").write_text(f"{_PERIOD_US}\n")
                (self.path / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        except OSError:
            self.remove()
            raise

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv`, run inside the limit from its first instruction (its children too)."""
        procs = str(self.path / "cgroup.procs")
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *argv]

    def remove(self) -> None:
        """Removes the group (its processes must have ended)."""
        with contextlib.suppress(OSError):
            self.path.rmdir()
