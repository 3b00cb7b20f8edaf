"""Speculation benchmark: n-gram speculative decoding on a split, side by side in one run.

Gemma 270M split 9/9 over two engines on loopback, three ways at once: plain llama.cpp RPC
(`direct`, no speculation), the mesh without speculation and the mesh with `speculation =
"ngram"` (the primary's llama-server drafts from n-grams already in the context and verifies
them in one pass, so each worker round trip can carry several tokens). Two workloads:
`repetitive` (an inventory copied: extraction, an answer that quotes its input) at temperature
0, and `free` (a story, sampled at temperature 1.0, top-p 0.95, with a fixed seed). Rounds are
interleaved so that a shared machine's drift hits every setup alike; generation speed is the
engine's timing.
Targets (issue 26): repetitive >= 1.5x direct RPC without speculation; free >= 0.97x.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from sharedllm.node.config import default_cache_dir
from sharedllm.node.engine.locate import find_engine, free_loopback_port
from sharedllm.node.engine.speed import engine_gflops
from sharedllm.node.models.default_model import default_model_path
from sharedllm.node.models.model_file import inspect_model

from .serving_bench import (
    _ENV,
    CONTEXT,
    THREADS,
    _node,
    _started,
    _wait_http,
    cap_bytes,
    invite_when_running,
    start_direct_split,
)

ROUNDS = 3
TOKENS = 128
COUNTS = (9, 9)
_COLOURS = ("red", "blue", "green", "yellow", "black", "white", "grey", "pink", "brown", "orange")
_INVENTORY = "\n".join(
    f"- item {i}: the {c} box holds {i * 7} marbles" for i, c in enumerate(_COLOURS)
)
WORKLOADS: dict[str, dict[str, Any]] = {
    # extraction / copying: the answer repeats its input (the embedded model is pretrained, not
    # instruction-tuned: a list it copies faithfully, where it paraphrases a quoted file)
    "repetitive": {
        "prompt": f"Inventory:\n{_INVENTORY}\n\nInventory (copy):\n",
        "temperature": 0,
    },
    "free": {
        "prompt": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "temperature": 1.0,
        "top_p": 0.95,
        "seed": 7,
    },
}


def _tokens_per_s(url: str, model: str, workload: dict[str, Any]) -> dict[str, float]:
    body = {"model": model, "max_tokens": TOKENS, "cache_prompt": False, **workload}
    timings = httpx.post(url + "/v1/completions", json=body, timeout=600).json()["timings"]
    return {
        "tok_s": float(timings["predicted_per_second"]),
        "drafted": float(timings.get("draft_n") or 0),
        "accepted": float(timings.get("draft_n_accepted") or 0),
    }


def _mesh(stack: ExitStack, work: Path, caps: list[int], speculation: str) -> str:
    """A two-node mesh whose primary (the founder) speculates as asked; its API's URL."""
    command = str(Path(sys.executable).parent / "sharedllm-node")
    env = {**_ENV, "SHAREDLLM_SPECULATION": speculation}
    ports = [free_loopback_port() for _ in caps]
    founder = work / f"{speculation}-a"
    argv = _node(command, founder, ports[0], "--max-memory", str(caps[0]), *THREADS)
    stack.enter_context(_started(argv, work / f"{speculation}-a.log", env))
    token = invite_when_running(command, founder, 1)
    argv = _node(command, work / f"{speculation}-b", ports[1], "--join", token)
    argv += ["--max-memory", str(caps[1]), *THREADS]
    stack.enter_context(_started(argv, work / f"{speculation}-b.log", env))
    return f"http://127.0.0.1:{ports[0]}"


def _wait_serving(url: str, model_id: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            entry = httpx.get(url + "/mesh/peers", timeout=5).json()["models"].get(model_id, {})
            if entry.get("serving") and len(entry.get("assignments", ())) == len(COUNTS):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    raise RuntimeError(f"the mesh at {url} did not serve a split of {model_id}")


def run() -> dict[str, Any]:
    engine = find_engine(default_cache_dir(), None)
    model = default_model_path(default_cache_dir())
    profile = inspect_model(model).profile
    engine_gflops(
        engine, model, profile, threads=1, gpu_layers=False, cache_dir=default_cache_dir()
    )
    model_id = model.name.removesuffix(".gguf")
    work = Path(tempfile.mkdtemp(prefix="sharedllm-spec-"))
    try:
        with ExitStack() as stack:
            direct = start_direct_split(stack, work, engine, model, COUNTS)
            urls = {"direct": (direct, "gemma")}
            caps = [cap_bytes(profile, n, i == 0, CONTEXT) for i, n in enumerate(COUNTS)]
            for speculation in ("off", "ngram"):
                url = _mesh(stack, work, caps, speculation)
                urls[f"mesh_{speculation}"] = (url, model_id)
            _wait_http(urls["direct"][0])
            for name in ("mesh_off", "mesh_ngram"):
                _wait_serving(urls[name][0], model_id)
            return _measure(urls)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(urls: dict[str, tuple[str, str]]) -> dict[str, Any]:
    samples: dict[str, dict[str, list[dict[str, float]]]] = {
        w: {name: [] for name in urls} for w in WORKLOADS
    }
    for url, model in urls.values():  # warm-up
        _tokens_per_s(url, model, WORKLOADS["free"])
    for _ in range(ROUNDS):
        for workload, body in WORKLOADS.items():
            for name, (url, model) in urls.items():
                samples[workload][name].append(_tokens_per_s(url, model, body))
    medians = {
        workload: {
            name: {
                key: round(statistics.median(s[key] for s in runs), 2)
                for key in ("tok_s", "drafted", "accepted")
            }
            for name, runs in by_setup.items()
        }
        for workload, by_setup in samples.items()
    }
    repetitive, free = medians["repetitive"], medians["free"]
    ratio = repetitive["mesh_ngram"]["tok_s"] / repetitive["direct"]["tok_s"]
    free_ratio = free["mesh_ngram"]["tok_s"] / free["mesh_off"]["tok_s"]
    print("speculation: Gemma 270M split 9/9 on loopback, generation tokens/s (median):")
    for workload, by_setup in medians.items():
        cells = ", ".join(f"{name} {v['tok_s']:.1f}" for name, v in by_setup.items())
        accepted = by_setup["mesh_ngram"]
        print(
            f"  {workload:<10} {cells} (drafted {accepted['drafted']:.0f}, "
            f"accepted {accepted['accepted']:.0f})"
        )
    print(
        f"  repetitive: mesh with ngram speculation vs direct RPC without: {ratio:.2f}x "
        f"(target >= 1.5); free chat with vs without: {free_ratio:.2f}x (target >= 0.97)"
    )
    return {
        "tokens": TOKENS,
        "rounds": ROUNDS,
        "split": list(COUNTS),
        "cpu_count": os.cpu_count(),
        "medians": medians,
        "speculative_vs_direct_tokens_ratio": round(ratio, 3),
        "speculative_free_chat_ratio": round(free_ratio, 3),
    }
