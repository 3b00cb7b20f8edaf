"""What a model file is for: generating text, embeddings, or reranking (pure).

llama-server runs a model as one of these and answers only that kind's endpoints, with the
engine flags it needs. A user says so (`model_kind`), or the GGUF does: a reranker declares
rank pooling; an encoder architecture, or any declared pooling, means an embedding model.
"""

from __future__ import annotations

KINDS = ("text", "embedding", "rerank")
_RANK_POOLING = 4  # llama.cpp's LLAMA_POOLING_TYPE_RANK
_ENCODERS = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "modern-bert",
                       "neo-bert", "t5encoder"})  # fmt: skip


def inferred_kind(architecture: str, pooling_type: int | None) -> str:
    if pooling_type == _RANK_POOLING:
        return "rerank"
    if architecture in _ENCODERS or (pooling_type is not None and pooling_type > 0):
        return "embedding"
    return "text"


def kind_args(kind: str, pooling_type: int | None) -> list[str]:
    """The engine flags a kind needs: a decoder file run for embeddings gets mean pooling
    unless the file declares its own."""
    if kind == "embedding":
        return ["--embeddings"] + ([] if pooling_type else ["--pooling", "mean"])
    if kind == "rerank":
        return ["--reranking"]
    return []
