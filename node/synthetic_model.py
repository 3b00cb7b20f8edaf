"""Writing llama-architecture GGUF files with random weights, of any shape.

Timings of load and generation depend on shapes and types, not on what the weights mean, so a
random model of a real model's dimensions measures the engine honestly; a tiny one makes tests
fast. The vocabulary is a small SentencePiece-style one that llama.cpp accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ModelShape:
    blocks: int = 4
    embedding: int = 128
    feed_forward: int = 256
    heads: int = 4
    kv_heads: int = 2
    context: int = 2048
    vocab_padding: int = 0  # extra tokens beyond the built-in vocabulary, to grow the output head


def _vocabulary(padding: int) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [2, 3, 3]  # unknown, control, control
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256  # byte tokens
    pieces = [chr(c) for c in range(33, 127)]
    words = ["the", "a", "is", "of", "and", "to", "in", "it", "hello", "world", "model", "mesh"]
    pieces += [f"\u2581{w}" for w in words] + ["\u2581"]
    pieces += [f"\u2581tok{i}" for i in range(padding)]
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * 259 + [-float(100 - len(p)) for p in pieces]
    return tokens, scores, types


def write_synthetic_model(
    path: Path, shape: ModelShape = ModelShape(), seed: int = 0, dtype: str = "f16"
) -> Path:
    """Writes a loadable llama GGUF with random weights to `path` and returns it."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocabulary(shape.vocab_padding)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("synthetic-llama")
    writer.add_block_count(shape.blocks)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.embedding)
    writer.add_feed_forward_length(shape.feed_forward)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(1 if dtype == "f16" else 0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    np_type = np.float16 if dtype == "f16" else np.float32
    head_dim = shape.embedding // shape.heads
    kv_width = head_dim * shape.kv_heads

    def matrix(name: str, rows: int, cols: int) -> None:
        data = (rng.standard_normal((rows, cols)) * 0.02).astype(np_type)
        writer.add_tensor(name, data)

    def norm(name: str, width: int) -> None:
        writer.add_tensor(name, np.ones(width, dtype=np.float32))

    vocab = len(tokens)
    matrix("token_embd.weight", vocab, shape.embedding)
    for block in range(shape.blocks):
        prefix = f"blk.{block}."
        norm(prefix + "attn_norm.weight", shape.embedding)
        matrix(prefix + "attn_q.weight", shape.embedding, shape.embedding)
        matrix(prefix + "attn_k.weight", kv_width, shape.embedding)
        matrix(prefix + "attn_v.weight", kv_width, shape.embedding)
        matrix(prefix + "attn_output.weight", shape.embedding, shape.embedding)
        norm(prefix + "ffn_norm.weight", shape.embedding)
        matrix(prefix + "ffn_gate.weight", shape.feed_forward, shape.embedding)
        matrix(prefix + "ffn_up.weight", shape.feed_forward, shape.embedding)
        matrix(prefix + "ffn_down.weight", shape.embedding, shape.feed_forward)
    norm("output_norm.weight", shape.embedding)
    matrix("output.weight", vocab, shape.embedding)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
