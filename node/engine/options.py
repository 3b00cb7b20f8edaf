"""Engine options a user may set for their model's llama-server, checked against an allow-list.

Users of llama-server tune flash attention, KV cache types, reasoning output, the drafts of
speculative decoding and default sampling; those pass through (`engine_args` in the config).
Whether the engine speculates at all is the placement's (the node's `speculation` setting
allows the planner its choice).
Anything that decides where the engine listens, what it loads or how it reaches its workers
(`--host`, `--port`, `--model`, `--rpc`, `--n-gpu-layers`, `--tensor-split`, ...) belongs to the
node, and so do parallel slots and the context, which the planner books as memory; any flag
not listed here is refused with the list of those that are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

# flag -> whether it takes a value; each flag's aliases are listed too
_WITH_VALUE = frozenset(
    {
        "-fa", "--flash-attn",
        "-ctk", "--cache-type-k",
        "-ctv", "--cache-type-v",
        "-b", "--batch-size",
        "-ub", "--ubatch-size",
        "--cache-reuse",
        "--reasoning-format",
        "--reasoning-budget",
        "--chat-template-kwargs",
        # tuning of the node's `speculation` (the pinned llama.cpp removed --draft-* and
        # --spec-ngram-size-*: llama-server would not start with them)
        "--spec-draft-n-max", "--spec-draft-n-min",
        "--spec-ngram-mod-n-min", "--spec-ngram-mod-n-max", "--spec-ngram-mod-n-match",
        "--temp", "--temperature",
        "--top-k",
        "--top-p",
        "--min-p",
        "--repeat-penalty",
        "--presence-penalty",
        "--frequency-penalty",
        "--seed",
    }
)  # fmt: skip
_SWITCHES = frozenset(
    {"--jinja", "--no-jinja", "-cb", "--cont-batching", "-nocb", "--no-cont-batching",
     "--swa-full"}
)  # fmt: skip
ALLOWED = _WITH_VALUE | _SWITCHES
# Slots and the KV layout are memory the planner books on every node of a split.
_SET_ELSEWHERE = {
    flag: "parallel_slots (--parallel-slots)"
    for flag in ("-np", "--parallel", "-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified")
} | {flag: "context_size (--context-size)" for flag in ("-c", "--ctx-size")}
_SET_ELSEWHERE["--spec-type"] = "speculation (--speculation)"
MAX_ARGS = 64
_VALUE = re.compile(r"^[\w.:,{}\"'\[\] =+-]{1,256}$")


class EngineOptionError(ValueError):
    """An engine option the node does not pass; the message says which and what is allowed."""


def check_engine_args(args: Sequence[str]) -> tuple[str, ...]:
    """The arguments as they will be passed, or EngineOptionError."""
    if len(args) > MAX_ARGS:
        raise EngineOptionError(f"at most {MAX_ARGS} engine arguments")
    checked: list[str] = []
    index = 0
    while index < len(args):
        flag = args[index]
        if flag in _SET_ELSEWHERE:
            raise EngineOptionError(
                f"engine option {flag} is planned by the mesh: set {_SET_ELSEWHERE[flag]}"
            )
        if flag not in ALLOWED:
            allowed = " ".join(sorted(ALLOWED))
            raise EngineOptionError(
                f"engine option {flag!r} is not one a node passes (allowed: {allowed})"
            )
        checked.append(flag)
        index += 1
        if flag in _WITH_VALUE:
            value = args[index] if index < len(args) else ""
            if not _VALUE.match(value) or (value.startswith("-") and not _is_number(value)):
                raise EngineOptionError(f"engine option {flag} needs a plain value")
            checked.append(value)
            index += 1
    return tuple(checked)


def speculation_args(
    mode: str, draft: Path | None = None, local_devices: Sequence[str] = ()
) -> tuple[str, ...]:
    """llama-server's arguments for a placement's speculation mode (the planner chose it). A
    draft model runs on the primary's own devices only (its GPUs, else its CPU): by default
    llama.cpp would spread it over the rpc workers too, a round trip per drafted token."""
    if mode == "ngram":
        return ("--spec-type", "ngram-mod")
    if mode == "draft" and draft is not None:
        drafting = ("--spec-type", "draft-simple", "--model-draft", str(draft))
        if not local_devices:
            return (*drafting, "--spec-draft-device", "none")
        return (
            *drafting,
            "--spec-draft-device",
            ",".join(local_devices),
            "--spec-draft-ngl",
            "all",
        )
    return ()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
