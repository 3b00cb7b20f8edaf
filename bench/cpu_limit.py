"""A CPU limit for processes a benchmark starts: a cgroup of ours holding them to a share of
one core (cgroup v2's `cpu.max`, or v1's CFS quota), to stand for a slower machine."""

from __future__ import annotations

import contextlib
from pathlib import Path

_ROOT = Path("/sys/fs/cgroup")
_PERIOD_US = 100_000


class CpuLimit:
    def __init__(self, name: str, share: float) -> None:
        quota = max(1000, int(share * _PERIOD_US))
        if (_ROOT / "cgroup.controllers").exists():  # v2: one tree
            self.path = _ROOT / name
            self.path.mkdir()
            (self.path / "cpu.max").write_text(f"{quota} {_PERIOD_US}\n")
        else:  # v1: the cpu controller's own tree
            self.path = _ROOT / "cpu" / name
            self.path.mkdir()
            (self.path / "cpu.cfs_period_us").write_text(f"{_PERIOD_US}\n")
            (self.path / "cpu.cfs_quota_us").write_text(f"{quota}\n")

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv`, run inside the limit from its first instruction (its children too)."""
        procs = str(self.path / "cgroup.procs")
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *argv]

    def remove(self) -> None:
        """Removes the group (its processes must have ended)."""
        with contextlib.suppress(OSError):
            self.path.rmdir()
