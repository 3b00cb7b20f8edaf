"""Reading the engine's device list (CUDA/Metal builds list GPUs; CPU builds list none)."""

from __future__ import annotations

from sharedllm.node.capacity import describe
from sharedllm.node.engine.devices import gossiped_device_names, list_devices, parse_device_list
from sharedllm.node.engine.locate import EngineInfo

CUDA_OUTPUT = """\
ggml_cuda_init: found 2 CUDA devices:
Available devices:
  CUDA0: NVIDIA H100 80GB HBM3 (81079 MiB, 80565 MiB free)
  CUDA1: NVIDIA GeForce RTX 4090 (24564 MiB, 23000 MiB free)
"""
MIB = 1024**2


def test_parses_gpus_with_their_memory() -> None:
    devices = parse_device_list(CUDA_OUTPUT)
    assert [d.name for d in devices] == ["CUDA0", "CUDA1"]
    assert devices[0].description == "NVIDIA H100 80GB HBM3"
    assert devices[0].total_bytes == 81079 * MIB and devices[1].free_bytes == 23000 * MIB


def test_cpu_build_lists_none_and_gossips_no_vram(engine: EngineInfo) -> None:
    assert parse_device_list("Available devices:\n  (none)\n") == []
    devices = list_devices(engine.llama_server)
    assert devices == []  # this machine's build is CPU-only
    described = describe(engine, 10.0, 9337, None, parse_device_list(CUDA_OUTPUT))
    assert described["vram_total"] == (81079 + 24564) * MIB
    assert [d["name"] for d in described["devices"]] == ["CUDA0", "CUDA1"]


def test_a_node_s_gossiped_device_names_are_read_and_junk_is_skipped() -> None:
    state = {"devices": [{"name": "CUDA0"}, {"name": 7}, "CUDA1", {"name": "CUDA2"}]}
    assert gossiped_device_names(state) == ["CUDA0", "CUDA2"]
    assert gossiped_device_names({"devices": "CUDA0"}) == gossiped_device_names({}) == []
