"""Scale benchmark: what parallel slots and replicas add, real nodes serving Gemma 270M.

Slots: one `sharedllm-node` at a time, its engine with 1 slot, then the default 4, then 16 (one
per client). Replicas: four nodes on loopback, each engine on one thread (so that each replica
has a core of its own), asked for 1 and then 2 replicas; then two models at once on four such
nodes, each model asked by half of 16 clients. For 1, 4 and 16 concurrent streaming
clients (each its own `user`), each sending `REQUESTS` completions of `TOKENS` tokens one after
another to the first node's API: aggregate generated tokens/s over the run, and p50/p95 time
to the first token. Every run is bounded (clients x requests x tokens) and stops by itself.
Targets (issue 25): with 16 clients, parallel slots give at least 2x one slot's tokens/s, and
2 replicas at least 1.6x one replica's, with p95 time to first token no worse.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from sharedllm.node.config import default_cache_dir
from sharedllm.node.models.default_model import default_model_path

from .bench_nodes import BenchNode, invite, wait_until

CLIENTS = (1, 4, 16)
SLOTS = (1, 4, 16)
REQUESTS = 2
TOKENS = 32
CONTEXT = 512


def _text_of(chunk: str) -> str:
    choices = json.loads(chunk).get("choices") or [{}]
    return str(choices[0].get("text") or "")


def _client(url: str, model_id: str, ttfts: list[float], tokens: list[int], user: str) -> None:
    body = {"model": model_id, "prompt": "Once upon a time", "max_tokens": TOKENS, "user": user}
    body.update(temperature=0, ignore_eos=True, stream=True)
    for _ in range(REQUESTS):
        sent, first, count = time.monotonic(), None, 0
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as answer:
            answer.raise_for_status()
            for line in answer.iter_lines():
                if line.startswith("data: {") and _text_of(line[len("data: ") :]):
                    first = first or time.monotonic()
                    count += 1
        ttfts.append((first or time.monotonic()) - sent)
        tokens.append(count)


def _run_together(threads: list[threading.Thread]) -> float:
    """Starts the threads at once and waits for all (bounded); the seconds that took."""
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    return time.monotonic() - started


def _measure(node: BenchNode, model_id: str, clients: int) -> dict[str, Any]:
    ttfts: list[float] = []
    tokens: list[int] = []
    threads = [
        threading.Thread(target=_client, args=(node.url, model_id, ttfts, tokens, f"user-{i}"))
        for i in range(clients)
    ]
    wall = _run_together(threads)
    ordered = sorted(ttfts)
    return {
        "clients": clients,
        "requests": len(ttfts),
        "tokens": sum(tokens),
        "seconds": round(wall, 2),
        "tokens_per_s": round(sum(tokens) / wall, 2),
        "ttft_p50_s": round(statistics.median(ordered), 3),
        "ttft_p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
    }


def _slots_run(work: Path, model: Path, slots: int) -> list[dict[str, Any]]:
    args = ("--model", str(model), "--parallel-slots", str(slots))
    node = BenchNode(work, f"slots{slots}", *args, "--context-size", str(CONTEXT))
    try:
        wait_until(node.healthy, 300, f"the node with {slots} slots to serve")
        model_id = model.name.removesuffix(".gguf")
        got = node.status()["models"][model_id]["slots"]
        if got != slots:
            raise RuntimeError(f"asked for {slots} slots, the plan gave {got}")
        _measure(node, model_id, 1)  # warm the engine's caches before measuring
        return [_measure(node, model_id, clients) for clients in CLIENTS]
    finally:
        node.stop()


def _replicas_run(work: Path, model: Path, replicas: int) -> list[dict[str, Any]]:
    fixed = ["--min-replicas", str(replicas), "--max-replicas", str(replicas)]
    args = ["--model", str(model), *fixed, "--threads", "1"]
    args += ["--context-size", str(CONTEXT)]
    home = work / f"replicas{replicas}"
    home.mkdir(parents=True, exist_ok=True)
    nodes = [BenchNode(home, "a", *args)]
    try:
        token = invite(nodes[0], uses=3)
        nodes += [BenchNode(home, n, "--join", token, *args) for n in "bcd"]
        model_id = model.name.removesuffix(".gguf")

        def all_ready() -> bool:
            if not all(node.healthy() for node in nodes):
                return False
            found = nodes[0].status()["models"][model_id]["replicas"]
            return len(found) == replicas and all(r["state"] == "ready" for r in found)

        wait_until(all_ready, 300, f"{replicas} replicas to serve")
        _measure(nodes[0], model_id, 1)
        return [_measure(nodes[0], model_id, clients) for clients in CLIENTS]
    finally:
        for node in nodes:
            node.stop()


def _two_models_run(work: Path, model: Path) -> dict[str, Any]:
    """Four nodes as in the replica runs, two models at once: a and b hold Gemma, c and d a
    copy of it under another name, one placement each; half the clients ask each model."""
    home = work / "two-models"
    home.mkdir(parents=True, exist_ok=True)
    other = home / "gemma-copy.gguf"
    shutil.copyfile(model, other)
    common = ["--min-replicas", "1", "--max-replicas", "1", "--threads", "1"]
    common += ["--context-size", str(CONTEXT)]
    nodes = [BenchNode(home, "a", "--model", str(model), *common)]
    try:
        token = invite(nodes[0], uses=3)
        for name, held in (("b", model), ("c", other), ("d", other)):
            nodes.append(BenchNode(home, name, "--join", token, "--model", str(held), *common))
        ids = [model.name.removesuffix(".gguf"), other.name.removesuffix(".gguf")]

        def both_ready() -> bool:
            if not all(node.healthy() for node in nodes):
                return False
            models = nodes[0].status()["models"]
            return all(models.get(i, {}).get("state") == "ready" for i in ids)

        wait_until(both_ready, 300, "both models to serve")
        for model_id in ids:
            _measure(nodes[0], model_id, 1)
        halves: list[dict[str, Any]] = []
        threads = [
            threading.Thread(target=lambda i=i: halves.append(_measure(nodes[0], i, 8)))
            for i in ids
        ]
        wall = _run_together(threads)
        tokens = sum(half["tokens"] for half in halves)
        return {
            "clients": 16,
            "per_model": halves,
            "tokens_per_s": round(tokens / wall, 2),
            "ttft_p95_s": max(half["ttft_p95_s"] for half in halves),  # the worse model's
        }
    finally:
        for node in nodes:
            node.stop()


def _print_table(title: str, results: dict[str, list[dict[str, Any]]]) -> None:
    print(f"  {title}")
    print(f"  {'clients':>7} " + " ".join(f"{f'{k}: tok/s, p95 ttft':>26}" for k in results))
    for index, clients in enumerate(CLIENTS):
        cells = [runs[index] for runs in results.values()]
        line = " ".join(f"{c['tokens_per_s']:>15.1f} {c['ttft_p95_s']:>8.2f} s" for c in cells)
        print(f"  {clients:>7} {line}")


def _ratios(one: dict[str, Any], other: dict[str, Any]) -> tuple[float, float]:
    return (
        round(other["tokens_per_s"] / one["tokens_per_s"], 2),
        round(other["ttft_p95_s"] / max(one["ttft_p95_s"], 1e-6), 2),
    )


def run() -> dict[str, Any]:
    model = default_model_path(default_cache_dir())
    work = Path(tempfile.mkdtemp(prefix="sharedllm-scale-"))
    by_slots: dict[str, list[dict[str, Any]]] = {}
    by_replicas: dict[str, list[dict[str, Any]]] = {}
    try:
        for slots in SLOTS:
            by_slots[f"{slots} slots"] = _slots_run(work, model, slots)
        for replicas in (1, 2):
            by_replicas[f"{replicas} replicas"] = _replicas_run(work, model, replicas)
        two_models = _two_models_run(work, model)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"scale: Gemma 270M, {REQUESTS} x {TOKENS} tokens per client, loopback")
    _print_table("one node (all cores), parallel slots", by_slots)
    _print_table("four nodes, one thread per engine, 4 slots each", by_replicas)
    slots_ratio, slots_ttft = _ratios(by_slots["1 slots"][-1], by_slots[f"{SLOTS[-1]} slots"][-1])
    replicas_ratio, replicas_ttft = _ratios(
        by_replicas["1 replicas"][-1], by_replicas["2 replicas"][-1]
    )
    print(
        f"  16 clients, {SLOTS[-1]} slots vs 1: {slots_ratio:.2f}x tokens/s (target >= 2), "
        f"p95 ttft {slots_ttft:.2f}x"
    )
    print(
        f"  16 clients, 2 replicas vs 1: {replicas_ratio:.2f}x tokens/s (target >= 1.6), "
        f"p95 ttft {replicas_ttft:.2f}x (target <= 1)"
    )
    models_ratio, models_ttft = _ratios(by_replicas["1 replicas"][-1], two_models)
    print(
        f"  16 clients, 2 models at once (8 each, one placement each) vs 1 model: "
        f"{models_ratio:.2f}x tokens/s ({two_models['tokens_per_s']:.1f}), "
        f"p95 ttft {models_ttft:.2f}x"
    )
    return {
        "runs_by_slots": by_slots,
        "two_models_run": two_models,
        "two_models_tokens_ratio": models_ratio,
        "runs_by_replicas": by_replicas,
        "parallel_slots_tokens_ratio": slots_ratio,
        "parallel_slots_ttft_p95_ratio": slots_ttft,
        "two_replicas_tokens_ratio": replicas_ratio,
        "two_replicas_ttft_p95_ratio": replicas_ttft,
    }
