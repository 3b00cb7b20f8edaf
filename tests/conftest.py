"""Shared fixtures: the real engine, the real default model, tiny generated models."""

from __future__ import annotations

from pathlib import Path

import pytest
from sharedllm.node.config import default_cache_dir
from sharedllm.node.default_model import default_model_path
from sharedllm.node.engine import EngineInfo, EngineNotFoundError, find_engine
from sharedllm.node.synthetic_model import ModelShape, write_synthetic_model


@pytest.fixture(scope="session")
def engine() -> EngineInfo:
    """The llama.cpp engine the node would use; integration tests need it and fail without it."""
    try:
        return find_engine(default_cache_dir(), None)
    except EngineNotFoundError as err:
        pytest.fail(f"{err} (.ci/run builds it with `sharedllm-node engine build`)")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return default_model_path(default_cache_dir())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-llama.gguf"
    return write_synthetic_model(path, ModelShape())
