"""The chat template a model's engine gets: the file's own, else its family's built-in one, and
a user's setting over both (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sharedllm.node.config import load_config
from sharedllm.node.config_checks import ConfigError
from sharedllm.node.models.chat_template import builtin_template, template_args


def test_a_file_without_a_template_gets_its_family_s_built_in_one() -> None:
    assert builtin_template("gemma3", None) == "gemma"
    assert builtin_template("qwen2", "qwen2") == "chatml"
    assert builtin_template("llama", "llama-bpe") == "llama3"
    assert builtin_template("llama", "default") == "llama2"
    assert builtin_template("some-new-arch", None) is None
    args = template_args(has_own=False, architecture="gemma3", tokenizer_pre=None, configured=None)
    assert args[0] == "--chat-template-file" and Path(args[1]).name == "gemma.jinja"
    assert "<start_of_turn>" in Path(args[1]).read_text()  # shipped with the package
    qwen = template_args(has_own=False, architecture="qwen2", tokenizer_pre=None, configured=None)
    assert qwen == ["--no-jinja", "--chat-template", "chatml"]  # the engine's legacy renderer


def test_a_file_s_own_template_is_kept_and_the_user_s_setting_wins() -> None:
    own = template_args(has_own=True, architecture="gemma3", tokenizer_pre=None, configured=None)
    assert own == []
    named = template_args(
        has_own=True, architecture="gemma3", tokenizer_pre=None, configured="chatml"
    )
    assert named == ["--no-jinja", "--chat-template", "chatml"]
    filed = template_args(
        has_own=False, architecture="x", tokenizer_pre=None, configured="/t/chat.jinja"
    )
    assert filed == ["--chat-template-file", "/t/chat.jinja"]


def test_a_template_setting_that_is_neither_a_name_nor_a_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a built-in template"):
        load_config(data_dir=tmp_path, environ={}, overrides={"chat_template": "gemmma"})
    jinja = tmp_path / "chat.jinja"
    jinja.write_text("{{ messages }}")
    config = load_config(data_dir=tmp_path, environ={}, overrides={"chat_template": str(jinja)})
    assert config.chat_template == str(jinja)


def test_the_default_answer_limit_is_bounded(tmp_path: Path) -> None:
    assert load_config(data_dir=tmp_path, environ={}).default_max_tokens == 256
    for bad in (0, -1, 10**7):
        with pytest.raises(ConfigError, match="default_max_tokens"):
            load_config(data_dir=tmp_path, environ={}, overrides={"default_max_tokens": bad})
