"""How Ollama's `/api/tags` and `/api/show` describe a model, from what the mesh knows of it
(pure): the shape its holders gossip, read from the GGUF header, as GGUF-style keys."""

from __future__ import annotations

import datetime
from typing import Any

from ..serving.upstream import ModelEntry

# What Ollama clients read to decide which calls a model takes.
_CAPABILITIES = {"text": ["completion", "tools"], "embedding": ["embedding"], "rerank": []}


def model_tag(entry: ModelEntry) -> dict[str, Any]:
    """One model as `/api/tags` and `/api/ps` list it."""
    size = 0 if entry.profile is None else entry.profile.total_weight_bytes
    return {
        "name": entry.model_id,
        "model": entry.model_id,
        "modified_at": _iso(entry.created),
        "size": size,
        "digest": "",
        "details": model_details(entry),
    }


def model_details(entry: ModelEntry) -> dict[str, Any]:
    family = "" if entry.profile is None else entry.profile.architecture
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family] if family else [],
        "parameter_size": "",  # the header gives sizes in bytes, not a parameter count
        "quantization_level": "",
    }


def model_show(entry: ModelEntry) -> dict[str, Any]:
    """`/api/show`'s answer: the details and the GGUF keys that describe the model's shape."""
    return {
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": model_details(entry),
        "model_info": _model_info(entry),
        "capabilities": list(_CAPABILITIES.get(entry.kind, [])),
        "modified_at": _iso(entry.created),
    }


def _model_info(entry: ModelEntry) -> dict[str, Any]:
    profile = entry.profile
    if profile is None:
        return {}
    arch = profile.architecture
    return {
        "general.architecture": arch,
        "general.name": profile.name,
        f"{arch}.block_count": profile.layer_count,
        f"{arch}.context_length": profile.context_length,
        f"{arch}.embedding_length": profile.embedding_length,
        f"{arch}.vocab_size": profile.vocab_size,
        "sharedllm.served_context_length": entry.context,
    }


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat()
