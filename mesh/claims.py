"""Claims: a primary's gossiped announcement that it leads a model at an epoch with a split,
and how the claims of a make-before-break switch relate (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..scheduler.placement import (
    MAX_REPLICAS,
    MAX_SLOTS,
    Assignment,
    Placement,
    is_model_id,
    unit_key,
)
from ..scheduler.speculation import SPECULATION_MODES

MAX_CLAIMS_PER_NODE = 16


@dataclass(frozen=True)
class Claim:
    """A primary's announcement: it leads `model_id` at `epoch` with these layer ranges."""

    model_id: str
    epoch: int
    primary: str
    layers: tuple[tuple[str, int, int], ...]  # (node, first layer, last layer), in layer order
    serving: bool = False
    # Make-before-break: the placement this claim replaces keeps serving until this one serves
    # (its primary judged that both fit in memory at once on every node they share).
    overlap: bool = False
    slots: int = 1  # requests the engine runs at once, each with a KV cache of the context
    replica: int = 0  # which of the model's placements this is
    speculation: str = "off"  # how the primary's engine drafts tokens (the planner chose)

    @property
    def unit(self) -> str:
        """What the claim competes for: one replica of its model."""
        return unit_key(self.model_id, self.replica)

    @property
    def rank(self) -> tuple[int, str]:
        return (self.epoch, self.primary)

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(node for node, _, _ in self.layers)

    @property
    def workers(self) -> tuple[str, ...]:
        return tuple(node for node in self.nodes if node != self.primary)

    def nodes_in(self, members: Mapping[str, object]) -> bool:
        """Whether the primary and every node holding layers are among `members`."""
        return self.primary in members and all(node in members for node in self.nodes)

    def counts(self) -> list[tuple[str, int]]:
        return [(node, last - first + 1) for node, first, last in self.layers]

    def same_split(self, placement: Placement) -> bool:
        """Same primary, layers, slots (a slot count is memory the split's nodes hold) and
        speculation (the engine takes it at start)."""
        return (
            self.primary == placement.primary
            and self.slots == placement.slots
            and self.speculation == placement.speculation
            and self.counts() == [(a.node, a.layer_count) for a in placement.assignments]
        )

    def as_placement(self) -> Placement:
        """The claim's layout, without the predictions only its primary computed."""
        assignments = tuple(Assignment(node, first, last, 0) for node, first, last in self.layers)
        return Placement(
            self.model_id, self.primary, assignments, 0, 0.0, 0.0, self.slots, self.speculation
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "epoch": self.epoch,
            "primary": self.primary,
            "layers": [list(entry) for entry in self.layers],
            "serving": self.serving,
            "overlap": self.overlap,
            "slots": self.slots,
            "replica": self.replica,
        } | ({"speculation": self.speculation} if self.speculation != "off" else {})

    @staticmethod
    def from_wire(data: object) -> Claim:
        """Raises ValueError on anything malformed (the data comes from peers)."""
        if not isinstance(data, dict):
            raise ValueError("a claim must be a map")
        model, epoch, primary = data.get("model"), data.get("epoch"), data.get("primary")
        layers, serving = data.get("layers"), data.get("serving", False)
        overlap, slots = data.get("overlap", False), data.get("slots", 1)
        replica, speculation = data.get("replica", 0), data.get("speculation", "off")
        if not isinstance(model, str) or not isinstance(primary, str):
            raise ValueError("a claim needs a model and a primary")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError("a claim's epoch must be a non-negative integer")
        if not isinstance(layers, list) or not isinstance(serving, bool):
            raise ValueError("a claim needs a list of layer ranges")
        if not isinstance(overlap, bool):
            raise ValueError("a claim's overlap must be a boolean")
        if not isinstance(slots, int) or isinstance(slots, bool) or not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"a claim's slots must be an integer from 1 to {MAX_SLOTS}")
        if not _whole(replica) or not 0 <= replica < MAX_REPLICAS:
            raise ValueError(f"a claim's replica must be an integer below {MAX_REPLICAS}")
        if not isinstance(speculation, str) or speculation not in SPECULATION_MODES:
            raise ValueError(f"a claim's speculation is one of {', '.join(SPECULATION_MODES)}")
        if not is_model_id(model):
            raise ValueError("a claim's model id is malformed")
        ranges = []
        for entry in layers:
            if not (
                isinstance(entry, list)
                and len(entry) == 3
                and isinstance(entry[0], str)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in entry[1:])
            ):
                raise ValueError("a layer range is [node, first, last]")
            ranges.append((entry[0], entry[1], entry[2]))
        return Claim(
            model, epoch, primary, tuple(ranges), serving, overlap, slots, replica, speculation
        )


def claim_for(
    placement: Placement, epoch: int, *, overlap: bool = False, replica: int = 0
) -> Claim:
    layers = tuple((a.node, a.first_layer, a.last_layer) for a in placement.assignments)
    return Claim(
        placement.model_id,
        epoch,
        placement.primary,
        layers,
        overlap=overlap,
        slots=placement.slots,
        replica=replica,
        speculation=placement.speculation,
    )


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_claims(raw: object, origin: str) -> tuple[Claim, ...]:
    """The claims a node makes for itself in its gossiped list (malformed ones, and claims
    naming another primary, are ignored)."""
    found = []
    for item in raw[:MAX_CLAIMS_PER_NODE] if isinstance(raw, list) else []:
        try:
            claim = Claim.from_wire(item)
        except ValueError:
            continue
        if claim.primary == origin:
            found.append(claim)
    return tuple(found)


def serving_predecessor(
    current: Claim | None, candidates: Iterable[Claim], members: Mapping[str, object]
) -> Claim | None:
    """During a make-before-break switch to `current`, the claim that still serves meanwhile:
    the highest-ranked lower claim that serves with all its nodes alive."""
    if current is None or current.serving or not current.overlap:
        return None
    standing = [
        claim
        for claim in candidates
        if claim.unit == current.unit
        and claim.rank < current.rank
        and claim.serving
        and claim.nodes_in(members)
    ]
    return max(standing, key=lambda claim: claim.rank, default=None)


def winding_down(
    current: Claim | None,
    previous: Claim | None,
    candidates: Iterable[Claim],
    members: Mapping[str, object],
) -> tuple[Claim, ...]:
    """Claims replaced by a make-before-break switch that their primaries still announce: they
    finish the requests they took, and nobody sends them new ones."""
    if current is None or not current.overlap:
        return ()
    skip = {current.rank} if previous is None else {current.rank, previous.rank}
    found: dict[tuple[int, str], Claim] = {}
    for claim in candidates:
        if (
            claim.unit == current.unit
            and claim.rank < current.rank
            and claim.rank not in skip
            and claim.nodes_in(members)
        ):
            found.setdefault(claim.rank, claim)
    return tuple(found[rank] for rank in sorted(found, reverse=True))
