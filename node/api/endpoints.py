"""The engine's endpoints every node forwards to a model's primary, and those it never does.

Every POST endpoint here takes a JSON object naming its model (or none, when the mesh offers
one); the node checks the body's shape cheaply and forwards it, streaming where the engine
streams. Not forwarded, because they expose the engine's files or change its state for every
user of the model: `POST /props` (global settings), `/slots` and `/slots/{id}` (the KV cache,
saved to and restored from the primary's disk), `/lora-adapters` (switches adapters for all),
the engine's own `/metrics` (the node has its own), `/models/load|unload`, `/cors-proxy`,
`/tools` and the `/v1/stream(s)` resumption API. `GET /props` is answered in a filtered form
(no file paths, no endpoint switches).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import Shape

Fields = tuple[str, ...]  # one of these must be present


@dataclass(frozen=True)
class Endpoint:
    path: str
    needs: tuple[Fields, ...] = ()  # each group: a field the body must have, by any of its names
    lists: frozenset[str] = frozenset()  # fields that must be arrays when present
    shape: Shape = Shape.OPENAI
    kinds: frozenset[str] = frozenset({"text"})  # the kinds of model that answer it


_ANY = frozenset({"text", "embedding", "rerank"})
_EMBEDDING = frozenset({"embedding"})
_RERANK = frozenset({"rerank"})
_MESSAGES = ("messages",)
_PROMPT = ("prompt",)
FORWARDED: tuple[Endpoint, ...] = (
    Endpoint("/v1/chat/completions", (_MESSAGES,), frozenset(_MESSAGES)),
    Endpoint("/chat/completions", (_MESSAGES,), frozenset(_MESSAGES)),
    Endpoint("/v1/chat/completions/input_tokens", (_MESSAGES,), frozenset(_MESSAGES)),
    Endpoint("/chat/completions/input_tokens", (_MESSAGES,), frozenset(_MESSAGES)),
    Endpoint("/v1/completions", (_PROMPT,)),
    Endpoint("/completions", (_PROMPT,)),
    Endpoint("/completion", (_PROMPT,)),
    Endpoint("/v1/responses", (("input",),)),
    Endpoint("/responses", (("input",),)),
    Endpoint("/v1/responses/input_tokens", (("input",),)),
    Endpoint("/responses/input_tokens", (("input",),)),
    Endpoint("/v1/messages", (_MESSAGES,), frozenset(_MESSAGES), Shape.ANTHROPIC),
    Endpoint("/v1/messages/count_tokens", (_MESSAGES,), frozenset(_MESSAGES), Shape.ANTHROPIC),
    Endpoint("/v1/embeddings", (("input", "content"),), kinds=_EMBEDDING),
    Endpoint("/embeddings", (("input", "content"),), kinds=_EMBEDDING),
    Endpoint("/embedding", (("input", "content"),), kinds=_EMBEDDING),
    *(
        Endpoint(path, (("query",), ("documents",)), frozenset({"documents"}), kinds=_RERANK)
        for path in ("/v1/rerank", "/v1/reranking", "/rerank", "/reranking")
    ),
    Endpoint("/infill", (("input_prefix",), ("input_suffix",)), frozenset({"input_extra"})),
    Endpoint("/tokenize", (("content",),), kinds=_ANY),
    Endpoint("/detokenize", (("tokens",),), frozenset({"tokens"}), kinds=_ANY),
    Endpoint("/apply-template", (_MESSAGES,), frozenset(_MESSAGES), kinds=_ANY),
)

# What `GET /props` keeps of the engine's answer: what clients read to adapt (context,
# template, modalities), never paths on the primary's disk or its endpoint switches.
PROPS_KEPT = frozenset(
    {
        "default_generation_settings",
        "total_slots",
        "model_alias",
        "model_ftype",
        "modalities",
        "media_marker",
        "chat_template",
        "chat_template_caps",
        "chat_template_tool_use",
        "bos_token",
        "eos_token",
        "build_info",
        "is_sleeping",
    }
)


def problem_with(endpoint: Endpoint, payload: dict[str, object]) -> tuple[str, str] | None:
    """What is wrong with a body for `endpoint` (message, parameter), or None."""
    for names in endpoint.needs:
        if not any(name in payload for name in names):
            return f"'{names[0]}' is a required property", names[0]
    for name in sorted(endpoint.lists):
        if name in payload and not isinstance(payload[name], list):
            return f"'{name}' has the wrong type", name
    if "prompt" in payload and not isinstance(payload["prompt"], str | list):
        return "'prompt' has the wrong type", "prompt"
    return None
