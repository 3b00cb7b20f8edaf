"""The placement -> llama-server mapping reproduces the planned layer counts exactly, by
llama.cpp's own rule (re-stated in float32) and by a real llama-server splitting over real
ggml-rpc-servers."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sharedllm.node.engine.locate import EngineInfo, free_loopback_port
from sharedllm.node.tools.synthetic_model import ModelShape, write_synthetic_model
from sharedllm.scheduler.llama_args import llama_layer_devices, split_args
from sharedllm.scheduler.placement import Assignment, Placement


def _placement(
    primary_layers: int, worker_layers: list[int], *, primary_last: bool = False
) -> Placement:
    """The primary's layers first (kept on its CPU), or last (on its GPUs)."""
    assignments = []
    first = 0
    own = [("p", primary_layers)]
    others = [(f"w{i}", n) for i, n in enumerate(worker_layers)]
    nodes = others + own if primary_last else own + others
    for node, count in nodes:
        if count:
            assignments.append(Assignment(node, first, first + count - 1, 0))
            first += count
    return Placement("m", "p", tuple(assignments), 0, 1.0, 1.0)


@settings(max_examples=500, deadline=None)
@given(
    st.integers(min_value=0, max_value=120),
    st.lists(st.integers(min_value=1, max_value=60), min_size=0, max_size=12),
)
def test_mapping_gives_exactly_the_planned_counts(
    primary_layers: int, worker_layers: list[int]
) -> None:
    layer_count = primary_layers + sum(worker_layers)
    if layer_count == 0:
        return
    args = split_args(_placement(primary_layers, worker_layers), layer_count)
    argv = args.argv([f"127.0.0.1:{5000 + i}" for i in range(len(worker_layers))])
    if not worker_layers:
        assert argv == ["--n-gpu-layers", "0"]
        return
    # llama.cpp parses the printed numbers, so check what it would read back.
    printed = [float(v) for v in argv[argv.index("--tensor-split") + 1].split(",")]
    ngl = int(argv[argv.index("--n-gpu-layers") + 1])
    devices = llama_layer_devices(layer_count, ngl, printed)
    expected = [-1] * primary_layers + [i for i, n in enumerate(worker_layers) for _ in range(n)]
    assert devices == expected


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 60), st.integers(1, 4)), min_size=0, max_size=8),
    st.integers(min_value=0, max_value=120),
    st.integers(min_value=0, max_value=4),
)
def test_devices_of_every_node_get_their_planned_layers(
    workers: list[tuple[int, int]], primary_layers: int, gpus: int
) -> None:
    """Workers may offer several devices each; a primary with GPUs holds the last layers on
    them and the output layer on its last GPU, one without keeps its first layers on its CPU."""
    layer_count = primary_layers + sum(layers for layers, _ in workers)
    if layer_count == 0 or (gpus == 0 and not workers):
        return
    devices = {f"w{i}": count for i, (_, count) in enumerate(workers)} | {"p": gpus}
    worker_layers = [layers for layers, _ in workers]
    if gpus:
        placement = _placement(primary_layers, worker_layers, primary_last=True)
    else:
        placement = _placement(primary_layers, worker_layers)
    args = split_args(placement, layer_count, devices)
    argv = args.argv([f"127.0.0.1:{5000 + i}" for i in range(len(workers))])
    ngl = int(argv[argv.index("--n-gpu-layers") + 1])
    split = argv[argv.index("--tensor-split") + 1] if "--tensor-split" in argv else "1"
    printed = [float(v) for v in split.split(",")]
    got = llama_layer_devices(layer_count, ngl, printed, with_output=True)
    # the engine's devices in order: each worker's, then the primary's GPUs
    owner = [f"w{i}" for i, (_, count) in enumerate(workers) for _ in range(count)]
    owner += ["p"] * gpus
    expected = ["w" + str(i) for i, n in enumerate(worker_layers) for _ in range(n)]
    if gpus:
        expected = expected + ["p"] * primary_layers + ["p"]  # the output layer too
    else:
        expected = ["p"] * primary_layers + expected + ["head"]
    named = ["p" if d == -1 else owner[d] for d in got]
    if not gpus:
        assert "--override-tensor" in argv  # the output head is pinned to the CPU
        named[-1] = "head"
    else:
        assert "--override-tensor" not in argv
        assert got[-1] == len(owner) - 1  # the output layer on the primary's last GPU
    assert named == expected


def test_a_primary_with_gpus_and_no_workers_offloads_everything() -> None:
    placement = _placement(24, [], primary_last=True)
    assert split_args(placement, 24, {"p": 1}).argv([]) == ["--n-gpu-layers", "25"]
    assert split_args(placement, 24).argv([]) == ["--n-gpu-layers", "0"]


def test_rule_matches_llama_cpp_default_behaviour() -> None:
    # With -ngl covering every layer and equal splits, the output layer counts as the ninth of
    # 9 items, so 8 repeating layers split 5/3, not 4/4.
    assert llama_layer_devices(8, 9, [1.0, 1.0]) == [0, 0, 0, 0, 0, 1, 1, 1]
    # -ngl 0 keeps every layer on the CPU.
    assert llama_layer_devices(4, 0, [1.0]) == [-1, -1, -1, -1]


_KV_LINE = re.compile(r"llama_kv_cache:\s+(\S+) KV buffer size =\s+([\d.]+) MiB")


@pytest.mark.integration
def test_real_llama_server_places_the_planned_layers(tmp_path: Path, engine: EngineInfo) -> None:
    blocks, context = 10, 1024
    model = write_synthetic_model(tmp_path / "m.gguf", ModelShape(blocks=blocks, context=context))
    planned = (3, [2, 5])  # primary, then two workers
    rpc_ports = [free_loopback_port(), free_loopback_port()]
    env = dict(os.environ, GGML_RPC_NO_RDMA="1")
    workers = [
        subprocess.Popen(
            [str(engine.rpc_server), "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        for port in rpc_ports
    ]
    server: subprocess.Popen[str] | None = None
    try:
        time.sleep(0.5)
        args = split_args(_placement(*planned), blocks)
        endpoints = [f"127.0.0.1:{p}" for p in rpc_ports]
        command = [
            str(engine.llama_server),
            "-m",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(free_loopback_port()),
            "-c",
            str(context),
            "--log-verbosity",
            "4",
            *args.argv(endpoints),
        ]
        server = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        assert server.stdout is not None
        sizes: dict[str, float] = {}
        deadline = time.monotonic() + 60
        for line in server.stdout:
            match = _KV_LINE.search(line)
            if match:
                sizes[match.group(1)] = float(match.group(2))
            if len(sizes) == 3 or "model loaded" in line or time.monotonic() > deadline:
                break
        # tokens x (K and V) x KV width (2 KV heads of 32) x 2 bytes (f16)
        kv_mib_per_layer = context * 2 * (2 * 32) * 2 / 2**20
        layers = {device: round(mib / kv_mib_per_layer) for device, mib in sizes.items()}
        assert layers == {"CPU": 3, f"RPC0[{endpoints[0]}]": 2, f"RPC0[{endpoints[1]}]": 5}
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
        if server is not None:
            server.kill()
            server.wait()
            if server.stdout is not None:
                server.stdout.close()
