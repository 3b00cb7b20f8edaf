"""Chaos benchmark: streaming clients while a worker, then the primary, are killed (-9) and
restarted at once, with real engines on loopback.

Three `sharedllm-node` processes split Gemma 270M 6/6/6 (memory caps leave the planner that
one choice); the founder is the primary and the only holder of the file. Eight clients stream
completions through the third node for the whole run. Every request's outcome is counted, and
for each kill the time to the first good answer of a request sent after it. Targets (issue
21): no hang, no 404, recovery under 15 s for a worker and under 20 s for the primary.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sharedllm.node.config import default_cache_dir
from sharedllm.node.models.default_model import default_model_path

from .bench_nodes import BenchNode, invite, wait_until

CLIENTS = 8
MIN_LOAD_S = 60.0
HANG_S = 60.0
RECOVERY_LIMIT_S = 90.0
FOUNDER_CAP, WORKER_CAP = "500MiB", "320MiB"


@dataclass
class _Ledger:
    """Every request's outcome, and when good answers came (thread-safe)."""

    outcomes: Counter[str] = field(default_factory=Counter)
    good: list[tuple[float, float]] = field(default_factory=list)  # (sent, answered)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, outcome: str, sent: float, done: float) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if outcome == "ok":
                self.good.append((sent, done))

    def recovered_after(self, moment: float) -> float | None:
        with self.lock:
            answers = [done for sent, done in self.good if sent >= moment]
        return min(answers) - moment if answers else None


def _one_request(client: httpx.Client, url: str, model_id: str) -> str:
    body = {"model": model_id, "prompt": "Count: one, two,", "max_tokens": 16, "stream": True}
    try:
        with client.stream("POST", url + "/v1/completions", json=body) as answer:
            if answer.status_code != 200:
                answer.read()
                if answer.status_code == 503 and answer.headers.get("retry-after"):
                    return "503_with_retry_after"
                return f"http_{answer.status_code}"
            text = "".join(answer.iter_text())
    except httpx.TimeoutException:
        return "hang"
    except httpx.HTTPError:
        return "connection_error"
    if '"error"' in text:
        return "cut_with_error_event"
    return "ok" if "data: [DONE]" in text else "cut_silently"


def _client_loop(url: str, model_id: str, ledger: _Ledger, stop: threading.Event) -> None:
    with httpx.Client(timeout=httpx.Timeout(HANG_S, connect=10.0)) as client:
        while not stop.is_set():
            sent = time.monotonic()
            outcome = _one_request(client, url, model_id)
            ledger.note(outcome, sent, time.monotonic())
            if outcome != "ok":
                stop.wait(1.0)  # as a client that honours Retry-After roughly would


def _recovery(ledger: _Ledger, killed_at: float) -> float | None:
    deadline = killed_at + RECOVERY_LIMIT_S
    while time.monotonic() < deadline:
        found = ledger.recovered_after(killed_at)
        if found is not None:
            return found
        time.sleep(0.25)
    return None


def _start_mesh(work: Path, model: Path) -> dict[str, BenchNode]:
    nodes = {"a": BenchNode(work, "a", "--model", str(model), "--max-memory", FOUNDER_CAP)}
    token = invite(nodes["a"], uses=2)
    for name in ("b", "c"):
        nodes[name] = BenchNode(
            work, name, "--join", token, "--no-model", "--max-memory", WORKER_CAP
        )
    wait_until(lambda: all(n.healthy() for n in nodes.values()), 300, "the mesh to serve")
    return nodes


def _kill_and_restart(node: BenchNode, ledger: _Ledger) -> float | None:
    killed_at = time.monotonic()
    node.kill()
    node.start()  # at once, on the same ports
    seconds = _recovery(ledger, killed_at)
    shown = "none" if seconds is None else f"{seconds:.1f} s"
    print(f"  kill -9 of {node.name}, restarted at once: first good answer after {shown}")
    return seconds


def run() -> dict[str, Any]:
    model = default_model_path(default_cache_dir())
    model_id = model.name.removesuffix(".gguf")
    work = Path(tempfile.mkdtemp(prefix="sharedllm-chaos-"))
    nodes: dict[str, BenchNode] = {}
    ledger, stop = _Ledger(), threading.Event()
    threads: list[threading.Thread] = []
    try:
        nodes = _start_mesh(work, model)
        print(f"chaos: {CLIENTS} streaming clients through c; kill -9 b (worker), then a (primary)")
        began = time.monotonic()
        for _ in range(CLIENTS):
            thread = threading.Thread(
                target=_client_loop, args=(nodes["c"].url, model_id, ledger, stop), daemon=True
            )
            thread.start()
            threads.append(thread)
        time.sleep(10.0)
        worker_s = _kill_and_restart(nodes["b"], ledger)
        wait_until(lambda: all(n.healthy() for n in nodes.values()), 120, "the mesh to heal")
        time.sleep(5.0)
        primary_s = _kill_and_restart(nodes["a"], ledger)
        time.sleep(max(10.0, MIN_LOAD_S - (time.monotonic() - began)))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=HANG_S + 15)
        for node in nodes.values():
            if node.process.poll() is None:
                node.kill()
        shutil.rmtree(work, ignore_errors=True)
    outcomes = dict(sorted(ledger.outcomes.items()))
    print(f"  outcomes: {outcomes}")
    print("  targets: 0 hangs, 0 404s, worker < 15 s, primary < 20 s")
    return {
        "chaos_outcomes": outcomes,
        "chaos_hangs": outcomes.get("hang", 0),
        "chaos_404s": outcomes.get("http_404", 0),
        "chaos_worker_recovery_s": worker_s,
        "chaos_primary_recovery_s": primary_s,
        "load_s": time.monotonic() - began,
    }
