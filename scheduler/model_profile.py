"""What the planner needs to know about a model: how many bytes each layer takes and costs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelProfile:
    """Sizes of a model's parts, read from its GGUF file.

    `layer_weight_bytes[i]` is the weight bytes of transformer block i. The embedding table and the
    output head are kept apart because where they live decides how many bytes cross a link per
    token. `output_bytes` is 0 when the model ties its output head to the embedding table.
    """

    name: str
    architecture: str
    layer_weight_bytes: tuple[int, ...]
    embedding_bytes: int
    output_bytes: int
    other_bytes: int
    kv_bytes_per_token_per_layer: int
    embedding_length: int
    vocab_size: int
    context_length: int

    @property
    def layer_count(self) -> int:
        return len(self.layer_weight_bytes)

    @property
    def total_weight_bytes(self) -> int:
        return (
            sum(self.layer_weight_bytes)
            + self.embedding_bytes
            + self.output_bytes
            + self.other_bytes
        )

    def kv_cache_bytes(self, layers: int, context: int) -> int:
        """Bytes of KV cache that `layers` layers need for `context` tokens."""
        return self.kv_bytes_per_token_per_layer * layers * context


_MAX_LAYERS = 4096
_INT_FIELDS = (
    "embedding_bytes",
    "output_bytes",
    "other_bytes",
    "kv_bytes_per_token_per_layer",
    "embedding_length",
    "vocab_size",
    "context_length",
)


def profile_to_dict(profile: ModelProfile) -> dict[str, Any]:
    """The profile as plain data (gossip carries it so that nodes without the file can plan)."""
    data: dict[str, Any] = {
        "name": profile.name,
        "architecture": profile.architecture,
        "layer_weight_bytes": list(profile.layer_weight_bytes),
    }
    data.update({key: getattr(profile, key) for key in _INT_FIELDS})
    return data


def profile_from_dict(data: object) -> ModelProfile:
    """Validates plain data from a peer; raises ValueError on anything malformed."""
    if not isinstance(data, dict):
        raise ValueError("a model profile must be a map")
    layers = data.get("layer_weight_bytes")
    if not isinstance(layers, list) or not 0 < len(layers) <= _MAX_LAYERS:
        raise ValueError(f"layer_weight_bytes must be a list of 1 to {_MAX_LAYERS} sizes")
    numbers = [*layers, *(data.get(key) for key in _INT_FIELDS)]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
        raise ValueError("model profile sizes must be non-negative integers")
    name, architecture = data.get("name"), data.get("architecture")
    if not isinstance(name, str) or not isinstance(architecture, str):
        raise ValueError("model profile name and architecture must be strings")
    return ModelProfile(
        name=name[:200],
        architecture=architecture[:100],
        layer_weight_bytes=tuple(layers),
        **{key: data[key] for key in _INT_FIELDS},
    )
