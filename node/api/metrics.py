"""`/metrics`: what a node sees of the mesh and of its API traffic, in Prometheus text format.

Mesh figures (members, links, placements, tunnels) are read from the same view `status` shows
at the moment of the scrape, so the two never disagree. API figures (requests by status,
generated tokens) are counted as answers pass through this node; tokens come from the
engine's own `timings` in the last part of each answer. Each app has its own registry, so
several nodes can live in one process (tests).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TAIL_BYTES = 16 * 1024  # the engine puts its timings in the answer's last event


class NodeMetrics:
    """The registry behind one node's `/metrics`."""

    def __init__(self, mesh_view: Callable[[], dict[str, Any]] | None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sharedllm_requests",
            "API requests answered by this node, by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "sharedllm_generated_tokens",
            "Tokens generated for requests that entered the mesh at this node",
            ["model"],
            registry=self.registry,
        )
        self.tokens_per_s = Gauge(
            "sharedllm_generation_tokens_per_second",
            "Generation speed the engine reported for the last answer",
            ["model"],
            registry=self.registry,
        )
        self.cut_off = Counter(
            "sharedllm_answers_cut_off",
            "Answers that ended early because the serving placement was lost",
            ["model"],
            registry=self.registry,
        )
        if mesh_view is not None:
            self.registry.register(_MeshCollector(mesh_view))
        self._traffic: dict[str, ModelTraffic] = {}

    def traffic(self) -> dict[str, dict[str, float | int | None]]:
        """Per model, what passed through this node's API (for `status`)."""
        return {model: vars(tally).copy() for model, tally in sorted(self._traffic.items())}

    def _tally(self, model_id: str) -> ModelTraffic:
        return self._traffic.setdefault(model_id, ModelTraffic())

    def refused(self, model_id: str) -> None:
        """A request for the model answered with an error before any engine answered."""
        self._tally(model_id).errors += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def answered(self, model_id: str, status: int, tail: bytes) -> None:
        """Counts a finished answer, and its tokens from the engine's timings in its tail."""
        tally = self._tally(model_id)
        if status >= 400:
            tally.errors += 1
            return
        tally.served += 1
        timings = engine_timings(tail)
        if timings is None:
            return
        generated, speed = timings
        self.tokens.labels(model_id).inc(generated)
        tally.tokens += generated
        if speed > 0:
            self.tokens_per_s.labels(model_id).set(speed)
            tally.last_tokens_per_s = speed

    def cut(self, model_id: str) -> None:
        self.cut_off.labels(model_id).inc()
        self._tally(model_id).errors += 1


@dataclass
class ModelTraffic:
    served: int = 0  # answers the engine gave
    errors: int = 0  # answered with an error, or cut off
    tokens: int = 0
    last_tokens_per_s: float | None = None


def engine_timings(tail: bytes) -> tuple[int, float] | None:
    """(tokens generated, tokens/s) from the last JSON object in `tail` that has llama-server's
    `timings` (a whole JSON answer, or the data lines of a server-sent event stream)."""
    text = tail.decode(errors="replace")
    events = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    candidates = [text, *reversed(events)]
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        timings = value.get("timings") if isinstance(value, dict) else None
        if isinstance(timings, dict):
            generated, speed = timings.get("predicted_n"), timings.get("predicted_per_second")
            if isinstance(generated, int) and isinstance(speed, int | float):
                return generated, float(speed)
    return None


class AnswerTail:
    """Keeps the last bytes of a relayed answer (bounded), for `NodeMetrics.answered`."""

    def __init__(self) -> None:
        self._data = bytearray()

    def add(self, chunk: bytes) -> None:
        self._data += chunk
        if len(self._data) > 2 * _TAIL_BYTES:
            del self._data[:-_TAIL_BYTES]

    def bytes(self) -> bytes:
        return bytes(self._data)


class _MeshCollector(Collector):
    def __init__(self, mesh_view: Callable[[], dict[str, Any]]) -> None:
        self._view = mesh_view

    def collect(self) -> Iterator[Metric]:
        view = self._view()
        yield from _member_metrics(view.get("peers", []))
        yield from _control_metrics(view.get("control_traffic", {}))
        yield from _state_metrics(view.get("gossiped_states", {}))
        refused = CounterMetricFamily(
            "sharedllm_data_plane_refused_connections",
            "Data-plane connections closed at once: too many waiting to authenticate, or too "
            "many streams from one member",
        )
        refused.add_metric([], view.get("data_plane_refused", 0))
        yield refused
        failed = CounterMetricFamily(
            "sharedllm_data_plane_refused_handshakes",
            "Data-plane connections whose authentication failed (strangers, revoked members)",
        )
        failed.add_metric([], view.get("data_plane_refused_handshakes", 0))
        yield failed
        yield _fault_metrics(view.get("handler_faults", []))
        yield from _model_metrics(view.get("models", {}))
        yield from _replica_metrics(view.get("models", {}))
        yield from _speculation_metrics(view.get("models", {}))


def _member_metrics(peers: list[Mapping[str, Any]]) -> Iterator[Metric]:
    members = GaugeMetricFamily(
        "sharedllm_members", "Mesh members this node knows, by state", labels=["state"]
    )
    counts: dict[str, int] = {}
    for peer in peers:
        state = str(peer.get("state"))
        counts[state] = counts.get(state, 0) + 1
    for state in ("self", "alive", "suspect", "dead", "left", "revoked"):
        members.add_metric([state], counts.get(state, 0))
    yield members
    rtt = GaugeMetricFamily(
        "sharedllm_peer_rtt_seconds", "Round-trip time to each peer", labels=["peer", "name"]
    )
    bandwidth = GaugeMetricFamily(
        "sharedllm_peer_bandwidth_bytes_per_second",
        "Measured bandwidth to each peer",
        labels=["peer", "name"],
    )
    for peer in peers:
        labels = [str(peer.get("peer_id")), str(peer.get("name", ""))]
        if isinstance(peer.get("rtt_ms"), int | float):
            rtt.add_metric(labels, peer["rtt_ms"] / 1000)
        if isinstance(peer.get("bandwidth_mbps"), int | float):
            bandwidth.add_metric(labels, peer["bandwidth_mbps"] * 1e6 / 8)
    yield rtt
    yield bandwidth


def _control_metrics(traffic: Mapping[str, int]) -> Iterator[Metric]:
    messages = CounterMetricFamily(
        "sharedllm_gossip_messages",
        "Control-plane messages (hello, gossip, probes) by direction",
        labels=["direction"],
    )
    sizes = CounterMetricFamily(
        "sharedllm_gossip_bytes", "Control-plane message bytes by direction", labels=["direction"]
    )
    for direction in ("sent", "received"):
        messages.add_metric([direction], traffic.get(f"messages_{direction}", 0))
        sizes.add_metric([direction], traffic.get(f"bytes_{direction}", 0))
    faults = CounterMetricFamily(
        "sharedllm_control_faults",
        "Control-plane exchanges that failed (malformed or oversized messages, timeouts)",
    )
    faults.add_metric([], traffic.get("faults", 0))
    refused = CounterMetricFamily(
        "sharedllm_refused_streams", "Streams refused because the peer had not proved membership"
    )
    refused.add_metric([], traffic.get("refused_streams", 0))
    hellos = CounterMetricFamily(
        "sharedllm_refused_hellos", "Hellos refused because their membership proof did not hold"
    )
    hellos.add_metric([], traffic.get("refused_hellos", 0))
    limited = CounterMetricFamily(
        "sharedllm_limited_hellos",
        "Hellos closed unread because their source address failed too often lately",
    )
    limited.add_metric([], traffic.get("limited_hellos", 0))
    yield from (messages, sizes, faults, refused, hellos, limited)


def _fault_metrics(rows: list[Mapping[str, Any]]) -> Metric:
    faults = CounterMetricFamily(
        "sharedllm_handler_faults",
        "Streams a handler ended with an error (closed, counted, the node unaffected), by "
        "plane, protocol and error type",
        labels=["plane", "protocol", "error"],
    )
    for row in rows:
        faults.add_metric(
            [str(row["plane"]), str(row["protocol"]), str(row["error"])], row["count"]
        )
    return faults


def _state_metrics(stats: Mapping[str, int]) -> Iterator[Metric]:
    states = CounterMetricFamily(
        "sharedllm_gossiped_states",
        "Gossiped states received, by outcome: accepted, stale (old or replayed versions), "
        "forged (bad signature or spoofed origin), refused (not a member)",
        labels=["outcome"],
    )
    for outcome in ("accepted", "stale", "forged", "refused"):
        states.add_metric([outcome], stats.get(outcome, 0))
    yield states


def _model_metrics(models: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
    serving = GaugeMetricFamily(
        "sharedllm_model_serving", "1 while the model's placement serves", labels=["model"]
    )
    epoch = GaugeMetricFamily(
        "sharedllm_model_epoch",
        "The placement's epoch (it grows with each re-plan)",
        labels=["model"],
    )
    predicted = GaugeMetricFamily(
        "sharedllm_model_predicted_tokens_per_second",
        "The planner's prediction for the chosen placement",
        labels=["model"],
    )
    restarts = CounterMetricFamily(
        "sharedllm_engine_restarts", "llama-server restarts on this node", labels=["model"]
    )
    out = CounterMetricFamily(
        "sharedllm_tunnel_sent_bytes",
        "Bytes this primary sent to a worker",
        labels=["model", "worker"],
    )
    back = CounterMetricFamily(
        "sharedllm_tunnel_received_bytes",
        "Bytes a worker sent back",
        labels=["model", "worker"],
    )
    replans = CounterMetricFamily(
        "sharedllm_replans",
        "Placements of a model replaced by a new one (new epoch or primary), as this node saw it",
        labels=["model"],
    )
    requests = CounterMetricFamily(
        "sharedllm_tunnel_engine_requests",
        "llama.cpp RPC requests this primary sent to a worker, by command",
        labels=["model", "worker", "command"],
    )
    for model_id, entry in models.items():
        serving.add_metric([model_id], 1.0 if entry.get("serving") else 0.0)
        if isinstance(entry.get("epoch"), int):
            epoch.add_metric([model_id], entry["epoch"])
        planned = entry.get("planned") or {}
        if isinstance(planned.get("predicted_tokens_per_s"), int | float):
            predicted.add_metric([model_id], planned["predicted_tokens_per_s"])
        restarts.add_metric([model_id], entry.get("engine_restarts", 0))
        replans.add_metric([model_id], entry.get("replans", 0))
        for worker, stats in (entry.get("tunnels") or {}).items():
            out.add_metric([model_id, worker], stats.get("bytes_out", 0))
            back.add_metric([model_id, worker], stats.get("bytes_back", 0))
            for command, tally in (stats.get("requests") or {}).items():
                requests.add_metric([model_id, worker, command], tally.get("requests", 0))
    yield from (serving, epoch, predicted, restarts, replans, out, back, requests)


def _replica_metrics(models: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
    labels = ["model", "replica", "primary"]
    ready = GaugeMetricFamily(
        "sharedllm_replica_ready", "1 while the replica takes requests", labels=labels
    )
    in_flight = GaugeMetricFamily(
        "sharedllm_replica_in_flight_requests",
        "Requests this node has sent to the replica and not seen end",
        labels=labels,
    )
    routed = CounterMetricFamily(
        "sharedllm_replica_routed_requests",
        "Requests this node has sent to the replica",
        labels=labels,
    )
    demand = GaugeMetricFamily(
        "sharedllm_model_demand_requests",
        "The model's requests in flight over the mesh, averaged over the last half minute",
        labels=["model"],
    )
    wanted = GaugeMetricFamily(
        "sharedllm_model_replicas_wanted",
        "Replicas the model's demand asks for (within its minimum and maximum)",
        labels=["model"],
    )
    for model_id, entry in models.items():
        asked = entry.get("demand") or {}
        if isinstance(asked.get("requests_in_flight"), int | float):
            demand.add_metric([model_id], asked["requests_in_flight"])
        if isinstance(asked.get("replicas_wanted"), int):
            wanted.add_metric([model_id], asked["replicas_wanted"])
        for replica in entry.get("replicas") or []:
            key = [model_id, str(replica.get("replica")), str(replica.get("primary") or "")]
            ready.add_metric(key, 1.0 if replica.get("state") == "ready" else 0.0)
            in_flight.add_metric(key, replica.get("in_flight", 0))
            routed.add_metric(key, replica.get("routed", 0))
    yield from (ready, in_flight, routed, demand, wanted)


def _speculation_metrics(models: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
    speculating = GaugeMetricFamily(
        "sharedllm_speculation_on",
        "1 while the model's placement drafts tokens (n-gram speculation)",
        labels=["model"],
    )
    accepted = GaugeMetricFamily(
        "sharedllm_draft_accepted_per_token",
        "Drafts accepted per generated token, as the planner weighs speculation by",
        labels=["model"],
    )
    checked = GaugeMetricFamily(
        "sharedllm_draft_checked_per_token",
        "Drafts checked per generated token, as the planner weighs speculation by",
        labels=["model"],
    )
    for model_id, entry in models.items():
        speculation = entry.get("speculation") or {}
        if speculation.get("mode") is not None:
            speculating.add_metric([model_id], 1.0 if speculation["mode"] != "off" else 0.0)
        if speculation.get("learned_tokens"):
            accepted.add_metric([model_id], speculation.get("accepted_per_token", 0.0))
            checked.add_metric([model_id], speculation.get("drafted_per_token", 0.0))
    yield from (speculating, accepted, checked)
