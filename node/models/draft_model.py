"""The draft model a node offers for its model: a small model of the same vocabulary that
drafts tokens for speculative decoding on the primary, all of it local.

llama.cpp drafts with one model for another only when their tokenizers agree; the node checks
that before it offers the pair, so that a placement never starts an engine that refuses it. A
draft named by the user that does not fit is an error that says why; the embedded default model
is offered as a draft on its own only where it matches and is much smaller than the model.
"""

from __future__ import annotations

from pathlib import Path

from .default_model import DEFAULT_MODEL_FILE
from .model_file import ModelFileError, ModelInfo, inspect_model
from .model_kind import inferred_kind

# A draft pays when its pass costs a small share of the model's: the default model is offered
# for models at least this many times its size.
MIN_SIZE_RATIO_FOR_DEFAULT = 4.0


def check_draft(model: ModelInfo, draft: ModelInfo) -> str | None:
    """Why `draft` cannot draft for `model`, or None when it can."""
    if inferred_kind(draft.profile.architecture, draft.pooling_type) != "text":
        return "it does not generate text"
    if not draft.vocabulary or draft.vocabulary != model.vocabulary:
        return "its vocabulary (tokens and special tokens) differs from the model's"
    if draft.size_bytes >= model.size_bytes:
        return "it is not smaller than the model"
    return None


def draft_for(model: ModelInfo, named: Path | None, cache_dir: Path) -> ModelInfo | None:
    """The draft this node offers for `model`: `named` (ModelFileError if it cannot draft for
    it), else the embedded default model where it is already in the cache and fits."""
    if named is not None:
        draft = inspect_model(named)
        if (problem := check_draft(model, draft)) is not None:
            raise ModelFileError(f"draft model {named} cannot draft for {model.path}: {problem}")
        return draft
    default = cache_dir / "models" / DEFAULT_MODEL_FILE
    if default.resolve() == model.path.resolve() or not default.is_file():
        return None
    try:
        draft = inspect_model(default)
    except ModelFileError:
        return None
    big_enough = model.size_bytes >= MIN_SIZE_RATIO_FOR_DEFAULT * draft.size_bytes
    return draft if big_enough and check_draft(model, draft) is None else None
