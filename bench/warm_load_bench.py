"""Warm loading benchmark: loading a split model with cold vs pre-filled worker weight caches.

Two `sharedllm-node` processes on loopback both hold a synthetic model of a realistic layer
shape (4096-wide Llama-2-7B-style blocks with random f16 weights, 4 of them: ~1.6 GB); memory
caps make the model need both, so one node's llama-server loads part of it into the other's
rpc-server through the mesh tunnel. Each run starts both nodes with fresh caches:

- cold: `prefill_weights = false`, so every weight byte crosses the tunnel;
- warm: the worker fills its rpc-server cache from its own copy of the file first, so the load
  sends tensor hashes for every tensor over 10 MiB;
- fetched: the worker holds no copy of the file; it fetches its layers' big tensors from the
  holder over the mesh (paced at the default `weight_share_mbps`) before the load.

Then cold and warm again with each node in a network namespace of its own, joined by a veth
pair shaped to 1 Gbit/s (`tc tbf`): a home LAN, where the cold load waits on the link (needs
root; skipped and said so otherwise). The headline figures are loopback's.

Measured per run: the engine's load time (llama-server start to ready, from the node's log),
bytes the primary sent through the worker's tunnel during the load, and the worker's fill (or
fetch) time.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sharedllm.node.config import default_cache_dir
from sharedllm.node.engine.locate import find_engine, free_loopback_port
from sharedllm.node.models.gguf_header import read_header
from sharedllm.node.tools.synthetic_model import ModelShape, write_synthetic_model

from .node_cli import COMMAND, Place, node_status, stop_process

RUNS = 3
PACE_MBPS = 800.0  # the default weight_share_mbps
LAN_RUNS = 2
LAN_RATE = "1gbit"
_SUBNET = "10.197.9"  # addresses inside our own namespaces only
SHAPE = ModelShape(blocks=4, embedding=4096, feed_forward=11008, heads=32, kv_heads=32)
CAP = "1400MiB"  # ~1.6 GB of weights: two nodes are needed
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def _log_time(line: str) -> float:
    found = _STAMP.match(line)
    assert found is not None, line
    stamp = datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def _engine_load_s(log: Path) -> float | None:
    """llama-server's last start to ready, from a node's log."""
    started = ready = None
    for line in log.read_text(errors="replace").splitlines():
        if "llama-server started (pid" in line:
            started, ready = _log_time(line), None
        elif "llama-server ready at" in line and started is not None:
            ready = _log_time(line)
    return None if started is None or ready is None else ready - started


def _fetched_mb(log: Path) -> float:
    """The weight bytes (MB) the worker fetched from peers, from its log."""
    found = re.findall(r"weights for layers .* fetched \(([\d.]+) MB", log.read_text())
    return float(found[-1]) if found else 0.0


def _fill_s(log: Path) -> float | None:
    """How long the worker took to fill its cache from its file, or to fetch from peers."""
    pattern = r"(?:weight cache for|weights for) layers .* in ([\d.]+) s"
    found = re.findall(pattern, log.read_text())
    return float(found[-1]) if found else None


LOOPBACK = (Place(), Place())


class _Node:
    def __init__(
        self, work: Path, name: str, model: Path | None, prefill: bool, place: Place, *args: str
    ) -> None:
        self.place = place
        self.data = work / name / "data"
        self.data.mkdir(parents=True)
        # a set speed: timing the engine at start (fresh caches each run) would overlap loads
        self.data.joinpath("config.toml").write_text(
            f"prefill_weights = {'true' if prefill else 'false'}\ncompute_gflops = 50.0\n"
        )
        self.port = free_loopback_port()
        self.log = work / f"{name}.log"
        engine = find_engine(default_cache_dir(), None)
        env = {
            **os.environ,
            "SHAREDLLM_CACHE_DIR": str(work / name / "cache"),  # cold: nothing from earlier runs
            "SHAREDLLM_ENGINE_DIR": str(engine.llama_server.parent),
        }
        argv = [COMMAND, "up", "--data-dir", str(self.data), "--api-port", str(self.port)]
        argv += ["--listen", f"/ip4/{place.address}/tcp/0", "--name", name, "--max-memory", CAP]
        offer = ["--no-model"] if model is None else ["--model", str(model)]
        argv += [*offer, "--context-size", "512", *args]
        with self.log.open("ab") as handle:
            self.process = subprocess.Popen(
                place.command(*argv), stdout=handle, stderr=handle, env=env
            )

    def status(self) -> dict[str, Any]:
        return node_status(self.port, self.place.command())

    def complete(self, model_id: str) -> None:
        """One short completion asked at this node's API (from inside its namespace)."""
        body = json.dumps({"model": model_id, "prompt": "Hello", "max_tokens": 2})
        script = (
            "import httpx, sys\n"
            f"httpx.post('http://127.0.0.1:{self.port}/v1/completions', content=sys.argv[1],"
            " headers={'content-type': 'application/json'}, timeout=120).raise_for_status()"
        )
        self.place.run(sys.executable, "-c", script, body)

    def stop(self) -> None:
        stop_process(self.process)


def _layer_weight_bytes(model: Path) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for tensor in read_header(model).tensors:
        found = _BLOCK.match(tensor.name)
        if found is not None:
            layer = int(found.group(1))
            sizes[layer] = sizes.get(layer, 0) + tensor.n_bytes
    return sizes


def _one_run(
    work: Path, model: Path, kind: str, places: tuple[Place, Place] = LOOPBACK
) -> dict[str, float]:
    prefill = kind != "cold"
    model_id = model.name.removesuffix(".gguf")
    nodes: list[_Node] = []
    try:
        nodes.append(_Node(work, "a", model, prefill, places[0]))
        deadline = time.monotonic() + 120
        while not nodes[0].data.joinpath("running.json").exists():
            assert time.monotonic() < deadline, "node a did not start"
            time.sleep(0.25)
        invite = places[0].run(COMMAND, "invite", "--data-dir", str(nodes[0].data)).strip()
        worker_file = None if kind == "fetched" else model
        nodes.append(_Node(work, "b", worker_file, prefill, places[1], "--join", invite))
        placement = _serving(nodes[0], model_id)
        primary = next(n for n in nodes if n.status()["peer_id"] == placement["primary"])
        worker = next(n for n in nodes if n is not primary)
        placement = primary.status()["models"][model_id]  # its tunnels, after the load
        (tunnel,) = placement["tunnels"].values()
        layers = _layer_weight_bytes(model)
        assigned = sum(
            layers[layer]
            for entry in placement["assignments"]
            if entry["node"] != placement["primary"]
            for layer in range(entry["first_layer"], entry["last_layer"] + 1)
        )
        load_s = _engine_load_s(primary.log)
        assert load_s is not None
        return {
            "load_s": load_s,
            "tunnel_bytes": float(tunnel["bytes_out"]),
            "assigned_weight_bytes": float(assigned),
            "fill_s": _fill_s(worker.log) or 0.0,
            "fetched_mb": _fetched_mb(worker.log),
        }
    finally:
        for node in nodes:
            node.stop()


def _serving(node: _Node, model_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        placement: dict[str, Any] = node.status()["models"].get(model_id, {})
        if placement.get("serving") and len(placement.get("assignments", ())) == 2:
            node.complete(model_id)
            return placement
        time.sleep(0.5)
    raise RuntimeError("the model was not served in time")


@contextmanager
def _shaped_link(rate: str) -> Iterator[tuple[Place, Place]]:
    """Two network namespaces joined by a veth pair whose both ends send at most `rate`."""
    tag = str(os.getpid())[-6:]
    names, devices = (f"sllwa{tag}", f"sllwb{tag}"), (f"vsllwa{tag}", f"vsllwb{tag}")
    places = (Place(f"{_SUBNET}.1", names[0]), Place(f"{_SUBNET}.2", names[1]))
    root = Place()
    try:
        for name, place in zip(names, places, strict=True):
            root.run("ip", "netns", "add", name)
            place.run("ip", "link", "set", "lo", "up")
        root.run("ip", "link", "add", devices[0], "type", "veth", "peer", "name", devices[1])
        for name, place, device in zip(names, places, devices, strict=True):
            root.run("ip", "link", "set", device, "netns", name)
            place.run("ip", "addr", "add", f"{place.address}/24", "dev", device)
            place.run("ip", "link", "set", device, "up")
            shape = ("rate", rate, "burst", "256kb", "latency", "50ms")
            place.run("tc", "qdisc", "add", "dev", device, "root", "tbf", *shape)
        yield places
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def _lan_runs(work: Path, model: Path) -> dict[str, Any]:
    """Cold and warm loads over a shaped link between two namespaces."""
    try:
        with _shaped_link(LAN_RATE) as places:
            runs: dict[str, list[float]] = {"cold": [], "warm": []}
            for index in range(LAN_RUNS):
                for kind, times in runs.items():
                    run_dir = work / f"lan-{kind}-{index}"
                    times.append(_one_run(run_dir, model, kind, places)["load_s"])
                    print(f"  {LAN_RATE} link, {kind} run {index + 1}: load {times[-1]:.1f} s")
                    shutil.rmtree(run_dir, ignore_errors=True)
    except (OSError, subprocess.CalledProcessError) as err:
        why = err.stderr.strip() if isinstance(err, subprocess.CalledProcessError) else str(err)
        print(f"  {LAN_RATE} link: skipped, no network namespaces here ({why})")
        return {"skipped": why}
    speedup = statistics.median(runs["cold"]) / statistics.median(runs["warm"])
    print(f"  over the {LAN_RATE} link: warm/cold load speedup {speedup:.2f}x")
    return {"rate": LAN_RATE, "load_s": runs, "warm_vs_cold_load_speedup": speedup}


def _median(runs: list[dict[str, float]], key: str) -> dict[str, float]:
    values = [run[key] for run in runs]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run() -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="sharedllm-warm-"))
    try:
        model = write_synthetic_model(work / "llama2-shape-4-blocks.gguf", SHAPE)
        model_bytes = model.stat().st_size
        print(
            f"warm load: 2 nodes on loopback, synthetic {model_bytes / 1e9:.2f} GB model, "
            f"{RUNS} runs each"
        )
        results: dict[str, list[dict[str, float]]] = {"cold": [], "warm": [], "fetched": []}
        for index in range(RUNS):
            for kind, runs in results.items():
                run_dir = work / f"{kind}-{index}"
                outcome = _one_run(run_dir, model, kind)
                runs.append(outcome)
                print(
                    f"  {kind} run {index + 1}: load {outcome['load_s']:.1f} s, "
                    f"{outcome['tunnel_bytes'] / 1e6:.1f} MB through the tunnel for "
                    f"{outcome['assigned_weight_bytes'] / 1e6:.0f} MB of assigned weights"
                    + (f", {kind} in {outcome['fill_s']:.1f} s" if kind != "cold" else "")
                )
                shutil.rmtree(run_dir, ignore_errors=True)
        lan = _lan_runs(work, model)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {kind: {key: _median(runs, key) for key in runs[0]} for kind, runs in results.items()}
    ratios = [warm["tunnel_bytes"] / warm["assigned_weight_bytes"] for warm in results["warm"]]
    speedups = [
        cold["load_s"] / warm["load_s"]
        for cold, warm in zip(results["cold"], results["warm"], strict=True)
    ]
    bytes_ratio, speedup = statistics.median(ratios), statistics.median(speedups)
    fetched_ratio = statistics.median(
        run["tunnel_bytes"] / run["assigned_weight_bytes"] for run in results["fetched"]
    )
    fetch_rate = statistics.median(
        run["fetched_mb"] / run["fill_s"] for run in results["fetched"] if run["fill_s"] > 0
    )
    print(
        f"  the worker fetched its layers from the holder at {fetch_rate:.0f} MB/s "
        f"(paced at {PACE_MBPS / 8:.0f} MB/s, the default weight_share_mbps)"
    )
    print(
        f"  warm load sends {bytes_ratio:.2%} of the assigned weight bytes (target < 5%); "
        f"warm/cold load speedup {speedup:.2f}x (target >= 3x); after a fetch from the holder "
        f"the load sends {fetched_ratio:.2%}"
    )
    return {
        "model_bytes": model_bytes,
        "shape": dataclasses.asdict(SHAPE),
        "runs": results,
        "summary": summary,
        "warm_load_bytes_ratio": bytes_ratio,
        "warm_vs_cold_load_speedup": speedup,
        "fetched_load_bytes_ratio": fetched_ratio,
        "fetch_mb_per_s": fetch_rate,
        "speedup_range": [min(speedups), max(speedups)],
        "over_shaped_link": lan,
    }
