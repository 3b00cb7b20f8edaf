"""A node's speed, timed with its own engine on the default model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from sharedllm.node.engine.locate import EngineInfo
from sharedllm.node.engine.speed import EngineSpeedError, engine_gflops
from sharedllm.node.models.model_file import inspect_model
from sharedllm.scheduler.cost_model import CostModel


def test_the_engine_is_timed_once_and_its_speed_remembered(
    engine: EngineInfo, gemma_path: Path, tmp_path: Path
) -> None:
    profile = inspect_model(gemma_path).profile

    def timed(with_engine: EngineInfo) -> float:
        return engine_gflops(
            with_engine, gemma_path, profile, threads=1, gpu_layers=False, cache_dir=tmp_path
        )

    speed = timed(engine)
    tokens_per_s = speed / CostModel().gflops_for(profile, 1.0)
    assert 1.0 < tokens_per_s < 10_000.0  # a real generation speed for a 270M model
    (tmp_path / "engine_speed.log").unlink()
    broken = dataclasses.replace(engine, llama_server=tmp_path / "missing-llama-server")
    # the same engine, threads and model again: remembered, the engine is not started
    assert timed(engine) == speed
    assert not (tmp_path / "engine_speed.log").exists()
    with pytest.raises((EngineSpeedError, OSError)):
        timed(broken)
