"""Writing llama-architecture GGUF files with random weights, of any shape and weight type.

Timings of load and generation depend on shapes and types, not on what the weights mean, so a
random model of a real model's dimensions measures the engine honestly; a tiny one makes tests
fast. The vocabulary is a SentencePiece-style one that llama.cpp accepts, padded to the size
asked for (the output head's size follows it). Tensors are generated and written one at a time,
so an 8B-shaped model needs no more memory than its largest tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

_WEIGHT_SCALE = 0.02  # standard deviation of real models' weights, near enough


@dataclass(frozen=True)
class ModelShape:
    blocks: int = 4
    embedding: int = 128
    feed_forward: int = 256
    heads: int = 4
    kv_heads: int = 2
    context: int = 2048
    vocab_size: int = 0  # 0: the built-in vocabulary alone (a few hundred tokens)


# Real models' dimensions, for benchmarks. The gemma entry is a llama of Gemma 3 270M's size
# (layers, widths, vocabulary), not the Gemma architecture.
SHAPES = {
    "tiny": ModelShape(),
    "llama3-8b": ModelShape(
        blocks=32,
        embedding=4096,
        feed_forward=14336,
        heads=32,
        kv_heads=8,
        context=8192,
        vocab_size=128256,
    ),
    "gemma3-270m-size": ModelShape(
        blocks=18, embedding=640, feed_forward=2048, heads=4, kv_heads=1, vocab_size=262144
    ),
}


def _vocabulary(size: int) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [2, 3, 3]  # unknown, control, control
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256  # byte tokens
    pieces = [chr(c) for c in range(33, 127)]
    words = ["the", "a", "is", "of", "and", "to", "in", "it", "hello", "world", "model", "mesh"]
    pieces += [f"\u2581{w}" for w in words] + ["\u2581"]
    pieces += [f"\u2581tok{i}" for i in range(max(0, size - len(tokens) - len(pieces)))]
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * 259 + [-float(100 - len(p)) for p in pieces]
    return tokens, scores, types


def _tensor_list(shape: ModelShape, vocab: int) -> Iterator[tuple[str, int, int]]:
    """(name, rows, columns) of every tensor, columns 0 for a norm vector of `rows`."""
    head_dim = shape.embedding // shape.heads
    kv_width = head_dim * shape.kv_heads
    width, hidden = shape.embedding, shape.feed_forward
    yield "token_embd.weight", vocab, width
    for block in range(shape.blocks):
        prefix = f"blk.{block}."
        yield prefix + "attn_norm.weight", width, 0
        yield prefix + "attn_q.weight", width, width
        yield prefix + "attn_k.weight", kv_width, width
        yield prefix + "attn_v.weight", kv_width, width
        yield prefix + "attn_output.weight", width, width
        yield prefix + "ffn_norm.weight", width, 0
        yield prefix + "ffn_gate.weight", hidden, width
        yield prefix + "ffn_up.weight", hidden, width
        yield prefix + "ffn_down.weight", width, hidden
    yield "output_norm.weight", width, 0
    yield "output.weight", vocab, width


Generator = Callable[[np.random.Generator, int, int], np.ndarray]


def _float_matrix(dtype: type[np.floating]) -> Generator:
    def generate(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * _WEIGHT_SCALE).astype(dtype)

    return generate


def _q8_0(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Blocks of 32 weights: an f16 scale, then 32 signed bytes."""
    blocks = rows * cols // 32
    out = np.empty((blocks, 34), dtype=np.uint8)
    out[:, :2] = np.frombuffer(np.float16(2 * _WEIGHT_SCALE / 127).tobytes(), np.uint8)
    out[:, 2:] = rng.integers(0, 256, (blocks, 32), dtype=np.uint8)
    return out.reshape(rows, cols // 32 * 34)


def _q4_k(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Super-blocks of 256 weights: f16 scale and minimum, 12 bytes of 6-bit sub-block scales
    and minimums, 128 bytes of 4-bit weights. The minimum's scale makes the mean about zero."""
    blocks = rows * cols // 256
    out = np.empty((blocks, 144), dtype=np.uint8)
    d = np.float16(2 * _WEIGHT_SCALE / (63 * 15))
    header = np.array([d, np.float16(7.5 * float(d))], dtype=np.float16)
    out[:, :4] = np.frombuffer(header.tobytes(), np.uint8)
    out[:, 4:] = rng.integers(0, 256, (blocks, 140), dtype=np.uint8)
    return out.reshape(rows, cols // 256 * 144)


@dataclass(frozen=True)
class _WeightType:
    ggml: gguf.GGMLQuantizationType
    file_type: gguf.LlamaFileType
    block: int  # weights per block
    block_bytes: int
    generate: Generator

    def row_bytes(self, cols: int) -> int:
        return cols // self.block * self.block_bytes


_TYPES = {
    "f32": _WeightType(
        gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32, 1, 4, _float_matrix(np.float32)
    ),
    "f16": _WeightType(
        gguf.GGMLQuantizationType.F16,
        gguf.LlamaFileType.MOSTLY_F16,
        1,
        2,
        _float_matrix(np.float16),
    ),
    "q8_0": _WeightType(
        gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0, 32, 34, _q8_0
    ),
    "q4_k": _WeightType(
        gguf.GGMLQuantizationType.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_M, 256, 144, _q4_k
    ),
}
WEIGHT_TYPES = tuple(_TYPES)


def _matrix_type(weight_type: str, cols: int) -> _WeightType:
    """The type a matrix of `cols` columns gets: the one asked for where its block size
    divides the columns, else a finer one (as llama.cpp's quantizer falls back)."""
    for name in (weight_type, "q8_0", "f16"):
        chosen = _TYPES[name]
        if cols % chosen.block == 0:
            return chosen
    return _TYPES["f16"]


def write_synthetic_model(
    path: Path, shape: ModelShape = ModelShape(), seed: int = 0, dtype: str = "f16"
) -> Path:
    """Writes a loadable llama GGUF with random weights to `path` and returns it. The file
    appears only when complete (written beside it, then renamed)."""
    if dtype not in _TYPES:
        raise ValueError(f"weight type {dtype!r} is not one of {', '.join(WEIGHT_TYPES)}")
    rng = np.random.default_rng(seed)
    partial = path.with_name(path.name + ".part")
    try:
        _write(partial, shape, dtype, rng)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.rename(path)
    return path


def _write(path: Path, shape: ModelShape, dtype: str, rng: np.random.Generator) -> None:
    tokens, scores, types = _vocabulary(shape.vocab_size)
    writer = gguf.GGUFWriter(str(path), "llama")
    _write_metadata(writer, shape, _TYPES[dtype].file_type)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    norm = np.dtype(np.float32)
    planned: list[tuple[_WeightType | None, int, int]] = []
    for name, rows, cols in _tensor_list(shape, len(tokens)):
        if cols == 0:
            writer.add_tensor_info(name, (rows,), norm, rows * norm.itemsize)
            planned.append((None, rows, 0))
            continue
        kind = _matrix_type(dtype, cols)
        size = kind.row_bytes(cols) * rows
        if kind.block == 1:
            element = np.dtype(np.float32 if kind.block_bytes == 4 else np.float16)
            writer.add_tensor_info(name, (rows, cols), element, size)
        else:
            byte_shape = (rows, kind.row_bytes(cols))
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), size, kind.ggml)
        planned.append((kind, rows, cols))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for planned_kind, rows, cols in planned:
        if planned_kind is None:
            writer.write_tensor_data(np.ones(rows, norm))
        else:
            writer.write_tensor_data(planned_kind.generate(rng, rows, cols))
    writer.close()


def _write_metadata(writer: gguf.GGUFWriter, shape: ModelShape, file_type: int) -> None:
    writer.add_name("synthetic-llama")
    writer.add_block_count(shape.blocks)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.embedding)
    writer.add_feed_forward_length(shape.feed_forward)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(file_type)
    writer.add_tokenizer_model("llama")
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
