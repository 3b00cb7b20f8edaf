"""Which chat template a model's engine uses.

A GGUF normally carries its own (Jinja) chat template. One that does not — the embedded
default model is one — would get llama-server's fallback (ChatML), which models of other
families answer with garbage and never end. For such files the node picks its family's
template, by the architecture (and, for llama, the tokenizer): a Jinja template shipped here
where there is one (gemma), else the engine's built-in one of that name, rendered by its
legacy templating (`--no-jinja`: given a built-in name, the Jinja renderer would print the
name itself). A user's `chat_template` setting (a name or a Jinja file) wins over both.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# GGUF architectures whose family has one built-in llama.cpp template (src/llama-chat.cpp).
_BY_ARCHITECTURE = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3n": "gemma",
    "qwen2": "chatml",
    "qwen2moe": "chatml",
    "qwen3": "chatml",
    "qwen3moe": "chatml",
    "phi3": "phi3",
    "deepseek2": "deepseek2",
    "command-r": "command-r",
    "cohere2": "command-r",
    "chatglm": "chatglm4",
    "exaone": "exaone3",
    "exaone4": "exaone4",
    "granite": "granite",
    "minicpm": "minicpm",
    "llama4": "llama4",
    "gpt-oss": "gpt-oss",
}
# llama-architecture files: Llama 3's BPE tokenizer means Llama 3's template; others Llama 2's.
_LLAMA3_TOKENIZERS = frozenset({"llama-bpe", "llama3", "smaug-bpe"})
BUILTIN_TEMPLATES = frozenset(
    {
        *_BY_ARCHITECTURE.values(),
        "llama2",
        "llama3",
        "mistral-v1",
        "mistral-v3",
        "mistral-v7",
        "zephyr",
        "vicuna",
        "openchat",
        "deepseek",
        "deepseek3",
        "falcon3",
        "phi4",
    }
)


def builtin_template(architecture: str, tokenizer_pre: str | None) -> str | None:
    """The engine's built-in template for a model family (None: no good guess)."""
    if architecture == "llama":
        return "llama3" if tokenizer_pre in _LLAMA3_TOKENIZERS else "llama2"
    return _BY_ARCHITECTURE.get(architecture)


# Families whose template ships with the node as Jinja, so that the engine's Jinja features
# (its chat parsers, `/apply-template`, typed content parts) work for them too.
_SHIPPED = {"gemma": "gemma.jinja"}


def shipped_template(name: str) -> Path | None:
    file = _SHIPPED.get(name)
    if file is None:
        return None
    return Path(str(resources.files(__package__) / "templates" / file))


def _named(name: str) -> list[str]:
    shipped = shipped_template(name)
    if shipped is not None:
        return ["--chat-template-file", str(shipped)]
    return ["--no-jinja", "--chat-template", name]


def template_args(
    *, has_own: bool, architecture: str, tokenizer_pre: str | None, configured: str | None
) -> list[str]:
    """llama-server's arguments for the template: the user's setting, else the file's own
    (nothing to pass), else the family's built-in one."""
    if configured is not None:
        if configured in BUILTIN_TEMPLATES:
            return _named(configured)
        return ["--chat-template-file", str(Path(configured).expanduser())]
    if has_own:
        return []
    chosen = builtin_template(architecture, tokenizer_pre)
    return [] if chosen is None else _named(chosen)
