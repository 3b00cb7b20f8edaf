"""What the election reads from gossiped states: the planner's view of the nodes and links,
the models offered, and the claims made (pure).

Every node reads the same few states twice a second, and a decoded gossiped content never
changes, so a `GossipReader` parses each claims list and model entry once: its bounded memo is
keyed by the object itself (and holds it, so the id stays its own). Each elector owns one.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from ..scheduler.cluster import ClusterView, Link, NodeCapacity
from ..scheduler.model_profile import ModelProfile, profile_from_dict
from ..scheduler.placement import MAX_REPLICAS, MAX_SLOTS, ModelRequest, is_model_id
from ..scheduler.replica_demand import DEMAND_FIGURES, MAX_DEMAND, Demand, mesh_demand_of
from ..scheduler.speculation import DraftRate, SpeculationPolicy
from .claims import Claim, parse_claims
from .gossip_drafts import ModeRate, draft_profile, draft_rate_entries
from .gossip_values import by_model, is_count, is_finite, is_positive
from .member_states import MemberStates

# Until a bandwidth probe has measured a link, the planner assumes this much.
ASSUMED_BANDWIDTH_MBPS = 100.0
_MAX_MODELS_PER_NODE = 16
# How long a view may go without the newest link measurements (members and capacities changed
# are taken in at once).
LINK_REFRESH_S = 5.0
MAX_DEMAND_ENTRIES = 32  # models one node reports demand for; more are ignored
_NodeDemand = tuple[str, float, tuple[float, ...]]  # model, recent, buckets newest first


def node_capacity(peer_id: str, content: Mapping[str, Any]) -> NodeCapacity | None:
    """The planner's view of one node, or None when its state lacks what planning needs."""
    ram, vram = content.get("ram_total"), content.get("vram_total", 0)
    gflops, protocol = content.get("gflops"), content.get("rpc_protocol")
    cap = content.get("memory_cap")
    if not (is_count(ram) and is_count(vram) and isinstance(protocol, str)):
        return None
    if not isinstance(gflops, int | float) or not math.isfinite(gflops) or gflops <= 0:
        return None
    return NodeCapacity(
        peer_id=peer_id,
        ram_bytes=ram,
        vram_bytes=vram,
        gflops=float(gflops),
        rpc_protocol=protocol,
        models=frozenset(model_id for model_id, _ in model_entries(content)),
        memory_cap_bytes=cap if is_count(cap) else None,
    )


def cluster_view(members: Mapping[str, Mapping[str, Any]]) -> ClusterView:
    """Nodes and measured links among `members`; a link needs an RTT measured by its source."""
    return _view_of({peer: _parse_member(peer, c) for peer, c in members.items()})


def measured_links(source: str, content: Mapping[str, Any]) -> tuple[Link, ...]:
    """The links a member measured, as gossiped (to any target; the view keeps the present)."""
    measured = content.get("links")
    if not isinstance(measured, dict):
        return ()
    links = []
    for target, link in measured.items():
        if isinstance(target, str) and target != source and isinstance(link, dict):
            # the data plane's round trip is what tunnels pay; the control plane's until then
            rtt, bandwidth = link.get("data_rtt_ms"), link.get("bandwidth_mbps")
            if not is_positive(rtt):
                rtt = link.get("rtt_ms")
            if not is_positive(rtt):
                continue
            if not is_positive(bandwidth):
                bandwidth = ASSUMED_BANDWIDTH_MBPS
            links.append(Link(source, target, _coarse(rtt), _coarse(bandwidth)))
    return tuple(sorted(links, key=lambda link: link.target))


def _coarse(value: float) -> float:
    """A measurement to two significant digits (5% at worst): plans need no finer, and a view
    that changes only when a link really does is built again far less often."""
    return float(f"{value:.2g}")


_Parsed = tuple[NodeCapacity | None, tuple[Link, ...]]


def _parse_member(peer: str, content: Mapping[str, Any]) -> _Parsed:
    return node_capacity(peer, content), measured_links(peer, content)


def _view_of(parsed: Mapping[str, _Parsed]) -> ClusterView:
    nodes = [capacity for capacity, _ in parsed.values() if capacity is not None]
    present = {node.peer_id for node in nodes}
    links = [
        link for source in sorted(present) for link in parsed[source][1] if link.target in present
    ]
    return ClusterView.build(nodes, links)


def _links_came_or_went(last: _BuiltView, parsed: Mapping[str, _Parsed]) -> bool:
    """Whether some member measures links to other targets than in `last` (whose members are
    those of `parsed`, in the same order)."""
    for before, now in zip(last.parsed, parsed.values(), strict=True):
        if before[1] is not now[1] and [x.target for x in before[1]] != [x.target for x in now[1]]:
            return True
    return False


@dataclass(frozen=True)
class _BuiltView:
    nodes_key: tuple[tuple[str, int], ...]
    links_key: tuple[int, ...]
    view: ClusterView
    built_at: float
    parsed: tuple[_Parsed, ...]  # held so that the ids in the keys stay theirs


@dataclass
class GossipReader:
    memo_size: int = 1024
    _requests: OrderedDict[int, tuple[object, ModelRequest | None]] = field(
        default_factory=OrderedDict
    )
    _claims: OrderedDict[int, tuple[object, str, tuple[Claim, ...]]] = field(
        default_factory=OrderedDict
    )
    view_memo_size: int = 8192  # member states parsed for the view (a mesh's worth)
    _parsed: OrderedDict[int, tuple[object, str, _Parsed]] = field(default_factory=OrderedDict)
    _last_view: _BuiltView | None = None
    # each member's last parse (members gone are dropped once `memo_size` of them gather)
    _parsed_by_peer: dict[str, _Parsed] = field(default_factory=dict)
    _demand: OrderedDict[int, tuple[object, tuple[_NodeDemand, ...]]] = field(
        default_factory=OrderedDict
    )
    _drafts: OrderedDict[int, tuple[object, tuple[ModeRate, ...]]] = field(
        default_factory=OrderedDict
    )
    _draft_profiles: OrderedDict[int, tuple[object, ModelProfile | None]] = field(
        default_factory=OrderedDict
    )

    def offered_models(self, members: Mapping[str, Mapping[str, Any]]) -> dict[str, ModelRequest]:
        """Every model some member holds; its profile and context come from the lowest peer
        id holding it, so every node derives the same request."""
        requests: dict[str, ModelRequest] = {}
        drafts: dict[str, dict[str, ModelProfile]] = {}
        for holder, content in MemberStates.of(members).having("models"):
            for model_id, entry in model_entries(content):
                if model_id not in requests and (request := self.request_of(model_id, entry)):
                    requests[model_id] = request
                if (draft := self._draft_of(entry)) is not None:
                    drafts.setdefault(model_id, {}).setdefault(holder, draft)
        for model_id, offered in drafts.items():
            if model_id in requests:  # holders come by peer id: so do their drafts
                requests[model_id] = replace(requests[model_id], drafts=tuple(offered.items()))
        return requests

    def _draft_of(self, entry: dict[str, Any]) -> ModelProfile | None:
        """The draft model a holder's entry offers (parsed once per entry)."""
        if "draft" not in entry:
            return None
        return _parsed_once(self._draft_profiles, entry, draft_profile, self)

    def request_of(self, model_id: str, entry: dict[str, Any]) -> ModelRequest | None:
        """The request a gossiped model entry describes (None if malformed)."""
        memo = self._requests.get(id(entry))
        if memo is not None and memo[0] is entry:
            return memo[1]
        request = _parse_request(model_id, entry)
        _remember(self._requests, id(entry), (entry, request), self.memo_size)
        return request

    def cluster_view(
        self, members: Mapping[str, Mapping[str, Any]], now: float | None = None
    ) -> ClusterView:
        """`cluster_view`, parsing each member's state once and building the view again only
        when some member's capacity or links changed (not its claims, demand or the like).
        With `now`, a change of link measurements alone waits up to `LINK_REFRESH_S` to be
        taken in: in a big mesh some link is always re-measured, and building the view for
        every election step was most of the step's cost. A link measured for the first time
        (or gone) is taken in at once: a mesh that is forming waits on it to plan."""
        parsed = {}
        for peer, content in members.items():
            memo = self._parsed.get(id(content))
            if memo is None or memo[0] is not content or memo[1] != peer:
                memo = (content, peer, self._stable_parse(peer, content))
                _remember(self._parsed, id(content), memo, self.view_memo_size)
            parsed[peer] = memo[2]
        if len(self._parsed_by_peer) > len(parsed) + self.memo_size:
            self._parsed_by_peer = {p: e for p, e in self._parsed_by_peer.items() if p in parsed}
        nodes_key = tuple((peer, id(entry[0])) for peer, entry in parsed.items())
        links_key = tuple(id(entry[1]) for entry in parsed.values())
        last = self._last_view
        if last is not None and last.nodes_key == nodes_key:
            fresh = now is not None and now - last.built_at < LINK_REFRESH_S
            if last.links_key == links_key or (fresh and not _links_came_or_went(last, parsed)):
                return last.view
        view = _view_of(parsed)
        self._last_view = _BuiltView(nodes_key, links_key, view, now or 0.0, tuple(parsed.values()))
        return view

    def _stable_parse(self, peer: str, content: Mapping[str, Any]) -> _Parsed:
        """The member's capacity and links, as the same objects as its last parse where they
        are equal (so that the view's keys stay put)."""
        capacity, links = _parse_member(peer, content)
        before = self._parsed_by_peer.get(peer)
        if before is not None:
            capacity = before[0] if before[0] == capacity else capacity
            links = before[1] if before[1] == links else links
        kept = (capacity, links)
        self._parsed_by_peer[peer] = kept
        return kept

    def mesh_demand(self, members: Mapping[str, Mapping[str, Any]]) -> dict[str, Demand]:
        """Each model's demand summed over the members that report it (by model id)."""
        reports: dict[str, list[tuple[float, tuple[float, ...]]]] = {}
        for _, content in MemberStates.of(members).having("demand"):
            entries = _parsed_once(self._demand, content.get("demand"), demand_entries, self)
            for model_id, recent, buckets in entries:
                reports.setdefault(model_id, []).append((recent, buckets))
        return {model_id: mesh_demand_of(found) for model_id, found in reports.items()}

    def draft_rates(
        self, members: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, dict[str, DraftRate]]:
        """What each model's drafts yield in each mode, over every member that reports what
        its engine learned (weighted by the tokens each counted)."""
        totals: dict[tuple[str, str], tuple[float, float, int]] = {}
        for _, content in MemberStates.of(members).having("drafts"):
            rates = _parsed_once(self._drafts, content.get("drafts"), draft_rate_entries, self)
            for model_id, mode, rate in rates:
                accepted, drafted, tokens = totals.get((model_id, mode), (0.0, 0.0, 0))
                totals[model_id, mode] = (
                    accepted + rate.accepted_per_token * rate.tokens,
                    drafted + rate.drafted_per_token * rate.tokens,
                    tokens + rate.tokens,
                )
        found: dict[str, dict[str, DraftRate]] = {}
        for (model_id, mode), total in sorted(totals.items()):
            if (merged := DraftRate.of(*total)) is not None:
                found.setdefault(model_id, {})[mode] = merged
        return found

    def claims_in(self, content: Mapping[str, Any], origin: str) -> tuple[Claim, ...]:
        """The claims a node makes for itself (a claim naming another primary is ignored)."""
        raw = content.get("claims")
        memo = self._claims.get(id(raw))
        if memo is not None and memo[0] is raw and memo[1] == origin:
            return memo[2]
        found = parse_claims(raw, origin)
        _remember(self._claims, id(raw), (raw, origin, found), self.memo_size)
        return found

    def ranked_claims(self, members: Mapping[str, Mapping[str, Any]]) -> dict[str, list[Claim]]:
        """For each replica of each model (by `Claim.unit`), the claims among `members`,
        highest rank first."""
        found: dict[str, list[Claim]] = {}
        for origin, content in MemberStates.of(members).having("claims"):
            for claim in self.claims_in(content, origin):
                found.setdefault(claim.unit, []).append(claim)
        for claims in found.values():
            claims.sort(key=lambda claim: claim.rank, reverse=True)
        return found

    def current_claims(self, members: Mapping[str, Mapping[str, Any]]) -> dict[str, Claim]:
        """For each replica of each model, the highest-ranked claim among `members`."""
        return {unit: ranked[0] for unit, ranked in self.ranked_claims(members).items()}


_Entries = TypeVar("_Entries")


def _parsed_once(
    memo: OrderedDict[int, tuple[object, _Entries]],
    raw: object,
    parse: Callable[[object], _Entries],
    reader: GossipReader,
) -> _Entries:
    """`parse(raw)`, remembered for the object `raw` (a decoded gossiped value never changes)."""
    found = memo.get(id(raw))
    if found is None or found[0] is not raw:
        found = (raw, parse(raw))
        _remember(memo, id(raw), found, reader.memo_size)
    return found[1]


def _remember(memo: OrderedDict[int, Any], key: int, value: Any, size: int) -> None:
    memo[key] = value
    memo.move_to_end(key)
    while len(memo) > size:
        memo.popitem(last=False)


def _parse_request(model_id: str, entry: dict[str, Any]) -> ModelRequest | None:
    try:
        profile = profile_from_dict(entry.get("profile"))
    except ValueError:
        return None
    context, slots, policy = entry.get("context"), entry.get("slots"), entry.get("speculation")
    least, most = (
        _replica_count(entry.get("min_replicas")),
        _replica_count(entry.get("max_replicas")),
    )
    return ModelRequest(
        model_id,
        profile,
        context if is_count(context) and context > 0 else 4096,
        primary_must_hold=True,
        slots=slots if is_count(slots) and 1 <= slots <= MAX_SLOTS else 1,
        replicas=min(least, most),
        min_replicas=min(least, most),
        max_replicas=most,
        speculation=SpeculationPolicy.named(policy if isinstance(policy, str) else "off"),
        split="memory" if entry.get("split") == "memory" else "planner",
    )


def _replica_count(value: object) -> int:
    return value if is_count(value) and 1 <= value <= MAX_REPLICAS else 1


def offered_models(members: Mapping[str, Mapping[str, Any]]) -> dict[str, ModelRequest]:
    return GossipReader().offered_models(members)


def claims_in(content: Mapping[str, Any], origin: str) -> tuple[Claim, ...]:
    return parse_claims(content.get("claims"), origin)


def current_claims(members: Mapping[str, Mapping[str, Any]]) -> dict[str, Claim]:
    return GossipReader().current_claims(members)


def gossiped_problem(members: Mapping[str, Mapping[str, Any]], model_id: str) -> str:
    """What the holders of a model (the lowest peer id first) say stops it from being served."""
    for _, content in MemberStates.of(members).having("problems"):
        problems = content.get("problems")
        if isinstance(problems, dict) and isinstance(problems.get(model_id), str):
            return str(problems[model_id])[:500]
    return "no primary elected yet"


def model_entries(content: Mapping[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    models = content.get("models")
    if not isinstance(models, list):
        return []
    return [
        (entry["id"], entry)
        for entry in models[:_MAX_MODELS_PER_NODE]
        if isinstance(entry, dict) and isinstance(entry.get("id"), str) and is_model_id(entry["id"])
    ]


def _figures_by_model(raw: object) -> Iterator[tuple[str, list[Any] | tuple[Any, ...]]]:
    """`{model: [figure, ...]}` as gossiped: the entries with a well-formed model id and a
    list of figures, among the first `MAX_DEMAND_ENTRIES`."""
    for model_id, figures in by_model(raw, MAX_DEMAND_ENTRIES):
        if isinstance(figures, list | tuple):
            yield model_id, figures


def demand_entries(raw: object) -> tuple[_NodeDemand, ...]:
    """A member's gossiped demand, `{model: [recent, bucket, ...]}` (`DEMAND_FIGURES` at most,
    buckets newest first): malformed entries are dropped, figures are capped, and only the
    first `MAX_DEMAND_ENTRIES` models count."""
    found = []
    for model_id, figures in _figures_by_model(raw):
        if not 1 <= len(figures) <= DEMAND_FIGURES:
            continue
        if all(is_finite(value) and value >= 0 for value in figures):
            capped = [min(float(value), MAX_DEMAND) for value in figures]
            found.append((model_id, capped[0], tuple(capped[1:])))
    return tuple(found)
