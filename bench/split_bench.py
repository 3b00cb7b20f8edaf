"""Split benchmark: the planner's placement against llama.cpp's memory-proportional split,
measured on real nodes in network namespaces, side by side in one run.

Three hosts, network namespaces of ours on one bridge: `a` holds Gemma 270M, `b` is as fast,
and `c` runs under a CPU limit (a quarter of a core, by cgroup: its rpc-server too) behind a
link shaped to `RATE` both ways (`tc tbf`). Each node's memory cap fits half the model and its
share of the rest, so a split needs two nodes, while memory alone would use all three. `c`
announces its speed as timed under its limit. Two meshes run on these hosts at once, one whose
holder sets `split = "planner"` and one `split = "memory"` (speculation off in both); rounds
alternate between them, and generation speed is the engine's timing. Reported: each mesh's
placement, the planner's predicted tokens/s for both, what was measured, and both ratios
(`planner_vs_memory_proportional_measured`: target >= 1.2 where the prediction says so).
Needs root (namespaces, tc, cgroups); skipped and said so otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from sharedllm.node.config import default_cache_dir
from sharedllm.node.engine.locate import find_engine, free_loopback_port
from sharedllm.node.engine.speed import engine_gflops
from sharedllm.node.models.default_model import default_model_path
from sharedllm.node.models.model_file import inspect_model

from .cpu_limit import CpuLimit
from .node_cli import COMMAND, Place, node_status, stop_process
from .serving_bench import CONTEXT, PROMPT, cap_bytes

RATE = "4mbit"
CPU_SHARE = 0.25
ROUNDS = 3
TOKENS = 64
HALF = 9  # layers of Gemma 270M's 18 each node's cap allows
# Bandwidth probes repeat every 30 s: the ones made while a mesh loaded its weights over c's
# link measured a busy link; predictions are read after newer ones.
LINK_SETTLE_S = 35.0
_SUBNET = "10.197.10"  # addresses inside our own namespaces only
_ENV = {**os.environ, "GGML_RPC_NO_RDMA": "1", "SHAREDLLM_SPECULATION": "off"}
# Runs inside a namespace: one completion at a node's API, its timings printed.
_COMPLETE = (
    "import json, sys, urllib.request\n"
    "req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(),"
    " headers={'content-type': 'application/json'})\n"
    "print(json.dumps(json.load(urllib.request.urlopen(req, timeout=600))['timings']))"
)


@contextmanager
def _hosts(tag: str) -> Iterator[dict[str, Place]]:
    """Namespaces a, b, c on a bridge in a namespace of its own; c's link shaped."""
    switch = f"sllsw{tag}"
    hosts = {name: Place(f"{_SUBNET}.{i + 1}", f"sll{name}{tag}") for i, name in enumerate("abc")}
    hub, root = Place(namespace=switch), Place()
    try:
        root.run("ip", "netns", "add", switch)
        hub.run("ip", "link", "add", "br0", "type", "bridge")
        hub.run("ip", "link", "set", "br0", "up")
        for name, host in hosts.items():
            assert host.namespace is not None
            outer, inner = f"vsll{name}{tag}", f"esll{name}{tag}"
            root.run("ip", "netns", "add", host.namespace)
            host.run("ip", "link", "set", "lo", "up")
            root.run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            root.run("ip", "link", "set", outer, "netns", switch)
            root.run("ip", "link", "set", inner, "netns", host.namespace)
            hub.run("ip", "link", "set", outer, "master", "br0")
            hub.run("ip", "link", "set", outer, "up")
            host.run("ip", "addr", "add", f"{host.address}/24", "dev", inner)
            host.run("ip", "link", "set", inner, "up")
            if name == "c":
                # a burst of about one packet: each message takes its time on the wire, as on
                # a slow line (a big bucket would let a token's few KB through at veth speed)
                shape = ("root", "tbf", "rate", RATE, "burst", "2kb", "latency", "200ms")
                host.run("tc", "qdisc", "add", "dev", inner, *shape)
                hub.run("tc", "qdisc", "add", "dev", outer, *shape)
        yield hosts
    finally:
        for namespace in [switch, *(h.namespace for h in hosts.values())]:
            subprocess.run(["ip", "netns", "del", str(namespace)], capture_output=True, check=False)


class _Node:
    def __init__(
        self,
        work: Path,
        name: str,
        place: Place,
        args: list[str],
        slow: tuple[CpuLimit, float] | None = None,
    ) -> None:
        """`slow`: a CPU limit to run under, and the speed to announce (timed under it)."""
        self.place, self.port = place, free_loopback_port()
        self.data = work / name
        self.data.mkdir(parents=True)
        self.log = work / f"{name}.log"
        argv = [COMMAND, "up", "--data-dir", str(self.data), "--api-port", str(self.port)]
        argv += ["--listen", f"/ip4/{place.address}/tcp/0", "--name", name, "--threads", "1"]
        argv += ["--context-size", str(CONTEXT), "--no-upnp", "--no-mdns", *args]
        command, env = place.command(*argv), _ENV
        if slow is not None:
            command = slow[0].wrap(command)
            env = {**_ENV, "SHAREDLLM_COMPUTE_GFLOPS": f"{slow[1]:.3f}"}
        with self.log.open("ab") as handle:
            self.process = subprocess.Popen(command, stdout=handle, stderr=handle, env=env)

    def status(self) -> dict[str, Any]:
        return node_status(self.port, self.place.command())

    def timings(self, model_id: str) -> dict[str, Any]:
        body = {"model": model_id, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0}
        body["cache_prompt"] = False
        url = f"http://127.0.0.1:{self.port}/v1/completions"
        found: dict[str, Any] = json.loads(
            self.place.run(sys.executable, "-S", "-c", _COMPLETE, url, json.dumps(body))
        )
        return found

    def stop(self) -> None:
        stop_process(self.process)


def _mesh(
    stack: ExitStack, work: Path, split: str, hosts: dict[str, Place], slow: tuple[CpuLimit, float]
) -> _Node:
    """A mesh of three nodes, one per host, whose founder (the holder) is on `a`."""
    caps = _caps()
    args = ["--split", split, "--max-memory", str(caps[0])]
    founder = _Node(work, f"{split}-a", hosts["a"], args)
    stack.callback(founder.stop)
    deadline = time.monotonic() + 120
    while not (founder.data / "running.json").exists():
        if time.monotonic() > deadline or founder.process.poll() is not None:
            raise RuntimeError(f"the {split} mesh's founder did not start: see {founder.log}")
        time.sleep(0.25)
    invite = [COMMAND, "invite", "--data-dir", str(founder.data), "--uses", "2"]
    token = hosts["a"].run(*invite).strip()
    for name in "bc":
        args = ["--no-model", "--join", token, "--max-memory", str(caps[1])]
        node = _Node(work, f"{split}-{name}", hosts[name], args, slow if name == "c" else None)
        stack.callback(node.stop)
    return founder


def _caps() -> tuple[int, int]:
    """Memory caps (holder, others) that fit half the model each."""
    profile = inspect_model(default_model_path(default_cache_dir())).profile
    return cap_bytes(profile, HALF, True, CONTEXT), cap_bytes(profile, HALF, False, CONTEXT)


def _slow_speed(work: Path, limit: CpuLimit) -> float:
    """The engine's speed under the CPU limit, timed as a node times its own (fresh cache)."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from sharedllm.node.config import default_cache_dir\n"
        "from sharedllm.node.engine.locate import find_engine\n"
        "from sharedllm.node.engine.speed import engine_gflops\n"
        "from sharedllm.node.models.default_model import default_model_path\n"
        "from sharedllm.node.models.model_file import inspect_model\n"
        "model = default_model_path(default_cache_dir())\n"
        "engine = find_engine(default_cache_dir(), None)\n"
        "print(engine_gflops(engine, model, inspect_model(model).profile, threads=1,"
        " gpu_layers=False, cache_dir=Path(sys.argv[1])))\n"
    )
    cache = work / "slow-speed"
    cache.mkdir()
    done = subprocess.run(
        limit.wrap([sys.executable, "-c", script, str(cache)]),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        env=_ENV,
    )
    return float(done.stdout.strip().splitlines()[-1])


def _serving(node: _Node, model_id: str, timeout_s: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            entry: dict[str, Any] = node.status()["models"].get(model_id, {})
        except (subprocess.SubprocessError, ValueError):
            entry = {}
        planned = entry.get("planned") or {}
        layout = [
            (a["node"], a["last_layer"] - a["first_layer"] + 1)
            for a in planned.get("assignments", ())
        ]
        served = [
            (a["node"], a["last_layer"] - a["first_layer"] + 1)
            for a in entry.get("assignments", ())
        ]
        if entry.get("serving") and layout and layout == served:
            return entry
        time.sleep(1)
    raise RuntimeError(f"the mesh did not serve its planned split of {model_id}: see {node.log}")


def run() -> dict[str, Any]:
    tag = str(os.getpid())[-6:]
    work = Path(tempfile.mkdtemp(prefix="sharedllm-split-"))
    model = default_model_path(default_cache_dir())
    engine_gflops(  # the fast nodes' speed, timed once into the shared cache
        find_engine(default_cache_dir(), None),
        model,
        inspect_model(model).profile,
        threads=1,
        gpu_layers=False,
        cache_dir=default_cache_dir(),
    )
    model_id = model.name.removesuffix(".gguf")
    try:
        with ExitStack() as stack:
            limit = CpuLimit(f"sllsplit{tag}", CPU_SHARE)
            stack.callback(limit.remove)
            slow = (limit, _slow_speed(work, limit))
            hosts = stack.enter_context(_hosts(tag))
            founders = {split: _mesh(stack, work, split, hosts, slow) for split in SPLITS}
            for node in founders.values():
                _serving(node, model_id)
            return _measure(founders, model_id, slow[1])
    except (OSError, subprocess.CalledProcessError) as err:
        why = err.stderr.strip() if isinstance(err, subprocess.CalledProcessError) else str(err)
        print(f"split: skipped, no namespaces, tc or cgroups here ({why})")
        return {"skipped": why}
    finally:
        shutil.rmtree(work, ignore_errors=True)


SPLITS = ("planner", "memory")


def _measure(founders: dict[str, _Node], model_id: str, slow: float) -> dict[str, Any]:
    for node in founders.values():  # warm-up: the first request pays one-time costs
        node.timings(model_id)
    samples: dict[str, list[float]] = {split: [] for split in SPLITS}
    for _ in range(ROUNDS):
        for split, node in founders.items():
            samples[split].append(float(node.timings(model_id)["predicted_per_second"]))
    # what the planner predicts now, with the links measured while nothing else loads them
    time.sleep(LINK_SETTLE_S)
    entries = {split: node.status()["models"][model_id] for split, node in founders.items()}
    names = {peer["peer_id"]: peer.get("name", "?") for peer in _peers(founders)}
    report: dict[str, Any] = {"rate": RATE, "cpu_share": CPU_SHARE, "slow_gflops": slow}
    for split in SPLITS:
        planned = entries[split]["planned"]
        layout = [
            f"{names.get(a['node'], a['node'][-6:])} {a['last_layer'] - a['first_layer'] + 1}"
            for a in planned["assignments"]
        ]
        report[split] = {
            "layers": layout,
            "links_mbps": _links_seen(founders[split]),
            "predicted_tok_s": round(float(planned["predicted_tokens_per_s"]), 2),
            "measured_tok_s": round(statistics.median(samples[split]), 2),
            "samples": samples[split],
        }
        measured_here = report[split]["measured_tok_s"]
        report[split]["error"] = round(
            abs(report[split]["predicted_tok_s"] - measured_here) / measured_here, 3
        )
    predicted = report["planner"]["predicted_tok_s"] / report["memory"]["predicted_tok_s"]
    measured = report["planner"]["measured_tok_s"] / report["memory"]["measured_tok_s"]
    print(
        f"split: Gemma 270M on 3 nodes in namespaces, c at {CPU_SHARE:.0%} of a core behind "
        f"a {RATE} link; generation tokens/s (median of {ROUNDS}):"
    )
    for split in SPLITS:
        entry = report[split]
        print(
            f"  {split:<8} {', '.join(entry['layers'])}: predicted {entry['predicted_tok_s']:.1f},"
            f" measured {entry['measured_tok_s']:.1f}"
        )
    print(
        f"  planner vs memory-proportional: predicted {predicted:.2f}x, measured {measured:.2f}x "
        "(target >= 1.2)"
    )
    report["planner_vs_memory_proportional_predicted"] = round(predicted, 3)
    report["planner_vs_memory_proportional_measured"] = round(measured, 3)
    return report


def _peers(founders: dict[str, _Node]) -> list[dict[str, Any]]:
    peers: list[dict[str, Any]] = []
    for node in founders.values():
        found = node.status().get("peers", [])
        peers += [p for p in found if isinstance(p, dict) and "peer_id" in p]
    return peers


def _links_seen(founder: _Node) -> dict[str, dict[str, Any]]:
    """What the founder measured of its link to each member: Mbit/s and the data plane's
    round trip (ms)."""
    return {
        str(peer.get("name", "?")): {
            "mbps": peer.get("bandwidth_mbps"),
            "data_rtt_ms": peer.get("data_rtt_ms"),
        }
        for peer in founder.status().get("peers", [])
        if isinstance(peer, dict) and peer.get("state") != "self"
    }
