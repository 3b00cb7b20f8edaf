"""Engine options users set for their model pass an allow-list; nothing that decides where the
engine listens, what it loads or how it reaches its workers gets through."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sharedllm.node.config import load_config
from sharedllm.node.config_checks import ConfigError
from sharedllm.node.engine.options import (
    ALLOWED,
    EngineOptionError,
    check_engine_args,
    speculation_args,
)


def test_common_tuning_passes_as_given() -> None:
    args = ["--flash-attn", "on", "-ctk", "q8_0", "--top-k", "20", "--jinja", "--temp", "-0.5"]
    assert check_engine_args(args) == tuple(args)


@pytest.mark.parametrize(
    "args",
    [
        ["--host", "0.0.0.0"],
        ["--port", "8080"],
        ["--rpc", "10.0.0.1:50052"],
        ["--model", "/etc/passwd"],
        ["-m", "x.gguf"],
        ["--n-gpu-layers", "99"],
        ["--slot-save-path", "/tmp"],
        ["--flash-attn"],  # a value is missing
        ["--flash-attn", "--host"],  # a flag where the value should be
        ["--temp", "1; rm -rf /"],
        ["--parallel", "8"],  # slots and context are memory the planner books
        ["-kvu"],
        ["--ctx-size", "65536"],
    ],
)
def test_what_belongs_to_the_node_is_refused(args: list[str]) -> None:
    with pytest.raises(EngineOptionError):
        check_engine_args(args)


@given(st.lists(st.text(max_size=20), max_size=10))
def test_any_arguments_are_passed_only_if_every_flag_is_allowed(args: list[str]) -> None:
    try:
        checked = check_engine_args(args)
    except EngineOptionError:
        return
    flags = [
        a for a in checked if a.startswith("-") and not a.lstrip("-").replace(".", "").isdigit()
    ]
    assert set(flags) <= ALLOWED


def test_engine_args_come_from_the_config_file_or_the_environment(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[node]\nengine_args = ["--flash-attn", "on"]\n')
    assert load_config(data_dir=tmp_path, environ={}).engine_args == ("--flash-attn", "on")
    env = {"SHAREDLLM_ENGINE_ARGS": "--top-k 20"}
    assert load_config(data_dir=tmp_path, environ=env).engine_args == ("--top-k", "20")
    with pytest.raises(ConfigError, match="not one a node passes"):
        load_config(data_dir=tmp_path, environ={"SHAREDLLM_ENGINE_ARGS": "--host 0.0.0.0"})


def test_slots_and_context_are_refused_with_the_setting_that_owns_them() -> None:
    with pytest.raises(EngineOptionError, match="parallel_slots"):
        check_engine_args(["-np", "2"])
    with pytest.raises(EngineOptionError, match="context_size"):
        check_engine_args(["-c", "8192"])


def test_speculation_is_a_setting_of_its_own() -> None:
    """The node owns --spec-type (its `speculation` setting); a typo in it is a clear error."""
    with pytest.raises(EngineOptionError, match="speculation"):
        check_engine_args(["--spec-type", "ngram-mod"])
    assert load_config(environ={"SHAREDLLM_SPECULATION": "ngram"}).speculation == "ngram"
    assert speculation_args("ngram") == ("--spec-type", "ngram-mod")
    assert speculation_args("off") == () == speculation_args("draft")  # no draft model here
    draft = Path("/models/small.gguf")
    assert speculation_args("draft", draft) == (
        *("--spec-type", "draft-simple", "--model-draft", str(draft)),
        *("--spec-draft-device", "none"),  # on the primary's CPU, never on its rpc workers
    )
    on_gpu = speculation_args("draft", draft, ["CUDA0"])
    assert on_gpu[-4:] == ("--spec-draft-device", "CUDA0", "--spec-draft-ngl", "all")
    with pytest.raises(ConfigError, match="speculation 'ngrams' is not one of off, ngram"):
        load_config(environ={"SHAREDLLM_SPECULATION": "ngrams"})


def test_speculation_tuning_passes_and_flags_the_engine_removed_do_not() -> None:
    tuning = ["--spec-draft-n-max", "8", "--spec-ngram-mod-n-match", "16"]
    assert check_engine_args(tuning) == tuple(tuning)
    for removed in (["--draft-max", "8"], ["--draft-min", "1"], ["--spec-ngram-size-n", "3"]):
        with pytest.raises(EngineOptionError):
            check_engine_args(removed)
