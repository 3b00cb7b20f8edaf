"""A placement: which node is a model's primary and which layers each node holds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .cluster import ClusterView
from .cost_model import CostModel
from .model_profile import ModelProfile
from .speculation import NO_SPECULATION, SpeculationPolicy, choose_mode, seconds_per_token


class PlannerError(Exception):
    """No placement satisfies the constraints; the message says what is missing."""


@dataclass(frozen=True)
class Assignment:
    node: str
    first_layer: int
    last_layer: int  # inclusive
    memory_bytes: int

    @property
    def layer_count(self) -> int:
        return self.last_layer - self.first_layer + 1


@dataclass(frozen=True)
class Placement:
    """Assignments are in layer order, as llama.cpp lays them out: the primary's own layers
    come first when it keeps them on its CPU, last when it has GPUs for them."""

    model_id: str
    primary: str
    assignments: tuple[Assignment, ...]
    primary_memory_bytes: int
    ms_per_token: float
    prompt_tokens_per_s: float
    slots: int = 1  # requests its engine runs at once, each with its own KV cache
    speculation: str = "off"  # how its engine drafts tokens (`speculation.SPECULATION_MODES`)
    # The prediction's parts: time per token without speculation, and per drafted token in
    # its mode (with none, per token n-grams would draft).
    plain_ms_per_token: float = 0.0
    ms_per_draft: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 / self.ms_per_token

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(a.node for a in self.assignments)

    @property
    def workers(self) -> tuple[str, ...]:
        return tuple(a.node for a in self.assignments if a.node != self.primary)

    def layer_counts(self) -> dict[str, int]:
        return {a.node: a.layer_count for a in self.assignments}

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "primary": self.primary,
            "assignments": [
                {
                    "node": a.node,
                    "first_layer": a.first_layer,
                    "last_layer": a.last_layer,
                    "memory_bytes": a.memory_bytes,
                }
                for a in self.assignments
            ],
            "primary_memory_bytes": self.primary_memory_bytes,
            "predicted_ms_per_token": self.ms_per_token,
            "predicted_tokens_per_s": self.tokens_per_s,
            "predicted_prompt_tokens_per_s": self.prompt_tokens_per_s,
            "slots": self.slots,
            "speculation": self.speculation,
            "predicted_plain_ms_per_token": self.plain_ms_per_token,
            "predicted_ms_per_draft": self.ms_per_draft,
        }


SPLITS = ("planner", "memory")
MAX_SLOTS = 64  # parallel requests one engine may run; more (from a peer) is malformed
MAX_REPLICAS = 8  # placements of one model at once
_REPLICA_MARK = "\x1f"  # never in a model id (gossip drops ids holding it)


def unit_key(model_id: str, replica: int) -> str:
    """The key of one replica of a model in the election: the model id for the first, so a
    mesh serving one replica of each model keys everything by model, as before replicas."""
    return model_id if replica == 0 else f"{model_id}{_REPLICA_MARK}{replica}"


def is_model_id(text: str) -> bool:
    return _REPLICA_MARK not in text


@dataclass(frozen=True)
class ModelRequest:
    """A model to place: its id (as gossiped: the file hash or name), sizes, and context.

    `context` is what one request may use; the engine runs `slots` requests at once, each
    with a KV cache of its own, so the KV memory of a placement is for `context * slots` tokens.
    A model is served by `replicas` placements on disjoint nodes (its holder allows between
    `min_replicas` and `max_replicas`; demand picks the count); `replica` says which one this
    request places.
    """

    model_id: str
    profile: ModelProfile
    context: int = 4096
    # Only a node holding the file may lead (until nodes can fetch model files from each other).
    primary_must_hold: bool = False
    slots: int = 1
    replicas: int = 1
    replica: int = 0
    min_replicas: int = 1
    max_replicas: int = 1
    speculation: SpeculationPolicy = NO_SPECULATION
    split: str = "planner"  # or "memory": llama.cpp's default split, to compare (`SPLITS`)
    # Holders with a draft model for this one (same vocabulary), and that draft's profile: a
    # placement they lead may speculate with it.
    drafts: tuple[tuple[str, ModelProfile], ...] = ()

    @property
    def kv_tokens(self) -> int:
        return self.context * self.slots

    @property
    def unit(self) -> str:
        return unit_key(self.model_id, self.replica)

    def draft_on(self, node: str) -> ModelProfile | None:
        """The draft model `node` holds for this model, if any."""
        return next((draft for holder, draft in self.drafts if holder == node), None)


def evaluate(
    view: ClusterView,
    request: ModelRequest,
    cost: CostModel,
    primary: str,
    counts: Sequence[tuple[str, int]],
) -> Placement | None:
    """Lays out `counts` (node, layers) in order and predicts it; None if it breaks a limit.

    Every planner and baseline is judged by this one function, so comparisons are fair.
    """
    profile, context = request.profile, request.kv_tokens
    if sum(c for _, c in counts) != profile.layer_count or any(c < 0 for _, c in counts):
        return None
    primary_node = view.node(primary)
    layer_memory = cost.layer_memory(profile, context)
    own = [(primary, c) for p, c in counts if p == primary]
    others = [(p, c) for p, c in counts if p != primary]
    # llama.cpp orders devices: remote ones first, then local GPUs; layers kept on a CPU first.
    ordered = others + own if primary_node.vram_bytes > 0 else own + others
    compute = cost.head_seconds(profile, primary_node)
    network = activations = 0.0
    assignments: list[Assignment] = []
    first = 0
    primary_memory = cost.primary_extra_memory(profile)
    for peer_id, count in ordered:
        if count == 0:
            continue
        node = view.node(peer_id)
        if node.rpc_protocol != primary_node.rpc_protocol:
            return None
        extra = primary_memory if peer_id == primary else 0
        link_s = cost.worker_link_seconds(view, profile, primary, peer_id)
        if link_s is None or extra + count * layer_memory > cost.memory_budget(node):
            return None
        network += link_s
        compute += count * cost.layer_seconds(profile, node)
        activations += cost.activation_seconds(view, profile, primary, peer_id)
        memory = _assignment_memory(request, cost, first, count) + extra
        assignments.append(Assignment(peer_id, first, first + count - 1, memory))
        first += count
    if primary_memory > cost.memory_budget(primary_node):
        return None
    primary_total = next(
        (a.memory_bytes for a in assignments if a.node == primary),
        primary_memory + cost.compute_buffer_bytes,
    )
    layers = {a.node: a.layer_count for a in assignments}
    plain = compute + network
    verify = cost.draft_seconds(compute, primary_node.vram_bytes > 0, activations)
    per_draft = {"ngram": verify}
    draft = request.draft_on(primary)
    draft_memory = 0 if draft is None else cost.draft_model_memory(draft, request.kv_tokens)
    if draft is not None and primary_total + draft_memory <= cost.memory_budget(primary_node) + (
        cost.compute_buffer_bytes
    ):
        per_draft["draft"] = verify + cost.draft_model_seconds(draft, primary_node)
    mode = choose_mode(plain, per_draft, request.speculation)
    seconds = seconds_per_token(
        plain, per_draft.get(mode, 0.0), mode, request.speculation.rate(mode)
    )
    return Placement(
        model_id=request.model_id,
        primary=primary,
        assignments=tuple(assignments),
        primary_memory_bytes=primary_total + (draft_memory if mode == "draft" else 0),
        ms_per_token=seconds * 1000.0,
        prompt_tokens_per_s=cost.prompt_tokens_per_s(view, profile, primary, layers),
        slots=request.slots,
        speculation=mode,
        plain_ms_per_token=plain * 1000.0,
        ms_per_draft=per_draft.get(mode, verify) * 1000.0,
    )


def claimed_memory(
    request: ModelRequest,
    cost: CostModel,
    primary: str,
    ranges: Sequence[tuple[str, int, int]],
    speculation: str = "off",
) -> dict[str, int]:
    """Bytes each node of a standing placement holds, from its (node, first, last) layer ranges
    and speculation mode as gossiped: what `evaluate` would count, without checking a limit."""
    profile = request.profile
    used: dict[str, int] = {}
    for node, first, last in ranges:
        count = max(0, min(last, profile.layer_count - 1) - max(first, 0) + 1)
        used[node] = used.get(node, 0) + _assignment_memory(request, cost, first, count)
    extra = cost.primary_extra_memory(profile)
    draft = request.draft_on(primary) if speculation == "draft" else None
    if draft is not None:
        extra += cost.draft_model_memory(draft, request.kv_tokens)
    used[primary] = used.get(primary, cost.compute_buffer_bytes) + extra
    return used


def _assignment_memory(request: ModelRequest, cost: CostModel, first: int, count: int) -> int:
    """Weights of layers first..first+count-1, their KV cache and the engine's compute buffer."""
    weights = sum(request.profile.layer_weight_bytes[max(first, 0) : max(first, 0) + count])
    kv = request.profile.kv_cache_bytes(count, request.kv_tokens)
    return weights + kv + cost.compute_buffer_bytes


def memory_used(placement: Placement) -> dict[str, int]:
    used = {a.node: a.memory_bytes for a in placement.assignments}
    used[placement.primary] = placement.primary_memory_bytes
    return used


def fit_together(view: ClusterView, cost: CostModel, first: Placement, second: Placement) -> bool:
    """Whether both placements of a model can run at once (while one replaces the other)."""
    one, two = memory_used(first), memory_used(second)
    for node in one.keys() & two.keys():
        budget = cost.memory_budget(view.node(node)) + cost.compute_buffer_bytes
        if one[node] + two[node] > budget:
            return False
    return True
