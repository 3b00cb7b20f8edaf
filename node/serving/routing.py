"""The API's view of serving: which models exist, where each request goes, and why not."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import trio

from ...mesh.claims import Claim
from ...mesh.election import ModelState
from ...mesh.transport.tunnel import (
    TunnelListener,
    TunnelRequest,
)
from ...scheduler.replica_demand import Demand
from ...scheduler.speculation import DRAFTING_MODES
from ..engine.unix_socket import ENGINE_BASE_URL
from .parts import ServingParts
from .replica_choice import ReplicaLoad, choose_replica
from .upstream import (
    CountedUpstream,
    HttpUpstream,
    ModelEntry,
    ModelNotFound,
    ModelRequired,
    Upstream,
    UpstreamUnavailable,
)


class ApiRouting(ServingParts):
    """What the HTTP API asks of serving: the models, where a request goes, health, status."""

    def models(self) -> Sequence[ModelEntry]:
        return [
            ModelEntry(
                model_id,
                self._local[model_id].created if model_id in self._local else 0,
                self.kinds.get(model_id, "text"),
                profile=state.request.profile,
                context=state.request.context,
            )
            for model_id, state in sorted(self.model_states.items())
        ]

    def resolve(self, name: str | None) -> str:
        """The model a request is for: its name or an alias; with no name, or a name the mesh
        does not know, the mesh's only model (as llama-server answers any name), unless
        `strict_model_names`; otherwise none (ModelRequired, ModelNotFound)."""
        if name is not None:
            if name in self.model_states:
                return name
            if name in self.aliases:
                return self.aliases[name]
            if self._recently_offered.gone_for(name, trio.current_time()) is not None:
                return name  # its holder restarts: "unavailable, retry" (503), not 404
        offered = sorted(self.model_states)
        if len(offered) == 1 and (name is None or not self._config.strict_model_names):
            return offered[0]
        if name is None:
            raise ModelRequired(
                "'model' is a required property"
                + (f" (this mesh offers {', '.join(offered)})" if offered else "")
            )
        raise ModelNotFound(name)

    def route(self, model_id: str, affinity: str | None = None) -> Upstream:
        """The upstream of the replica `choose_replica` picks among those serving now."""
        now = trio.current_time()
        serving = self._serving_replicas(model_id)
        if not serving:
            unavailable = self._unavailable(model_id)
            raise UpstreamUnavailable(*(unavailable or ("no replica serves yet", True)))
        by_key = {(c.model_id, c.epoch, c.primary): c for c in serving}
        loads = [
            ReplicaLoad(key, c.slots, self._in_flight.count(key, now), self._rtt_ms(c.primary))
            for key, c in by_key.items()
        ]
        chosen = choose_replica(loads, affinity, self._in_flight.failed(now)).key
        claim = by_key[chosen]
        if claim.primary == self._me:
            http = self._primary_jobs[(model_id, claim.rank)].http
            assert http is not None
            upstream = HttpUpstream(http, ENGINE_BASE_URL)
        else:
            upstream = HttpUpstream(self._client, f"http://{self._api_tunnel(claim).endpoint}")
        return CountedUpstream(upstream, self._in_flight, chosen)

    def replicas_of(self, model_id: str) -> list[ModelState]:
        """The model's replicas as this node sees them, the first one first."""
        return [s for s in self.unit_states.values() if s.request.model_id == model_id]

    def _serving_replicas(self, model_id: str) -> list[Claim]:
        """The placements of the model's replicas that take requests now."""
        return [
            claim
            for state in self.replicas_of(model_id)
            if (claim := state.routed) is not None and self._claim_unavailable(claim) is None
        ]

    def _rtt_ms(self, peer: str) -> float:
        if peer == self._me:
            return 0.0
        links = self._service.member_states().get(self._me, {}).get("links")
        link = links.get(peer) if isinstance(links, dict) else None
        rtt = link.get("rtt_ms") if isinstance(link, dict) else None
        return float(rtt) if isinstance(rtt, int | float) and 0 <= rtt < 1e6 else 1000.0

    def _unavailable(self, model_id: str) -> tuple[str, bool] | None:
        """Why requests for the model cannot be served now, and whether that should pass soon
        (None: they can be served)."""
        state = self.model_states.get(model_id)
        if state is None:
            gone_for = self._recently_offered.gone_for(model_id, trio.current_time())
            if gone_for is None:
                raise ModelNotFound(model_id)
            return f"no member holding it has been reachable for {gone_for:.0f} s", True
        if self._serving_replicas(model_id):
            return None
        claim = state.routed
        if claim is None:
            return (state.problem, False) if state.problem else ("no primary elected yet", True)
        return self._claim_unavailable(claim)

    def _claim_unavailable(self, claim: Claim) -> tuple[str, bool] | None:
        """Why one placement cannot take requests now (None: it can)."""
        members = self._service.member_states()
        gone = [node for node in (claim.primary, *claim.nodes) if node not in members]
        if gone:
            return f"re-planning after node {self._name_of(gone[0])} left", True
        if not claim.serving:
            nodes = len(claim.nodes)
            return f"loading on {claim.primary[-8:]} (epoch {claim.epoch}, {nodes} nodes)", True
        if claim.primary == self._me:
            job = self._primary_jobs.get((claim.model_id, claim.rank))
            if job is None or job.endpoint() is None:
                return "the local engine is restarting", True
        return None

    def health(self) -> tuple[bool, dict[str, str]]:
        missing = self._recently_offered.missing(self.model_states, trio.current_time())
        states = {
            model_id: self._state_in_words(model_id)
            for model_id in sorted([*self.model_states, *missing])
        }
        return bool(states) and all(s == "ready" for s in states.values()), states

    def _api_tunnel(self, claim: Claim) -> TunnelListener:
        key = (claim.model_id, claim.epoch, claim.primary)
        if key not in self._api_tunnels:
            assert self._nursery is not None
            listener = TunnelListener(
                self._opener(claim.primary),
                TunnelRequest("api", claim.model_id, claim.epoch),
                allowed_pids=lambda: (os.getpid(),),  # only this node's own HTTP client
                native=self._native_relay,
            )
            scope = trio.CancelScope()
            self._api_tunnels[key] = (listener, scope)

            async def run() -> None:
                with scope:
                    await listener.run()

            self._nursery.start_soon(run)
        return self._api_tunnels[key][0]

    def served_tunnels(self) -> dict[str, dict[str, int]]:
        """Traffic of the tunnels other nodes opened to this one, by the peer that opened them."""
        return {peer: stats.as_dict() for peer, stats in sorted(self.worker_stats.items())}

    def describe(self) -> dict[str, Any]:
        """Each model's placement as this node sees it (for `status` and `peers`)."""
        described = {}
        demand = self.elector.reader.mesh_demand(self._service.member_states())
        for model_id, state in sorted(self.model_states.items()):
            claim = state.current
            job = None if claim is None else self._primary_jobs.get((model_id, claim.rank))
            entry: dict[str, Any] = {
                "state": self._state_in_words(model_id),
                "primary": None if claim is None else claim.primary,
                "epoch": None if claim is None else claim.epoch,
                "serving": claim is not None and claim.serving,
                "slots": None if claim is None else claim.slots,
                "speculation": _describe_speculation(claim, state),
                "context": state.request.context,
                "assignments": []
                if claim is None
                else [
                    {"node": node, "first_layer": first, "last_layer": last}
                    for node, first, last in claim.layers
                ],
                "planned": None if state.planned is None else state.planned.as_dict(),
                "problem": (job.problem if job is not None else None) or state.problem,
                "tunnels": {}
                if job is None
                else {
                    worker: {
                        **t.stats.as_dict(),
                        "requests": job.requests[worker].as_dict(t.stats.native_rpc_counts()),
                    }
                    for worker, t in job.tunnels.items()
                },
                "unused": {} if claim is None else self._unused_nodes(claim),
                "serving_meanwhile": None if state.previous is None else state.previous.epoch,
                "replans": self.replans.get(model_id, 0),
                "engine_restarts": 0
                if job is None or job.supervisor is None
                else job.supervisor.restarts,
                "replicas": [self._describe_replica(r) for r in self.replicas_of(model_id)],
                "demand": _describe_demand(state, demand.get(model_id)),
            }
            described[model_id] = entry
        return described

    def _describe_replica(self, state: ModelState) -> dict[str, Any]:
        """One replica: where it runs, and the requests this node sends it."""
        claim, now = state.routed, trio.current_time()
        key = None if claim is None else (claim.model_id, claim.epoch, claim.primary)
        why = None if claim is None else self._claim_unavailable(claim)
        return {
            "replica": state.request.replica + 1,
            "primary": None if claim is None else claim.primary,
            "epoch": None if claim is None else claim.epoch,
            "nodes": [] if claim is None else list(claim.nodes),
            "slots": None if claim is None else claim.slots,
            "state": (state.problem or "waiting for a placement")
            if claim is None
            else ("ready" if why is None else why[0]),
            "in_flight": 0 if key is None else self._in_flight.count(key, now),
            "routed": 0 if key is None else self._in_flight.routed.get(key, 0),
        }

    def _unused_nodes(self, claim: Claim) -> dict[str, str]:
        """Why each live member outside a placement is left out of it."""
        members = self._service.member_states()
        primary = members.get(claim.primary, {})
        placed = {claim.primary, *claim.nodes}
        unused = {}
        for peer, content in members.items():
            if peer in placed:
                continue
            theirs, ours = content.get("rpc_protocol"), primary.get("rpc_protocol")
            if theirs != ours:
                unused[peer] = f"engine RPC protocol {theirs} differs from the primary's {ours}"
            else:
                unused[peer] = "not needed by the plan (fewer nodes are faster)"
        return unused

    def _state_in_words(self, model_id: str) -> str:
        unavailable = self._unavailable(model_id)
        return "ready" if unavailable is None else unavailable[0]


def _describe_demand(state: ModelState, found: Demand | None) -> dict[str, Any]:
    """The model's demand over the mesh, and the replicas it asks for."""
    request = state.request
    return {
        "requests_in_flight": 0.0 if found is None else found.recent,
        "peak_requests_in_flight": 0.0 if found is None else found.peak,
        "replicas_wanted": request.replicas,
        "min_replicas": request.min_replicas,
        "max_replicas": request.max_replicas,
    }


def _describe_speculation(claim: Claim | None, state: ModelState) -> dict[str, Any]:
    """The placement's speculation mode, what the holder allows, and the draft rate the
    planner weighs it by (`learned_tokens` 0: the prior, nothing learned yet)."""
    policy = state.request.speculation
    mode = None if claim is None else claim.speculation
    shown = policy.rate(mode if mode in DRAFTING_MODES else "ngram")
    return {
        "mode": mode,
        "allowed": list(policy.modes),
        # the rate of the mode the placement runs (of n-grams when it runs none)
        "accepted_per_token": shown.accepted_per_token,
        "drafted_per_token": shown.drafted_per_token,
        "learned_tokens": shown.tokens,
        "draft_model_holders": [holder for holder, _ in state.request.drafts],
    }
