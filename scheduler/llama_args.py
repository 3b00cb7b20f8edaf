"""Turning a placement into llama-server arguments that reproduce its layer counts exactly.

llama.cpp (src/llama-model.cpp, `load_tensors`) assigns layers like this: with `-ngl N` over a
model of `n` repeating layers, index `n` stands for the output layer and the first
`i_gpu_start = max(n + 1 - N, 0)` layers stay on the local CPU; each later layer `il` goes to the
device `upper_bound(splits, float(il - i_gpu_start) / N)`, where `splits` are the cumulative,
normalised `--tensor-split` values in float32. RPC servers are devices in `--rpc` order.

Devices are ordered RPC servers first (in `--rpc` order, each server's devices in turn), then
the primary's own GPUs. So a primary without a GPU keeps its layers first, on its CPU, the
workers following; the output head is pinned to its CPU with `--override-tensor`, so the logits
(vocabulary x 4 bytes per token) never cross a link. A primary with GPUs holds the last layers on
them, and the output head lands on its last GPU by the same rule. We set each split point half a
layer before its boundary, which keeps float rounding from ever moving a layer across it.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .placement import Placement

# Tensors of the output head (and of tied embeddings, which double as the head).
HEAD_ON_PRIMARY = r"^(output|token_embd)\.weight$=CPU"


@dataclass(frozen=True)
class LlamaSplitArgs:
    """`rpc_workers` are peer ids in `--rpc` order; the caller maps each to its endpoint."""

    rpc_workers: tuple[str, ...]
    n_gpu_layers: int
    tensor_split: tuple[float, ...]
    head_on_cpu: bool = True

    def argv(self, endpoints: Sequence[str]) -> list[str]:
        if len(endpoints) != len(self.rpc_workers):
            raise ValueError("one endpoint per worker is needed, in placement order")
        argv = ["--n-gpu-layers", str(self.n_gpu_layers)]
        if self.rpc_workers:
            argv = ["--rpc", ",".join(endpoints), *argv]
        if self.tensor_split:
            argv += ["--tensor-split", ",".join(_number(v) for v in self.tensor_split)]
        if self.rpc_workers and self.head_on_cpu:
            argv += ["--override-tensor", HEAD_ON_PRIMARY]
        return argv


def split_args(
    placement: Placement, layer_count: int, devices: Mapping[str, int] | None = None
) -> LlamaSplitArgs:
    """llama-server arguments for `placement`. `devices` counts each node's engine devices:
    the primary's GPUs, and what each worker's rpc-server offers (its GPUs, else its CPU)."""
    devices = devices or {}
    primary, workers = placement.primary, placement.workers
    gpus = devices.get(primary, 0)
    order = [a.node for a in placement.assignments]
    primary_last = not order or order[-1] == primary or primary not in order
    if gpus > 0 and primary_last:
        per_device = _layers_per_device(placement, devices, gpus)
        tensor_split = _proportions(per_device) if len(per_device) > 1 else ()
        return LlamaSplitArgs(workers, layer_count + 1, tensor_split, head_on_cpu=False)
    if order and order[0] != primary and primary in order:
        raise ValueError("the primary's layers must come first (CPU) or last (GPU)")
    if not workers:
        return LlamaSplitArgs((), 0, ())
    per_device = _layers_per_device(placement, devices, 0)
    return LlamaSplitArgs(workers, sum(per_device) + 1, _proportions(per_device))


def _layers_per_device(placement: Placement, devices: Mapping[str, int], gpus: int) -> list[int]:
    """Layers of each engine device in llama.cpp's order: the workers' devices, then the
    primary's GPUs (none when its layers stay on its CPU)."""
    counts = placement.layer_counts()
    per_device: list[int] = []
    for worker in placement.workers:
        per_device += _spread(counts[worker], max(1, devices.get(worker, 1)))
    return per_device + _spread(counts.get(placement.primary, 0), gpus)


def _spread(layers: int, devices: int) -> list[int]:
    """`layers` over `devices` as evenly as possible, the first devices taking the extra ones."""
    share, extra = divmod(layers, devices) if devices else (0, 0)
    return [share + (1 if index < extra else 0) for index in range(devices)]


def _proportions(per_device: Sequence[int]) -> tuple[float, ...]:
    """`--tensor-split` values whose cumulative split points sit half a layer before each
    boundary; the last device also takes the output layer (llama.cpp's index n)."""
    boundaries: list[float] = []
    covered = 0
    for count in per_device[:-1]:
        covered += count
        boundaries.append(covered - 0.5)
    boundaries.append(float(sum(per_device) + 1))
    return (boundaries[0], *(b - a for a, b in itertools.pairwise(boundaries)))


def llama_layer_devices(
    layer_count: int, n_gpu_layers: int, tensor_split: Sequence[float], with_output: bool = False
) -> list[int]:
    """llama.cpp's rule, re-stated in float32: the device of each repeating layer (and, with
    `with_output`, of the output layer after them), -1 for the CPU.

    Used to prove the mapping (and to predict what llama.cpp does with a memory-proportional
    split, for the baseline).
    """
    devices = len(tensor_split)
    cumulative = np.cumsum(np.array(tensor_split, dtype=np.float32), dtype=np.float32)
    splits = [np.float32(v) / cumulative[-1] for v in cumulative] if devices else []
    start = max(layer_count + 1 - n_gpu_layers, 0)
    active = 0 if devices == 0 else min(n_gpu_layers, layer_count + 1)
    result: list[int] = []
    for il in range(layer_count + 1 if with_output else layer_count):
        if il < start or (il - start) >= active:
            result.append(-1)
            continue
        position = np.float32(il - start) / np.float32(active)
        result.append(bisect.bisect_right(splits, position))
    return result


def _number(value: float) -> str:
    return f"{value:g}"
