"""Turning a placement into llama-server arguments that reproduce its layer counts exactly.

llama.cpp (src/llama-model.cpp, `load_tensors`) assigns layers like this: with `-ngl N` over a
model of `n` repeating layers, index `n` stands for the output layer and the first
`i_gpu_start = max(n + 1 - N, 0)` layers stay on the local CPU; each later layer `il` goes to the
device `upper_bound(splits, float(il - i_gpu_start) / N)`, where `splits` are the cumulative,
normalised `--tensor-split` values in float32. RPC servers are devices in `--rpc` order.

So the primary's own layers are the first ones, and the workers follow in `--rpc` order. We set
each split point half a layer before its boundary, which keeps float rounding from ever moving a
layer across it. The output head is pinned to the primary's CPU with `--override-tensor`, so the
logits (vocabulary x 4 bytes per token) never cross a link.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
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

    def argv(self, endpoints: Sequence[str]) -> list[str]:
        if len(endpoints) != len(self.rpc_workers):
            raise ValueError("one endpoint per worker is needed, in placement order")
        if not self.rpc_workers:
            return ["--n-gpu-layers", "0"]
        return [
            "--rpc",
            ",".join(endpoints),
            "--n-gpu-layers",
            str(self.n_gpu_layers),
            "--tensor-split",
            ",".join(_number(v) for v in self.tensor_split),
            "--override-tensor",
            HEAD_ON_PRIMARY,
        ]


def split_args(placement: Placement, layer_count: int) -> LlamaSplitArgs:
    counts = placement.layer_counts()
    primary_layers = counts.get(placement.primary, 0)
    workers = placement.workers
    worker_layers = [counts[w] for w in workers]
    if not workers:
        return LlamaSplitArgs((), 0, ())
    n_gpu_layers = layer_count + 1 - primary_layers  # the +1 is the output layer
    boundaries: list[float] = []
    covered = 0
    for count in worker_layers[:-1]:
        covered += count
        boundaries.append(covered - 0.5)
    boundaries.append(float(n_gpu_layers))
    proportions = [boundaries[0]] + [b - a for a, b in itertools.pairwise(boundaries)]
    return LlamaSplitArgs(workers, n_gpu_layers, tuple(proportions))


def llama_layer_devices(
    layer_count: int, n_gpu_layers: int, tensor_split: Sequence[float]
) -> list[int]:
    """llama.cpp's rule, re-stated in float32: the device of each repeating layer, -1 for the CPU.

    Used to prove the mapping (and to predict what llama.cpp does with a memory-proportional
    split, for the baseline).
    """
    devices = len(tensor_split)
    cumulative = np.cumsum(np.array(tensor_split, dtype=np.float32), dtype=np.float32)
    splits = [np.float32(v) / cumulative[-1] for v in cumulative] if devices else []
    start = max(layer_count + 1 - n_gpu_layers, 0)
    active = 0 if devices == 0 else min(n_gpu_layers, layer_count + 1)
    result: list[int] = []
    for il in range(layer_count):
        if il < start or (il - start) >= active:
            result.append(-1)
            continue
        position = np.float32(il - start) / np.float32(active)
        result.append(bisect.bisect_right(splits, position))
    return result


def _number(value: float) -> str:
    return f"{value:g}"
