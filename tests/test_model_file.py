"""GGUF inspection: sizes and metadata from real and generated files; damaged files refused."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sharedllm.node.models.default_model import default_model_path
from sharedllm.node.models.gguf_header import ArrayInfo, read_header
from sharedllm.node.models.model_file import (
    ModelFileError,
    cached_sha256,
    file_sha256,
    inspect_model,
)
from sharedllm.node.tools.synthetic_model import ModelShape, write_synthetic_model

GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def test_generated_model_profile_matches_its_shape(tmp_path: Path) -> None:
    shape = ModelShape(blocks=3, embedding=64, feed_forward=96, heads=4, kv_heads=2, context=512)
    info = inspect_model(write_synthetic_model(tmp_path / "m.gguf", shape))
    profile = info.profile
    head_dim = 64 // 4
    kv_width = head_dim * 2
    block_params = 64 * 64 * 2 + kv_width * 64 * 2 + 96 * 64 * 3
    block_norms = 64 * 4 * 2  # two f32 norm vectors
    assert profile.architecture == "llama"
    assert profile.layer_count == 3
    assert profile.layer_weight_bytes == (block_params * 2 + block_norms,) * 3
    vocab = profile.vocab_size
    assert profile.embedding_bytes == vocab * 64 * 2
    assert profile.output_bytes == vocab * 64 * 2
    assert profile.other_bytes == 64 * 4  # output_norm
    assert profile.kv_bytes_per_token_per_layer == 2 * kv_width * 2
    assert profile.context_length == 512
    assert info.file_type == "F16"
    assert profile.total_weight_bytes < info.size_bytes


def test_gemma_has_18_layers_and_tied_output(gemma_path: Path) -> None:
    info = inspect_model(gemma_path)
    profile = info.profile
    assert profile.architecture == "gemma3"
    assert profile.layer_count == 18
    assert profile.output_bytes == 0  # the head reuses token_embd
    assert profile.embedding_bytes == 178_257_920
    assert profile.vocab_size == 262_144
    assert profile.kv_bytes_per_token_per_layer == 1 * (256 + 256) * 2
    assert info.file_type == "Q4_K_M"
    assert file_sha256(gemma_path) == GEMMA_SHA256


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no such file"):
        inspect_model(tmp_path / "absent.gguf")


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_text("hello, this is text\n")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        inspect_model(path)


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not a regular file"):
        inspect_model(tmp_path)


@pytest.mark.parametrize("keep_fraction", [0.0005, 0.05, 0.5, 0.99])
def test_truncated_file_is_refused(tmp_path: Path, tiny_model: Path, keep_fraction: float) -> None:
    data = tiny_model.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: max(4, int(len(data) * keep_fraction))])
    with pytest.raises(ModelFileError, match=r"truncated|damaged"):
        inspect_model(cut)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_damaged_headers_fail_cleanly(
    tmp_path: Path, tiny_model: Path, data: st.DataObject
) -> None:
    """Flipped bytes anywhere in the header give a ModelFileError or a profile, never a crash."""
    original = bytearray(tiny_model.read_bytes())
    header_end = read_header(tiny_model).data_offset
    for _ in range(data.draw(st.integers(min_value=1, max_value=8))):
        position = data.draw(st.integers(min_value=0, max_value=header_end - 1))
        original[position] = data.draw(st.integers(min_value=0, max_value=255))
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(bytes(original))
    with contextlib.suppress(ModelFileError):
        inspect_model(damaged)


def test_hash_is_remembered_until_the_file_changes(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF first")
    cache = tmp_path / "cache"
    first = cached_sha256(model, cache)
    assert first == file_sha256(model)
    assert first in (cache / "model_hashes.json").read_text()
    model.write_bytes(b"GGUF second, longer")
    assert cached_sha256(model, cache) == file_sha256(model) != first
    (cache / "model_hashes.json").write_text("not json")  # a damaged cache is rebuilt
    assert cached_sha256(model, cache) == file_sha256(model)


def test_the_default_model_assembles_with_progress(tmp_path: Path, gemma_path: Path) -> None:
    fractions: list[float] = []

    def report(_step: str, fraction: float) -> None:
        fractions.append(fraction)

    assembled = default_model_path(tmp_path, report)
    assert assembled.stat().st_size == gemma_path.stat().st_size
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    count = len(fractions)
    assert default_model_path(tmp_path, report) == assembled
    assert len(fractions) == count  # assembled once: the second call finds the file


def test_a_long_vocabulary_is_stepped_over_and_a_cut_one_refused(tmp_path: Path) -> None:
    """A vocabulary of thousands of strings is kept as its length only; a file that ends in
    the middle of it is refused, not read past its end."""
    model = write_synthetic_model(tmp_path / "vocab.gguf", ModelShape(vocab_size=5000))
    header = read_header(model)
    tokens = header.fields["tokenizer.ggml.tokens"]
    assert isinstance(tokens, ArrayInfo) and tokens.length == 5000
    assert header.tensors[0].offset >= header.data_offset
    data = model.read_bytes()
    start = data.index(b"tokenizer.ggml.tokens")
    for end in (start + 40, start + 5000, header.data_offset // 2):
        cut = tmp_path / f"cut-{end}.gguf"
        cut.write_bytes(data[:end])
        with pytest.raises(ModelFileError, match=r"truncated|damaged"):
            inspect_model(cut)
