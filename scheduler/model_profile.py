"""What the planner needs to know about a model: how many bytes each layer takes and costs."""

from __future__ import annotations

from dataclasses import dataclass


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
