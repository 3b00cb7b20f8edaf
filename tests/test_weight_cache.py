"""Warm loading against the real engine: the cache entry names we compute are the ones
ggml-rpc-server writes, a load after our fill sends hashes instead of weights and computes what
a load of the sent weights computes, and damaged entries are replaced rather than served."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sharedllm.node.engine.health import Health, wait_for_health
from sharedllm.node.engine.locate import EngineInfo, free_loopback_port
from sharedllm.node.tools.synthetic_model import ModelShape, write_synthetic_model
from sharedllm.node.weights.cache import (
    HASH_THRESHOLD_BYTES,
    MAX_NAMED_MODELS,
    cached_layer_tensors,
    fill_cache,
    rpc_cache_entries,
)
from sharedllm.node.weights.native_hash import FNV_OFFSET_BASIS, Buffer, NativeFnv, fnv1a64_python

# Feed-forward tensors of 2048 x 4096 f16 (16 MiB) are over the engine's hash threshold; the
# attention ones (8 MiB) are not.
SHAPE = ModelShape(blocks=2, embedding=2048, feed_forward=4096, heads=16, kv_heads=16)


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "wide.gguf"
    return write_synthetic_model(path, SHAPE)


@pytest.fixture(scope="module")
def fnv(tmp_path_factory: pytest.TempPathFactory) -> NativeFnv:
    return NativeFnv(tmp_path_factory.mktemp("native"))


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=4096), st.integers(min_value=0, max_value=2**64 - 1))
def test_the_native_hash_is_fnv1a_64(fnv: NativeFnv, data: bytes, start: int) -> None:
    assert fnv.hash(data, start) == fnv1a64_python(data, start)
    assert fnv.hash(bytearray(data), start) == fnv1a64_python(data, start)


def test_known_value(fnv: NativeFnv) -> None:
    assert fnv.hash(b"hello") == 0xA430D84680AABD0B


@contextmanager
def _loaded(engine: EngineInfo, model: Path, llama_cache: Path, log: Path) -> Iterator[int]:
    """A llama-server that puts every layer on one rpc-server started with `-c`; yields its
    API port."""
    rpc_port, api_port = free_loopback_port(), free_loopback_port()
    env = {**os.environ, "LLAMA_CACHE": str(llama_cache), "GGML_RPC_NO_RDMA": "1"}
    with log.open("ab") as out:
        worker = subprocess.Popen(
            [str(engine.rpc_server), "-H", "127.0.0.1", "-p", str(rpc_port), "-c", "-t", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
        server = None
        try:
            time.sleep(0.5)
            server = subprocess.Popen(
                [
                    str(engine.llama_server),
                    *("--host", "127.0.0.1", "--port", str(api_port), "--model", str(model)),
                    *("--rpc", f"127.0.0.1:{rpc_port}", "--n-gpu-layers", "99"),
                    *("--ctx-size", "256", "--no-webui", "--threads", "1"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
            running = server
            url = f"http://127.0.0.1:{api_port}"
            health = wait_for_health(url, 120, lambda: running.poll() is not None)
            assert health is Health.READY, f"llama-server: {health.value}"
            yield api_port
        finally:
            for process in (server, worker):
                if process is not None:
                    process.terminate()
                    process.wait(timeout=30)


def _next_token_odds(api_port: int) -> object:
    """The top candidates, with their log-probabilities, for a few greedy tokens."""
    answer = httpx.post(
        f"http://127.0.0.1:{api_port}/completion",
        json={"prompt": "Hello world", "n_predict": 4, "temperature": 0, "n_probs": 5},
        timeout=60,
    )
    answer.raise_for_status()
    odds = answer.json()["completion_probabilities"]
    assert len(odds) == 4
    return odds


@pytest.mark.integration
def test_our_entries_are_the_engines_and_a_filled_cache_is_hit(
    tmp_path: Path, engine: EngineInfo, big_model: Path, fnv: NativeFnv
) -> None:
    spans = cached_layer_tensors(big_model, 0, SHAPE.blocks - 1)
    assert len(spans) == 3 * SHAPE.blocks and all(s.size > HASH_THRESHOLD_BYTES for s in spans)
    # 1. A cold load: the engine writes its own entries; we compute the same names.
    cold = tmp_path / "cold"
    with _loaded(engine, big_model, cold, tmp_path / "cold.log") as api_port:
        sent_weights_odds = _next_token_odds(api_port)
    engine_names = {p.name for p in rpc_cache_entries(cold).iterdir()}
    ours = tmp_path / "ours"
    report = fill_cache(rpc_cache_entries(ours), big_model, spans, fnv)
    assert report.written == len(spans)
    our_names = {p.name for p in rpc_cache_entries(ours).iterdir() if not p.name.startswith(".")}
    assert our_names == engine_names
    # 2. A load after our fill sends no weight (the engine saves nothing new), and the weights
    #    copied from the entries compute exactly what the sent ones did.
    log = tmp_path / "warm.log"
    with _loaded(engine, big_model, ours, log) as api_port:
        assert _next_token_odds(api_port) == sent_weights_odds
    assert "saved to" in (tmp_path / "cold.log").read_text()
    assert "saved to" not in log.read_text()


def test_damaged_entries_are_replaced(tmp_path: Path, big_model: Path, fnv: NativeFnv) -> None:
    spans = cached_layer_tensors(big_model, 1, 1)
    entries = tmp_path / "rpc"
    fill_cache(entries, big_model, spans, fnv)
    names = sorted(p for p in entries.iterdir() if not p.name.startswith("."))
    names[0].write_bytes(names[0].read_bytes()[:1000])  # cut short, as by a crash
    damaged = bytearray(names[1].read_bytes())
    damaged[12345] ^= 0xFF  # same size, wrong bytes
    names[1].write_bytes(bytes(damaged))
    report = fill_cache(entries, big_model, spans, fnv)
    assert (report.replaced, report.written, report.already_cached) == (2, 2, 1)
    again = fill_cache(entries, big_model, spans, fnv)
    assert again.already_cached == len(spans) and again.written == 0


class _CountingFnv(NativeFnv):
    """The real hash, counting the bytes it reads."""

    hashed_bytes = 0

    def hash(self, data: Buffer, start: int = FNV_OFFSET_BASIS) -> int:
        self.hashed_bytes += memoryview(data).nbytes
        return super().hash(data, start)


def test_a_complete_cache_is_filled_again_without_reading_the_model(
    tmp_path: Path, big_model: Path
) -> None:
    fnv = _CountingFnv(tmp_path / "native")
    spans = cached_layer_tensors(big_model, 0, SHAPE.blocks - 1)
    entries = tmp_path / "rpc"
    fill_cache(entries, big_model, spans, fnv)
    fnv.hashed_bytes = 0
    again = fill_cache(entries, big_model, spans, fnv)
    assert again.already_cached == len(spans) and fnv.hashed_bytes == 0
    # A model file changed since (a new mtime): its names are computed again.
    os.utime(big_model, ns=(time.time_ns(), time.time_ns()))
    assert fill_cache(entries, big_model, spans, fnv).already_cached == len(spans)
    assert fnv.hashed_bytes == sum(span.size for span in spans)


def test_remembered_names_that_are_not_entry_names_are_forgotten(
    tmp_path: Path, big_model: Path, fnv: NativeFnv
) -> None:
    spans = cached_layer_tensors(big_model, 1, 1)
    entries = tmp_path / "rpc"
    fill_cache(entries, big_model, spans, fnv)
    memo = entries / ".names.json"
    remembered = json.loads(memo.read_text())
    for names in remembered.values():
        for where in names:
            names[where] = "../../escape"
    memo.write_text(json.dumps(remembered))
    assert fill_cache(entries, big_model, spans, fnv).already_cached == len(spans)
    assert not (tmp_path.parent / "escape").exists()
    memo.write_text("{not json")
    assert fill_cache(entries, big_model, spans, fnv).already_cached == len(spans)


def test_names_are_remembered_for_a_bounded_number_of_model_files(
    tmp_path: Path, big_model: Path, fnv: NativeFnv
) -> None:
    spans = cached_layer_tensors(big_model, 1, 1)
    entries = tmp_path / "rpc"
    for copy in range(MAX_NAMED_MODELS + 3):
        model = tmp_path / f"copy{copy}.gguf"
        os.link(big_model, model)
        fill_cache(entries, model, spans, fnv)
    remembered = json.loads((entries / ".names.json").read_text())
    assert len(remembered) == MAX_NAMED_MODELS
    assert any(
        key.startswith(str((tmp_path / f"copy{MAX_NAMED_MODELS + 2}.gguf").resolve()))
        for key in remembered
    )


def test_fills_of_other_layers_add_to_the_remembered_names(tmp_path: Path, big_model: Path) -> None:
    fnv = _CountingFnv(tmp_path / "native")
    entries = tmp_path / "rpc"
    first, second = cached_layer_tensors(big_model, 0, 0), cached_layer_tensors(big_model, 1, 1)
    fill_cache(entries, big_model, first, fnv)  # two nodes of one machine share a cache
    fill_cache(entries, big_model, second, fnv)
    fnv.hashed_bytes = 0
    assert fill_cache(entries, big_model, first + second, fnv).already_cached == 6
    assert fnv.hashed_bytes == 0
