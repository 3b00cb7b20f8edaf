"""The cost model: predicted memory and time of a placement (GUIDE.md section 5).

Star topology: the primary drives every token through each worker that holds layers, one after
another. Per generated token:

    time = sum over nodes of compute(layers) / speed
         + compute(output head) / speed of the primary
         + sum over workers of (round trips x RTT + bytes per token / bandwidth + overhead)

The constants are named parameters so that they can be calibrated against the real engine.
Defaults come from measurements of the pinned llama.cpp on the gemma 270M model; each node's
speed is its own engine's generation rate turned into this model's units (`gflops_for`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .cluster import ClusterView, NodeCapacity
from .model_profile import ModelProfile

MIB = 1024**2


@dataclass(frozen=True)
class CostModel:
    # Compute: arithmetic per byte of weights per token (2 flops per parameter; quantised weights
    # hold about half a parameter per byte at 4-5 bits).
    flops_per_weight_byte: float = 4.0
    # Network: llama.cpp RPC makes about one blocking round trip per worker per generated token.
    round_trips_per_token_per_worker: float = 1.05
    # Network: bytes per token per worker besides the hidden state (graph commands, ~6.8 KB up).
    rpc_overhead_bytes_per_token: int = 4_300
    # Network: the hidden state crosses each worker link in f32, up and back.
    activation_bytes_per_element: int = 4
    # Per worker per token, beyond its link: the engines' RPC handling (and, where a node
    # relays a tunnel, its local hops). Fitted on the serving bench (loopback, 2 cores, one
    # engine thread each) with the engines sealing their own tunnels: at 3.3 ms (fitted with
    # the native relay) splits 6/6/6 and 9/9 were predicted at 38.5 and 46.9 tok/s, measured
    # 42.9 and 48.5 (bench-20261205T083537Z.json); at 2.2 ms they were 2% and 5% off in a
    # 9-round run (bench-20261205T092208Z.json). A GPU machine's direct RPC shows about 1 ms.
    worker_overhead_s: float = 0.0022
    # Memory: engine compute buffers per node, and a share of memory left free.
    compute_buffer_bytes: int = 256 * MIB
    memory_headroom_fraction: float = 0.05
    # Prompt processing: tokens per batch, and how much faster batched compute is per token.
    prompt_batch_tokens: int = 512
    prompt_compute_speedup: float = 6.0
    prompt_round_trips_per_batch_per_worker: float = 3.0
    # Speculation: what one drafted token adds to a pass, as a share of the placement's compute
    # per token. On a CPU each checked token costs most of a token (the output head is a full
    # matrix product per token): fitted on the speculation bench (2 cores, Gemma 270M). A GPU
    # checks a few more tokens in the same weight read: assumed, not yet measured.
    draft_compute_share: float = 0.45
    draft_compute_share_gpu: float = 0.05

    def memory_budget(self, node: NodeCapacity) -> int:
        """Bytes of a node usable for weights and KV cache."""
        usable = int(node.usable_bytes * (1.0 - self.memory_headroom_fraction))
        return usable - self.compute_buffer_bytes

    def layer_memory(self, profile: ModelProfile, context: int) -> int:
        """Conservative bytes per layer: the largest layer plus its KV cache."""
        return max(profile.layer_weight_bytes) + profile.kv_bytes_per_token_per_layer * context

    def primary_extra_memory(self, profile: ModelProfile) -> int:
        """What the primary holds besides layers: embeddings, output head, norms."""
        return profile.embedding_bytes + profile.output_bytes + profile.other_bytes

    def layer_seconds(self, profile: ModelProfile, node: NodeCapacity) -> float:
        """Compute time of one (average) layer on `node` per generated token."""
        average = sum(profile.layer_weight_bytes) / profile.layer_count
        return average * self.flops_per_weight_byte / (node.gflops * 1e9)

    def head_seconds(self, profile: ModelProfile, primary: NodeCapacity) -> float:
        """The output head runs on the primary (its weights are kept there)."""
        head = profile.output_bytes or profile.embedding_bytes
        return head * self.flops_per_weight_byte / (primary.gflops * 1e9)

    def gflops_for(self, profile: ModelProfile, tokens_per_s: float) -> float:
        """The speed for which this model predicts `tokens_per_s` on one node holding all of
        `profile`: how a node turns its engine's measured generation speed into its figure."""
        head = profile.output_bytes or profile.embedding_bytes
        weight_bytes = sum(profile.layer_weight_bytes) + head
        return weight_bytes * self.flops_per_weight_byte * tokens_per_s / 1e9

    def bytes_per_token(self, profile: ModelProfile) -> int:
        return self.rpc_overhead_bytes_per_token + 2 * profile.embedding_length * (
            self.activation_bytes_per_element
        )

    def worker_link_seconds(
        self, view: ClusterView, profile: ModelProfile, primary: str, worker: str
    ) -> float | None:
        """Per-token network time of one worker; None if the primary cannot reach it."""
        if worker == primary:
            return 0.0
        out, back = view.link(primary, worker), view.link(worker, primary)
        if out is None or back is None or out.bandwidth_mbps <= 0:
            return None
        rtt_s = max(out.rtt_ms, back.rtt_ms) / 1000.0
        transfer_s = self.bytes_per_token(profile) * 8 / (out.bandwidth_mbps * 1e6)
        return self.round_trips_per_token_per_worker * rtt_s + transfer_s + self.worker_overhead_s

    def draft_seconds(self, compute_s: float, on_gpu: bool, transfer_s: float) -> float:
        """What one drafted token adds to a pass: its share of the placement's compute per
        token (`compute_s`), and its hidden state across the workers' links (`transfer_s`)."""
        share = self.draft_compute_share_gpu if on_gpu else self.draft_compute_share
        return share * compute_s + transfer_s

    def draft_model_seconds(self, draft: ModelProfile, primary: NodeCapacity) -> float:
        """One pass of a draft model, all of it on the primary: what each token it drafts adds
        besides checking that token."""
        return draft.layer_count * self.layer_seconds(draft, primary) + self.head_seconds(
            draft, primary
        )

    def draft_model_memory(self, draft: ModelProfile, kv_tokens: int) -> int:
        """A draft model on the primary: all its weights, its KV cache for the same tokens as
        the model's, and a compute buffer of its own."""
        kv = draft.kv_cache_bytes(draft.layer_count, kv_tokens)
        return draft.total_weight_bytes + kv + self.compute_buffer_bytes

    def activation_seconds(
        self, view: ClusterView, profile: ModelProfile, primary: str, worker: str
    ) -> float:
        """One token's hidden state to a worker and back (0 if the link is unknown)."""
        link = view.link(primary, worker)
        if worker == primary or link is None or link.bandwidth_mbps <= 0:
            return 0.0
        size = 2 * profile.embedding_length * self.activation_bytes_per_element
        return size * 8 / (link.bandwidth_mbps * 1e6)

    def prompt_tokens_per_s(
        self, view: ClusterView, profile: ModelProfile, primary: str, layers: dict[str, int]
    ) -> float:
        """Predicted prompt processing speed for one batch."""
        batch = self.prompt_batch_tokens
        compute = self.head_seconds(profile, view.node(primary))
        network = 0.0
        for peer_id, count in layers.items():
            node = view.node(peer_id)
            compute += count * self.layer_seconds(profile, node)
            if peer_id != primary and count > 0:
                link = view.link(primary, peer_id)
                assert link is not None
                network += self.prompt_round_trips_per_batch_per_worker * link.rtt_ms / 1000.0
                network += batch * self.bytes_per_token(profile) * 8 / (link.bandwidth_mbps * 1e6)
        seconds = batch * compute / self.prompt_compute_speedup + network
        return batch / seconds
