"""Hypothesis strategies for planner inputs: models, heterogeneous nodes, partial link graphs."""

from __future__ import annotations

from hypothesis import strategies as st
from sharedllm.scheduler.cluster import GIB, ClusterView, Link, NodeCapacity
from sharedllm.scheduler.model_profile import ModelProfile

MIB = 1024**2


@st.composite
def profiles(draw: st.DrawFn, max_layers: int = 24) -> ModelProfile:
    layers = draw(st.integers(min_value=1, max_value=max_layers))
    base = draw(st.integers(min_value=4 * MIB, max_value=800 * MIB))
    sizes = tuple(base + draw(st.integers(0, base // 8)) for _ in range(layers))
    embedding = draw(st.integers(min_value=MIB, max_value=2 * base))
    return ModelProfile(
        name="m",
        architecture="llama",
        layer_weight_bytes=sizes,
        embedding_bytes=embedding,
        output_bytes=draw(st.sampled_from([0, embedding])),
        other_bytes=4096,
        kv_bytes_per_token_per_layer=draw(st.sampled_from([256, 1024, 4096])),
        embedding_length=draw(st.sampled_from([640, 2048, 4096])),
        vocab_size=32000,
        context_length=4096,
    )


@st.composite
def views(
    draw: st.DrawFn, min_nodes: int = 1, max_nodes: int = 5, protocols: int = 1
) -> ClusterView:
    count = draw(st.integers(min_value=min_nodes, max_value=max_nodes))
    ids = [f"n{i}" for i in range(count)]
    nodes = [
        NodeCapacity(
            peer_id=peer_id,
            ram_bytes=draw(st.integers(min_value=1 * GIB, max_value=24 * GIB)),
            vram_bytes=draw(st.sampled_from([0, 0, 8 * GIB])),
            gflops=draw(st.floats(min_value=20.0, max_value=2000.0)),
            rpc_protocol=draw(st.sampled_from(["7.0.0", "6.0.0"][:protocols])),
            models=frozenset(),
        )
        for peer_id in ids
    ]
    links = [
        Link(
            a,
            b,
            draw(st.floats(min_value=0.1, max_value=200.0)),
            draw(st.floats(min_value=10.0, max_value=10_000.0)),
        )
        for i, a in enumerate(ids)
        for b in ids[i + 1 :]
        if draw(st.booleans()) or draw(st.booleans())
    ]
    return ClusterView.build(nodes, links)
