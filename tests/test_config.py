"""Configuration layering (defaults < file < environment < flags) and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from sharedllm.node.config import DEFAULT_API_PORT, load_config
from sharedllm.node.config_checks import ConfigError
from sharedllm.node.setting_values import parse_size


def test_defaults(tmp_path: Path) -> None:
    config = load_config(data_dir=tmp_path, environ={})
    assert config.api_host == "127.0.0.1"
    assert config.api_port == DEFAULT_API_PORT
    assert config.data_dir == tmp_path.resolve()
    assert config.model is None


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        "[node]\napi_port = 1111\ncontext_size = 2048\nthreads = 3\n"
    )
    env = {"SHAREDLLM_API_PORT": "2222", "SHAREDLLM_THREADS": "5"}
    config = load_config(data_dir=tmp_path, environ=env, overrides={"api_port": 3333})
    assert config.api_port == 3333  # flag beats environment
    assert config.threads == 5  # environment beats file
    assert config.context_size == 2048  # file beats default


def test_data_dir_from_environment(tmp_path: Path) -> None:
    config = load_config(environ={"SHAREDLLM_DATA_DIR": str(tmp_path)})
    assert config.data_dir == tmp_path.resolve()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("api_port = [", "not valid TOML"),
        ("colour = 'blue'", "unknown setting 'colour'"),
        ("api_port = 'many'", "setting 'api_port'"),
        ("api_port = 70000", "not a TCP port"),
        ("context_size = 3", "too small"),
        ("threads = 0", "must be at least 1"),
        ("parallel_slots = 0", "parallel_slots 0 must be between 1 and 64"),
        ("parallel_slots = 65", "parallel_slots 65 must be between 1 and 64"),
        ("min_replicas = 0", "min_replicas 0 must be between 1 and 8"),
        ("max_replicas = 9", "max_replicas 9 must be between 1 and 8"),
        ("min_replicas = 3\nmax_replicas = 2", "min_replicas 3 is more than max_replicas 2"),
        ("log_level = 'loud'", "log_level"),
        ("model = 5", "expected a path"),
        ("split = 'even'", "split 'even' is not one of planner, memory"),
        ("speculation = 'always'", "speculation 'always' is not one of off, ngram, draft, auto"),
    ],
)
def test_bad_file_is_a_clear_error(tmp_path: Path, toml: str, message: str) -> None:
    (tmp_path / "config.toml").write_text(toml + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(data_dir=tmp_path, environ={})


def test_bad_environment_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="environment: setting 'api_port'"):
        load_config(data_dir=tmp_path, environ={"SHAREDLLM_API_PORT": "eighty"})


def test_explicit_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(data_dir=tmp_path, config_file=tmp_path / "nope.toml", environ={})


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512MB", 512_000_000),
        ("6GiB", 6 * 1024**3),
        ("300 MiB", 300 * 1024**2),
        ("1.5g", 1_500_000_000),
        ("1048576", 1048576),
        ("2T", 2 * 10**12),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "x", "-1", "0", "5XB", "1e9"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_max_memory_is_validated(tmp_path: Path) -> None:
    config = load_config(data_dir=tmp_path, environ={"SHAREDLLM_MAX_MEMORY": "6GiB"})
    assert config.max_memory_bytes == 6 * 1024**3
    with pytest.raises(ConfigError, match="max_memory 'lots'"):
        load_config(data_dir=tmp_path, environ={"SHAREDLLM_MAX_MEMORY": "lots"})
