"""Configuration layering (defaults < file < environment < flags) and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from sharedllm.node.config import DEFAULT_API_PORT, ConfigError, load_config


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
        ("log_level = 'loud'", "log_level"),
        ("model = 5", "expected a path"),
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
