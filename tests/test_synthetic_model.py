"""The synthetic model generator writes GGUF files of any shape and weight type that read back
as written and that the real engine loads and runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sharedllm.node.engine.health import Health, wait_for_health
from sharedllm.node.engine.locate import EngineInfo, free_loopback_port
from sharedllm.node.models.model_file import inspect_model
from sharedllm.node.tools.synthetic_model import WEIGHT_TYPES, ModelShape, write_synthetic_model

EXPECTED_TYPE = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_k": gguf.GGMLQuantizationType.Q4_K,
}


SHAPES = st.builds(
    ModelShape,
    blocks=st.integers(1, 3),
    embedding=st.sampled_from([64, 256, 512]),
    feed_forward=st.sampled_from([64, 512]),
    heads=st.just(4),
    kv_heads=st.sampled_from([1, 2, 4]),
    vocab_size=st.integers(0, 2000),
)


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(WEIGHT_TYPES), SHAPES)
def test_every_type_reads_back_with_its_shape_and_sane_weights(
    tmp_path_factory: pytest.TempPathFactory, weight_type: str, shape: ModelShape
) -> None:
    blocks, width = shape.blocks, shape.embedding
    path = write_synthetic_model(tmp_path_factory.mktemp("m") / "m.gguf", shape, dtype=weight_type)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 9 * blocks
    up = tensors["blk.0.ffn_up.weight"]
    assert [int(n) for n in up.shape] == [width, shape.feed_forward]  # GGUF order: columns first
    # A quantised type needs its block size to divide a row; else the next finer type is used.
    block = {"q4_k": 256, "q8_0": 32}.get(weight_type, 1)
    expected = EXPECTED_TYPE[weight_type] if width % block == 0 else gguf.GGMLQuantizationType.Q8_0
    assert up.tensor_type == expected
    weights = gguf.quants.dequantize(up.data, up.tensor_type)
    assert np.isfinite(weights).all()
    assert abs(float(weights.mean())) < 0.005 and 0.005 < float(weights.std()) < 0.05
    norm = tensors["blk.0.attn_norm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32 and (norm.data == 1).all()
    vocabulary = len(tensors["token_embd.weight"].data)
    assert vocabulary == max(
        shape.vocab_size, 366
    )  # padded to the size asked, never below the built-in
    assert inspect_model(path).profile.layer_count == blocks


def test_same_seed_same_file_other_seed_other_weights(tmp_path: Path) -> None:
    shape = ModelShape(blocks=1, embedding=256, feed_forward=512)
    one = write_synthetic_model(tmp_path / "a.gguf", shape, seed=1, dtype="q4_k").read_bytes()
    again = write_synthetic_model(tmp_path / "b.gguf", shape, seed=1, dtype="q4_k").read_bytes()
    other = write_synthetic_model(tmp_path / "c.gguf", shape, seed=2, dtype="q4_k").read_bytes()
    assert one == again and one != other and len(one) == len(other)


def test_unknown_weight_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not one of f32, f16, q8_0, q4_k"):
        write_synthetic_model(tmp_path / "m.gguf", dtype="q2_k")
    assert not (tmp_path / "m.gguf").exists()


def test_cli_writes_a_model_once_and_never_over_a_file(tmp_path: Path) -> None:
    target = tmp_path / "tiny.gguf"
    cli = str(Path(sys.executable).parent / "sharedllm-node")
    command = [cli, "model", "synthetic", str(target)]
    written = subprocess.run(
        [*command, "--shape", "tiny", "--type", "q8_0"], capture_output=True, text=True, check=False
    )
    assert written.returncode == 0, written.stderr
    assert "tiny shape, q8_0 weights" in written.stdout
    inspected = subprocess.run(
        [cli, "model", "inspect", str(target), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(inspected.stdout)["layer_count"] == 4
    again = subprocess.run(
        [*command, "--shape", "tiny"], capture_output=True, text=True, check=False
    )
    assert again.returncode == 2 and "exists" in again.stderr


@pytest.mark.integration
@pytest.mark.parametrize("weight_type", ["q8_0", "q4_k"])
def test_the_engine_loads_and_runs_quantised_models(
    tmp_path: Path, engine: EngineInfo, weight_type: str
) -> None:
    shape = ModelShape(blocks=2, embedding=256, feed_forward=512, heads=4, kv_heads=2)
    model = write_synthetic_model(tmp_path / "m.gguf", shape, dtype=weight_type)
    port = free_loopback_port()
    argv = [str(engine.llama_server), "-m", str(model), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "-c", "512", "--no-webui"]
    with (tmp_path / "log").open("wb") as log:
        server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        url = f"http://127.0.0.1:{port}"
        health = wait_for_health(url, 60, lambda: server.poll() is not None)
        assert health is Health.READY, (tmp_path / "log").read_text()
        body = {"prompt": "hello world", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        answer = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        assert answer["timings"]["predicted_n"] == 16
        assert answer["timings"]["predicted_per_second"] > 0
    finally:
        server.kill()
        server.wait()
