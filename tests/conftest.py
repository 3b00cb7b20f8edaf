"""Shared fixtures: the real engine, the real default model, tiny generated models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from sharedllm.node.config import default_cache_dir
from sharedllm.node.engine.locate import EngineInfo, EngineNotFoundError, find_engine
from sharedllm.node.models.default_model import default_model_path
from sharedllm.node.tools.synthetic_model import ModelShape, write_synthetic_model

from .node_process import RunningNode, start_node

# Properties are checked for what they assert, never for how fast an example runs: these
# machines are shared, and a slow moment must not fail a test (no per-example deadline).
settings.register_profile("sharedllm", deadline=None)
settings.load_profile("sharedllm")


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


@pytest.fixture(scope="module")
def gemma_node(
    tmp_path_factory: pytest.TempPathFactory, engine: EngineInfo, gemma_path: Path
) -> Iterator[RunningNode]:
    """One real node serving the default Gemma model, shared by a module's tests."""
    node = start_node(tmp_path_factory.mktemp("gemma-node"), "--context-size", "2048")
    yield node
    node.stop()
