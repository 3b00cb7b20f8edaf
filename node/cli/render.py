"""Turning models, peers and placements into the lines and tables commands print."""

from __future__ import annotations

from typing import Any

from ..models.model_file import ModelInfo


def print_model(info: ModelInfo, digest: str | None) -> None:
    p = info.profile
    sizes = sorted(set(p.layer_weight_bytes))
    per_layer = mib(sizes[0]) if len(sizes) == 1 else f"{mib(sizes[0])} to {mib(sizes[-1])}"
    rows: list[tuple[str, Any]] = [
        ("file", info.path),
        ("name", p.name),
        ("architecture", p.architecture),
        ("layers", p.layer_count),
        ("bytes per layer", per_layer),
        ("embedding bytes", mib(p.embedding_bytes)),
        (
            "output head bytes",
            mib(p.output_bytes) if p.output_bytes else "0 (tied to the embedding)",
        ),
        ("total weight bytes", mib(p.total_weight_bytes)),
        ("KV cache per token per layer", f"{p.kv_bytes_per_token_per_layer} bytes (f16)"),
        ("context length", p.context_length),
        ("embedding length", p.embedding_length),
        ("vocabulary", p.vocab_size),
        ("quantisation", info.file_type),
        ("tensor types", ", ".join(f"{k}: {v}" for k, v in info.tensor_types.items())),
        ("file size", mib(info.size_bytes)),
        ("sha256", digest or "(skipped)"),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def mib(n: int) -> str:
    return f"{n / (1024 * 1024):.2f} MiB ({n} bytes)"


def number(value: Any, digits: int, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def peer_columns(peer: dict[str, Any]) -> tuple[str, ...]:
    engine = f"{peer.get('engine_version', '-')} rpc {peer.get('rpc_protocol', '-')}"
    return (
        peer["peer_id"][-12:],
        str(peer.get("name", "-"))[:16],
        peer["state"],
        number(peer.get("data_rtt_ms") or peer.get("rtt_ms"), 2),
        number(peer.get("bandwidth_mbps"), 0),
        number(peer.get("ram_total"), 1, 1024**3),
        number(peer.get("vram_total"), 1, 1024**3),
        str(peer.get("gflops", "-")),
        engine,
        ",".join(m.get("id", "?") for m in peer.get("models", [])),
        str(peer.get("path") or "-"),
        _address_in_use(peer),
    )


def _address_in_use(peer: dict[str, Any]) -> str:
    """The control plane's address in use and the data plane's, or the advertised ones."""
    used = peer.get("path_address")
    if not used:
        return " ".join(peer.get("addrs", []))[:120]
    data = peer.get("data_path")
    return f"{used}" + (f", data {data}" if data else "")


def print_speed(entry: dict[str, Any], traffic: dict[str, Any] | None) -> None:
    """The planner's prediction beside what answers through this node measured."""
    planned = entry.get("planned") or {}
    parts = []
    if isinstance(planned.get("predicted_tokens_per_s"), int | float):
        parts.append(f"predicted {planned['predicted_tokens_per_s']:.1f} tokens/s")
    if traffic:
        measured = traffic.get("last_tokens_per_s")
        if measured is not None:
            parts.append(f"measured {measured:.1f} tokens/s (last answer)")
        parts.append(
            f"through this node: {traffic['served']} answers, {traffic['errors']} errors, "
            f"{traffic['tokens']} tokens"
        )
    if parts:
        print("  " + "; ".join(parts))


def print_placement(model_id: str, entry: dict[str, Any], names: dict[str, str]) -> None:
    print(f"\nmodel {model_id}: {entry['state']}")
    primary = entry["primary"]
    if primary is not None:
        slots = entry.get("slots")
        at_once = f", {slots} requests at once of {entry.get('context')} tokens" if slots else ""
        print(
            f"  primary {names.get(primary, '?')} ({primary[-12:]}), epoch {entry['epoch']}"
            + at_once
        )
    if (speculation := _speculation_line(entry)) is not None:
        print(speculation)
    if entry.get("serving_meanwhile") is not None:
        print(f"  loading; epoch {entry['serving_meanwhile']} serves until it is ready")
    tunnels = entry.get("tunnels", {})
    planned = entry.get("planned") or {}
    memory = {a["node"]: a["memory_bytes"] for a in planned.get("assignments", [])}
    for assignment in entry["assignments"]:
        node = assignment["node"]
        line = f"  {names.get(node, '?'):<16} {node[-12:]:<14} layers "
        line += f"{assignment['first_layer']}-{assignment['last_layer']}"
        if node in memory:
            line += f", {memory[node] / 2**30:.2f} GiB"
        if (traffic := tunnels.get(node)) is not None:
            line += f", tunnel {traffic['bytes_out'] / 1e6:.1f} MB out"
            line += f" / {traffic['bytes_back'] / 1e6:.1f} MB back"
            line += f", {traffic['round_trips']} round trips"
            line += _carried_by(traffic)
        print(line)
    for node, why in sorted(entry.get("unused", {}).items()):
        print(f"  {names.get(node, '?'):<16} {node[-12:]:<14} unused: {why}")
    if entry.get("problem"):
        print(f"  problem: {entry['problem']}")
    for primary_node, worker in entry.get("relayed_links", []):
        print(
            f"  warning: layers cross a relayed link, {names.get(primary_node, '?')} -> "
            f"{names.get(worker, '?')}: every token waits on the relay (slower than direct)"
        )
    replicas = entry.get("replicas", [])
    if (demand := entry.get("demand")) is not None:
        print(
            f"  demand: {demand['requests_in_flight']:.1f} requests in flight "
            f"(peak {demand['peak_requests_in_flight']:.1f}); {demand['replicas_wanted']} "
            f"replicas wanted, {demand['min_replicas']}-{demand['max_replicas']} allowed"
        )
    for replica in replicas[1:] if len(replicas) > 1 else []:
        primary = replica.get("primary")
        where = "-" if primary is None else f"{names.get(primary, '?')} ({primary[-12:]})"
        print(
            f"  replica {replica['replica']}: {replica['state']}; primary {where}, "
            f"{len(replica['nodes'])} nodes, {replica['in_flight']} in flight, "
            f"{replica['routed']} routed from here"
        )


def _speculation_line(entry: dict[str, Any]) -> str | None:
    """How the placement's engine drafts tokens, and what the planner weighed it by."""
    speculation = entry.get("speculation") or {}
    if speculation.get("mode") is None:
        return None
    line = f"  speculation: {speculation['mode']}"
    if len(speculation.get("allowed", ())) > 1:
        line += " (the planner's choice"
        if speculation.get("learned_tokens"):
            line += (
                f": drafts accepted {speculation['accepted_per_token']:.2f} and checked "
                f"{speculation['drafted_per_token']:.2f} per token over the last "
                f"{speculation['learned_tokens']} tokens)"
            )
        else:
            line += ", nothing learned yet)"
    return line


def agreement(report: Any) -> str:
    agreed = "yes" if report.placements_agree else "no"
    if report.placements_agree_s is not None:
        agreed += f" ({report.placements_agree_s:.1f} s after convergence)"
    return agreed


def _carried_by(traffic: dict[str, Any]) -> str:
    """How a worker's tunnel is carried: sealed by the engines (the fast path), relayed in C
    by the nodes, or in Python."""
    if traffic.get("handed_connections"):
        return ", sealed by the engines"
    if traffic.get("native_connections"):
        return ", relayed natively"
    return ", relayed in Python" if traffic.get("connections") else ""
