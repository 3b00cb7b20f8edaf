"""Planner benchmark: plan time by cluster size, and predicted tokens/s of our plan against the
baselines over generated heterogeneous clusters (same cost model for all)."""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from typing import Any

from sharedllm.scheduler.baselines import BASELINES
from sharedllm.scheduler.cluster import GIB, ClusterView, Link, NodeCapacity
from sharedllm.scheduler.cost_model import CostModel
from sharedllm.scheduler.model_profile import ModelProfile
from sharedllm.scheduler.placement import ModelRequest, PlannerError
from sharedllm.scheduler.planner import plan_model

MIB = 1024**2


def model(layers: int, layer_mib: int, embedding_mib: int, name: str) -> ModelProfile:
    return ModelProfile(
        name=name,
        architecture="llama",
        layer_weight_bytes=(layer_mib * MIB,) * layers,
        embedding_bytes=embedding_mib * MIB,
        output_bytes=embedding_mib * MIB,
        other_bytes=0,
        kv_bytes_per_token_per_layer=4096 if layers < 60 else 8192,
        embedding_length=4096,
        vocab_size=128_000,
        context_length=8192,
    )


MODELS = {
    "8B-Q4": model(32, 130, 280, "8B-Q4"),
    "32B-Q4": model(64, 290, 400, "32B-Q4"),
    "70B-Q4": model(80, 500, 560, "70B-Q4"),
}


def generate_cluster(rng: random.Random, size: int, model_id: str) -> ClusterView:
    """Home-lab style: mixed RAM, some GPUs, CPUs of different ages, LAN and Wi-Fi/VPN links."""
    nodes = []
    for i in range(size):
        gpu = rng.random() < 0.25
        nodes.append(
            NodeCapacity(
                peer_id=f"node{i:03d}",
                ram_bytes=rng.choice([8, 16, 16, 24, 32, 64]) * GIB,
                vram_bytes=rng.choice([8, 12, 16, 24]) * GIB if gpu else 0,
                gflops=(rng.uniform(1500, 6000) if gpu else 10 ** rng.uniform(1.5, 2.7)),
                models=frozenset({model_id}) if rng.random() < 0.3 or i == 0 else frozenset(),
            )
        )
    sites = [rng.randrange(max(1, size // 4)) for _ in range(size)]
    links = []
    for i in range(size):
        for j in range(i + 1, size):
            same_site = sites[i] == sites[j]
            rtt = rng.uniform(0.3, 3) if same_site else 10 ** rng.uniform(0.0, 2.0)
            bandwidth = rng.choice([1000, 2500]) if same_site else rng.choice([50, 100, 300])
            links.append(Link(nodes[i].peer_id, nodes[j].peer_id, rtt, bandwidth))
    return ClusterView.build(nodes, links)


def plan_time(size: int, repeats: int = 5) -> dict[str, float]:
    rng = random.Random(1000 + size)
    views = [generate_cluster(rng, size, "70B-Q4") for _ in range(repeats)]
    request = ModelRequest("70B-Q4", MODELS["70B-Q4"])
    timings = []
    for view in views:
        start = time.perf_counter()
        with contextlib.suppress(PlannerError):
            plan_model(view, request)
        timings.append((time.perf_counter() - start) * 1000)
    return {
        "nodes": size,
        "median_ms": statistics.median(timings),
        "min_ms": min(timings),
        "max_ms": max(timings),
    }


def quality(clusters: int = 300, seed: int = 7) -> dict[str, Any]:
    """Ratio ours / baseline of predicted tokens/s, over clusters where both are feasible."""
    rng = random.Random(seed)
    cost = CostModel()
    ratios: dict[str, list[float]] = {name: [] for name in BASELINES}
    infeasible: dict[str, int] = {name: 0 for name in BASELINES}
    planned = 0
    for _ in range(clusters):
        model_id = rng.choice(list(MODELS))
        view = generate_cluster(rng, rng.randint(3, 8), model_id)
        request = ModelRequest(model_id, MODELS[model_id], rng.choice([2048, 4096, 8192]))
        try:
            ours = plan_model(view, request, cost)
        except PlannerError:
            continue
        planned += 1
        for name, baseline in BASELINES.items():
            theirs = baseline(view, request, cost)
            if theirs is None:
                infeasible[name] += 1
            else:
                ratios[name].append(ours.tokens_per_s / theirs.tokens_per_s)
    return {
        "clusters": clusters,
        "planned": planned,
        "baselines": {
            name: {
                "median_ratio": statistics.median(values) if values else None,
                "p10_ratio": _quantile(values, 0.10),
                "p90_ratio": _quantile(values, 0.90),
                "min_ratio": min(values) if values else None,
                "compared": len(values),
                "baseline_infeasible": infeasible[name],
            }
            for name, values in ratios.items()
        },
    }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run() -> dict[str, Any]:
    timings = [plan_time(n) for n in (8, 64, 256)]
    print("planner: plan time (70B-class model, 80 layers)")
    print(f"  {'nodes':>6} {'median ms':>10} {'min':>8} {'max':>8}")
    for t in timings:
        print(f"  {t['nodes']:>6} {t['median_ms']:>10.1f} {t['min_ms']:>8.1f} {t['max_ms']:>8.1f}")
    result = quality()
    print(
        f"planner: predicted tokens/s, ours / baseline, over {result['planned']} generated clusters"
    )
    header = ("baseline", "median", "p10", "p90", "min", "compared", "it cannot fit")
    print("  {:<22} {:>7} {:>7} {:>7} {:>7} {:>9} {:>14}".format(*header))
    for name, entry in result["baselines"].items():
        if entry["median_ratio"] is None:
            print(f"  {name:<22} {'-':>7}")
            continue
        print(
            f"  {name:<22} {entry['median_ratio']:>7.2f} {entry['p10_ratio']:>7.2f} "
            f"{entry['p90_ratio']:>7.2f} {entry['min_ratio']:>7.2f} {entry['compared']:>9} "
            f"{entry['baseline_infeasible']:>14}"
        )
    return {"plan_time": timings, "quality": result}
