"""Reading a described cluster (CLUSTER.json) for the `plan` preview.

Schema: {"nodes": [{"id", "memory_gib", "vram_gib"?, "gflops", "rpc_proto"?, "has_model"?}],
"links": [{"from", "to", "rtt_ms", "bandwidth_mbps"}], "context"?}. A link given in one
direction holds both ways; a pair with no link cannot reach each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .cluster import GIB, ClusterView, Link, NodeCapacity

DEFAULT_RPC_PROTOCOL = "7.0.0"


class ClusterFileError(Exception):
    """The cluster description is malformed; the message names the offending entry."""


@dataclass(frozen=True)
class ClusterSpec:
    view: ClusterView
    context: int | None


def parse_cluster(data: Any, model_id: str) -> ClusterSpec:
    if not isinstance(data, dict):
        raise ClusterFileError("the cluster must be a JSON object with 'nodes' and 'links'")
    _only_keys(data, {"nodes", "links", "context"}, "cluster")
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise ClusterFileError("'nodes' must be a non-empty list")
    nodes = [_node(entry, i, model_id) for i, entry in enumerate(raw_nodes)]
    ids = [n.peer_id for n in nodes]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ClusterFileError(f"duplicate node id {duplicates[0]!r}")
    raw_links = data.get("links", [])
    if not isinstance(raw_links, list):
        raise ClusterFileError("'links' must be a list")
    links = [_link(entry, i, set(ids)) for i, entry in enumerate(raw_links)]
    context = data.get("context")
    if context is not None:
        context = int(_number(context, "context", minimum=1, integral=True))
    return ClusterSpec(ClusterView.build(nodes, links), context)


def _node(entry: Any, index: int, model_id: str) -> NodeCapacity:
    where = f"nodes[{index}]"
    if not isinstance(entry, dict):
        raise ClusterFileError(f"{where} must be an object")
    _only_keys(entry, {"id", "memory_gib", "vram_gib", "gflops", "rpc_proto", "has_model"}, where)
    peer_id = entry.get("id")
    if not isinstance(peer_id, str) or not peer_id:
        raise ClusterFileError(f"{where}.id must be a non-empty string")
    where = f"node {peer_id!r}"
    memory = _number(_required(entry, "memory_gib", where), f"{where} memory_gib")
    vram = _number(entry.get("vram_gib", 0.0), f"{where} vram_gib")
    gflops = _number(_required(entry, "gflops", where), f"{where} gflops", minimum=1e-9)
    proto = entry.get("rpc_proto", DEFAULT_RPC_PROTOCOL)
    if not isinstance(proto, str) or not proto:
        raise ClusterFileError(f"{where} rpc_proto must be a version string like '7.0.0'")
    has_model = entry.get("has_model", False)
    if not isinstance(has_model, bool):
        raise ClusterFileError(f"{where} has_model must be true or false")
    return NodeCapacity(
        peer_id=peer_id,
        ram_bytes=int(memory * GIB),
        vram_bytes=int(vram * GIB),
        gflops=gflops,
        rpc_protocol=proto,
        models=frozenset({model_id}) if has_model else frozenset(),
    )


def _link(entry: Any, index: int, ids: set[str]) -> Link:
    where = f"links[{index}]"
    if not isinstance(entry, dict):
        raise ClusterFileError(f"{where} must be an object")
    _only_keys(entry, {"from", "to", "rtt_ms", "bandwidth_mbps"}, where)
    ends = [_required(entry, key, where) for key in ("from", "to")]
    for end in ends:
        if end not in ids:
            raise ClusterFileError(f"{where} names unknown node {end!r}")
    if ends[0] == ends[1]:
        raise ClusterFileError(f"{where} links node {ends[0]!r} to itself")
    rtt = _number(_required(entry, "rtt_ms", where), f"{where} rtt_ms")
    bandwidth = _number(_required(entry, "bandwidth_mbps", where), f"{where} bandwidth_mbps", 1e-9)
    return Link(ends[0], ends[1], rtt, bandwidth)


def _required(entry: dict[str, Any], key: str, where: str) -> Any:
    if key not in entry:
        raise ClusterFileError(f"{where} lacks {key!r}")
    return entry[key]


def _only_keys(entry: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ClusterFileError(f"{where} has unknown key {unknown[0]!r}")


def _number(value: Any, what: str, minimum: float = 0.0, integral: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ClusterFileError(f"{what} must be a number, not {value!r}")
    if not math.isfinite(value) or value < minimum:
        bound = "positive" if minimum > 0 else "zero or more"
        raise ClusterFileError(f"{what} must be {bound}, not {value!r}")
    if integral and int(value) != value:
        raise ClusterFileError(f"{what} must be a whole number, not {value!r}")
    return float(value)
