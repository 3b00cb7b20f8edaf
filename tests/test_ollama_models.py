"""How Ollama's face describes a model from its gossiped shape (pure)."""

from __future__ import annotations

from sharedllm.node.api.ollama_models import model_show, model_tag
from sharedllm.node.serving.upstream import ModelEntry
from sharedllm.scheduler.model_profile import ModelProfile

_PROFILE = ModelProfile(
    name="Tiny",
    architecture="qwen3",
    layer_weight_bytes=(1000, 1000),
    embedding_bytes=500,
    output_bytes=0,
    other_bytes=10,
    kv_bytes_per_token_per_layer=64,
    embedding_length=256,
    vocab_size=1024,
    context_length=32768,
)


def test_show_names_the_family_and_shape_and_what_the_kind_answers() -> None:
    shown = model_show(ModelEntry("tiny", 0, "embedding", profile=_PROFILE, context=4096))
    assert shown["details"]["family"] == "qwen3" and shown["details"]["families"] == ["qwen3"]
    assert shown["model_info"]["qwen3.block_count"] == 2
    assert shown["model_info"]["qwen3.context_length"] == 32768
    assert shown["model_info"]["sharedllm.served_context_length"] == 4096
    assert shown["capabilities"] == ["embedding"]
    assert model_show(ModelEntry("t", 0))["capabilities"] == ["completion", "tools"]


def test_a_model_of_unknown_shape_is_still_described() -> None:
    tag = model_tag(ModelEntry("t", 0))
    assert tag["size"] == 0 and tag["details"]["family"] == "" and tag["details"]["families"] == []
    assert model_show(ModelEntry("t", 0))["model_info"] == {}
    assert model_tag(ModelEntry("t", 0, profile=_PROFILE))["size"] == 2510
