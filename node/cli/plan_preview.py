"""`sharedllm-node plan`: the planner's placement for a described cluster, beside the baselines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...scheduler.baselines import BASELINES
from ...scheduler.cluster_file import ClusterFileError, ClusterSpec, parse_cluster
from ...scheduler.cost_model import CostModel
from ...scheduler.llama_args import split_args
from ...scheduler.placement import ModelRequest, Placement
from ...scheduler.planner import plan_model
from ..models.model_file import ModelInfo

DEFAULT_CONTEXT = 4096


def load_cluster(path: Path, model_id: str) -> ClusterSpec:
    """Reads CLUSTER.json; JSON and schema errors become `ClusterFileError`."""
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise ClusterFileError(f"cannot read {path}: {err.strerror}") from None
    except (ValueError, RecursionError) as err:
        raise ClusterFileError(f"{path} is not valid JSON: {err}") from None
    return parse_cluster(data, model_id)


def preview(model: ModelInfo, spec: ClusterSpec, context: int | None) -> dict[str, Any]:
    """The plan and each baseline, all predicted by the same cost model."""
    cost = CostModel()
    model_id = model.path.name.removesuffix(".gguf")
    request = ModelRequest(model_id, model.profile, context or spec.context or DEFAULT_CONTEXT)
    placement = plan_model(spec.view, request, cost)
    result = placement.as_dict()
    result["context"] = request.context
    gpus = {node.peer_id: 1 for node in spec.view.nodes if node.vram_bytes > 0}
    result["llama_server_args"] = split_args(placement, model.profile.layer_count, gpus).argv(
        [f"<{worker}>" for worker in placement.workers]
    )
    result["baselines"] = {
        name: _baseline_entry(baseline(spec.view, request, cost), placement)
        for name, baseline in BASELINES.items()
    }
    return result


def _baseline_entry(theirs: Placement | None, ours: Placement) -> dict[str, Any]:
    if theirs is None:
        return {"predicted_tokens_per_s": None, "feasible": False}
    return {
        "predicted_tokens_per_s": theirs.tokens_per_s,
        "feasible": True,
        "primary": theirs.primary,
        "layers": theirs.layer_counts(),
        "ours_vs_this": ours.tokens_per_s / theirs.tokens_per_s,
    }


def render(result: dict[str, Any]) -> str:
    """A human table: nodes and layers, then the baselines side by side."""
    gib = 1024**3
    lines = [
        f"model {result['model']}  context {result['context']}  primary {result['primary']}",
        "",
        f"{'node':<20} {'layers':>9} {'count':>5} {'memory GiB':>11}",
    ]
    for a in result["assignments"]:
        span = f"{a['first_layer']}-{a['last_layer']}"
        count = a["last_layer"] - a["first_layer"] + 1
        lines.append(f"{a['node']:<20} {span:>9} {count:>5} {a['memory_bytes'] / gib:>11.2f}")
    if result["primary"] not in {a["node"] for a in result["assignments"]}:
        memory = result["primary_memory_bytes"] / gib
        lines.append(f"{result['primary']:<20} {'(head)':>9} {0:>5} {memory:>11.2f}")
    lines += [
        "",
        f"predicted: {result['predicted_tokens_per_s']:.1f} tokens/s generation, "
        f"{result['predicted_prompt_tokens_per_s']:.0f} tokens/s prompt",
        "",
        f"{'split':<22} {'tokens/s':>9} {'ours / theirs':>14}",
        f"{'sharedllm (this plan)':<22} {result['predicted_tokens_per_s']:>9.1f} {'1.00':>14}",
    ]
    for name, entry in result["baselines"].items():
        if entry["feasible"]:
            lines.append(
                f"{name:<22} {entry['predicted_tokens_per_s']:>9.1f} {entry['ours_vs_this']:>14.2f}"
            )
        else:
            lines.append(f"{name:<22} {'does not fit':>9}")
    lines += ["", "llama-server " + " ".join(result["llama_server_args"])]
    return "\n".join(lines)
