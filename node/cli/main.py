"""`sharedllm-node`: the command line.

Every command turns our own errors into one line on stderr and a non-zero exit: users see what
to fix, not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from ...mesh.identity import IdentityError, load_or_create_identity
from ...mesh.membership import MAX_REASON_CHARS, MAX_REVOCATIONS, Invite, Revocation
from ...mesh.mesh_store import (
    MeshStoreError,
    count_revocations,
    load_addresses,
    load_mesh,
    load_mesh_key,
    save_revocation,
)
from ...mesh.records import RecordError
from ...mesh.transport.seam import TransportError
from ...scheduler.cluster_file import ClusterFileError
from ...scheduler.placement import PlannerError
from ..config import DEFAULT_API_PORT, ConfigError, NodeConfig, load_config, setting_names
from ..daemon_files import running_api_url
from ..engine.build import EngineBuildError, build_engine
from ..engine.devices import list_devices
from ..engine.locate import BACKENDS, EngineInfo, EngineNotFoundError, EngineProbeError, find_engine
from ..mesh_setup import DEFAULT_LISTEN, MeshSetupError, create_mesh, parse_duration, prepare_mesh
from ..models.default_model import DefaultModelError, default_model_path
from ..models.model_file import ModelFileError, ModelInfo, file_sha256, inspect_model
from ..serving.jobs import LocalModel
from ..tools.synthetic_model import SHAPES, WEIGHT_TYPES, write_synthetic_model
from .progress import progress_reporter

EXIT_ERROR = 1
EXIT_USAGE = 2
_log = logging.getLogger("sharedllm.cli")


class CommandError(Exception):
    """A command cannot go on; the message is shown to the user as is."""


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        sys.exit(EXIT_USAGE)
    _setup_logging(getattr(args, "log_level", None) or "info", getattr(args, "log_json", False))
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        code = handler(args)
    except (
        ConfigError,
        CommandError,
        ModelFileError,
        EngineNotFoundError,
        EngineProbeError,
        EngineBuildError,
        DefaultModelError,
    ) as err:
        print(f"sharedllm-node: error: {err}", file=sys.stderr)
        code = EXIT_ERROR
    except (MeshSetupError, MeshStoreError, IdentityError, RecordError, TransportError) as err:
        print(f"sharedllm-node: error: {err}", file=sys.stderr)
        code = EXIT_ERROR
    except (ClusterFileError, PlannerError) as err:
        print(f"sharedllm-node: error: {err}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sharedllm-node",
        description="Serve one large language model from a mesh of ordinary machines.",
    )
    commands = parser.add_subparsers(metavar="COMMAND")

    _add_up_command(commands)

    _add_mesh_commands(commands)

    simulate = commands.add_parser(
        "simulate", help="run the real mesh code on a simulated network of N nodes"
    )
    simulate.add_argument("--nodes", type=int, default=100, help="how many nodes (default: 100)")
    simulate.add_argument("--seed", type=int, default=1, help="fixes every random choice")
    simulate.add_argument(
        "--scenario", default="steady", help="steady, churn, partition, join-storm"
    )
    simulate.add_argument("--loss", type=float, default=0.0, help="segment loss rate, e.g. 0.01")
    simulate.add_argument("--json", action="store_true", help="print one JSON object")
    simulate.add_argument("--log-level", default="warning", help=argparse.SUPPRESS)
    simulate.set_defaults(handler=_cmd_simulate)

    engine = commands.add_parser("engine", help="the llama.cpp engine").add_subparsers(
        metavar="ACTION"
    )
    status = engine.add_parser(
        "status", help="show which engine binaries are used and their versions"
    )
    _add_common(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_cmd_engine_status)
    build = engine.add_parser("build", help="build the pinned llama.cpp into the user cache")
    _add_common(build)
    build.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    build.add_argument("--force", action="store_true", help="rebuild even if a build exists")
    build.add_argument(
        "--backend",
        choices=BACKENDS,
        help="compute backend (default: cuda where nvcc and an NVIDIA GPU are present, metal on "
        "macOS, else cpu)",
    )
    build.set_defaults(handler=_cmd_engine_build)

    plan = commands.add_parser(
        "plan", help="preview the placement of a model on a described cluster"
    )
    plan.add_argument("--model", type=Path, required=True, help="the GGUF file to place")
    plan.add_argument(
        "--cluster", type=Path, required=True, help="CLUSTER.json describing the nodes"
    )
    plan.add_argument("--context", type=int, help="context length per request (default: 4096)")
    plan.add_argument("--json", action="store_true", help="print JSON")
    plan.add_argument("--log-level", default="warning", help=argparse.SUPPRESS)
    plan.set_defaults(handler=_cmd_plan)

    model = commands.add_parser("model", help="model files").add_subparsers(metavar="ACTION")
    inspect = model.add_parser("inspect", help="show a GGUF file's architecture, layers and sizes")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.add_argument("--no-hash", action="store_true", help="skip the SHA-256 of the file")
    inspect.add_argument("--log-level", default="warning", help=argparse.SUPPRESS)
    inspect.set_defaults(handler=_cmd_model_inspect)
    synthetic = model.add_parser(
        "synthetic",
        help="write a model of a real model's shape with random weights (for benchmarks)",
    )
    synthetic.add_argument("file", type=Path, help="the GGUF file to write")
    synthetic.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    synthetic.add_argument("--type", choices=WEIGHT_TYPES, default="q4_k", help="weight type")
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--log-level", default="warning", help=argparse.SUPPRESS)
    synthetic.set_defaults(handler=_cmd_model_synthetic)
    return parser


def _add_mesh_commands(commands: Any) -> None:
    mesh = commands.add_parser("mesh", help="the mesh this node belongs to").add_subparsers(
        metavar="ACTION"
    )
    create = mesh.add_parser("create", help="found a new mesh; this node becomes its admin")
    _add_common(create)
    create.add_argument("--name", default="sharedllm", help="the mesh's name")
    create.set_defaults(handler=_cmd_mesh_create)

    invite = commands.add_parser("invite", help="print an invite token (admins only)")
    _add_common(invite)
    invite.add_argument("--expires", default="1h", help="validity, e.g. 30m, 1h, 2d (default: 1h)")
    invite.add_argument("--uses", type=int, default=1, help="how many nodes may join with it")
    invite.add_argument(
        "--address", action="append", help="bootstrap multiaddr to put in the token"
    )
    invite.set_defaults(handler=_cmd_invite)

    revoke = commands.add_parser(
        "revoke", help="remove a member from the mesh for good (admins only)"
    )
    _add_common(revoke)
    revoke.add_argument("peer", help="the peer id to revoke")
    revoke.add_argument("--reason", default="revoked by an admin")
    revoke.set_defaults(handler=_cmd_revoke)

    peers = commands.add_parser(
        "peers", help="list the mesh's members, as the local node sees them"
    )
    _add_common(peers)
    peers.add_argument("--api-port", type=int, help="the local node's API port")
    peers.add_argument("--json", action="store_true", help="print JSON")
    peers.set_defaults(handler=_cmd_peers)

    status = commands.add_parser(
        "status", help="where each model's layers live, as the local node sees it"
    )
    _add_common(status)
    status.add_argument("--api-port", type=int, help="the local node's API port")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_cmd_status)


def _add_up_command(commands: Any) -> None:
    up = commands.add_parser("up", help="run the node: serve a model on an OpenAI-compatible port")
    _add_common(up)
    up.add_argument(
        "--model", type=Path, help="GGUF file to serve (default: the embedded Gemma 3 270M)"
    )
    up.add_argument(
        "--model-name", help="model id in the API (default: the file name without .gguf)"
    )
    up.add_argument(
        "--no-model",
        action="store_true",
        help="offer no model file, only memory and compute (the default with --join)",
    )
    up.add_argument(
        "--max-memory", help="the most memory this node lends to models, e.g. 6GiB (default: all)"
    )
    up.add_argument("--api-host", help="address of the API (default: 127.0.0.1)")
    up.add_argument("--api-port", type=int, help=f"port of the API (default: {DEFAULT_API_PORT})")
    up.add_argument(
        "--api-key",
        help="key clients must send as 'Authorization: Bearer KEY' (needed to bind the API "
        "beyond 127.0.0.1; or SHAREDLLM_API_KEY)",
    )
    up.add_argument("--context-size", type=int, help="context length per request (default: 4096)")
    up.add_argument("--threads", type=int, help="CPU threads for the engine (default: all)")
    up.add_argument(
        "--listen", action="append", help=f"mesh listen multiaddr (default: {DEFAULT_LISTEN})"
    )
    up.add_argument("--join", metavar="TOKEN", help="join a mesh with an invite token")
    up.add_argument(
        "--peer", action="append", default=[], help="a member's multiaddr to bootstrap from"
    )
    up.add_argument("--name", help="this node's name in the mesh (default: the host name)")
    up.set_defaults(handler=_cmd_up)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="where keys, state and config.toml live")
    parser.add_argument(
        "--config", type=Path, help="a TOML config file (default: DATA_DIR/config.toml)"
    )
    parser.add_argument(
        "--engine-dir", type=Path, help="directory with llama-server and ggml-rpc-server"
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--log-json", action="store_true", help="log one JSON object a line (for log collectors)"
    )


class JsonLines(logging.Formatter):
    """A log record as one JSON object: time (UTC, ISO 8601), level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _load(args: argparse.Namespace) -> NodeConfig:
    overrides = {name: getattr(args, name, None) for name in setting_names()}
    return load_config(data_dir=args.data_dir, config_file=args.config, overrides=overrides)


def _setup_logging(level: str, json_lines: bool = False) -> None:
    """One line per event on stderr, tagged with its component's logger (`sharedllm.mesh`,
    `sharedllm.engine.llama-server`, ...): as text, or as JSON objects with `--log-json`."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    for noisy in ("httpx", "httpcore", "hpack", "multiaddr", "libp2p", "async_service"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_plan(args: argparse.Namespace) -> int:
    from .plan_preview import load_cluster, preview, render

    if args.context is not None and args.context < 1:
        raise ClusterFileError("--context must be positive")
    info = inspect_model(args.model)
    spec = load_cluster(args.cluster, args.model.name.removesuffix(".gguf"))
    result = preview(info, spec, args.context)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


def _cmd_model_inspect(args: argparse.Namespace) -> int:
    info = inspect_model(args.file)
    digest = None if args.no_hash else file_sha256(args.file)
    if args.json:
        print(json.dumps({**info.as_dict(), "sha256": digest}, indent=2))
    else:
        _print_model(info, digest)
    return 0


def _cmd_model_synthetic(args: argparse.Namespace) -> int:
    if args.file.exists():
        print(f"error: {args.file} exists; choose another name", file=sys.stderr)
        return 2
    write_synthetic_model(args.file, SHAPES[args.shape], seed=args.seed, dtype=args.type)
    size = args.file.stat().st_size
    print(f"{args.file}: {args.shape} shape, {args.type} weights, {size / 1024**3:.2f} GiB")
    return 0


def _print_model(info: ModelInfo, digest: str | None) -> None:
    p = info.profile
    sizes = sorted(set(p.layer_weight_bytes))
    per_layer = _mib(sizes[0]) if len(sizes) == 1 else f"{_mib(sizes[0])} to {_mib(sizes[-1])}"
    rows: list[tuple[str, Any]] = [
        ("file", info.path),
        ("name", p.name),
        ("architecture", p.architecture),
        ("layers", p.layer_count),
        ("bytes per layer", per_layer),
        ("embedding bytes", _mib(p.embedding_bytes)),
        (
            "output head bytes",
            _mib(p.output_bytes) if p.output_bytes else "0 (tied to the embedding)",
        ),
        ("total weight bytes", _mib(p.total_weight_bytes)),
        ("KV cache per token per layer", f"{p.kv_bytes_per_token_per_layer} bytes (f16)"),
        ("context length", p.context_length),
        ("embedding length", p.embedding_length),
        ("vocabulary", p.vocab_size),
        ("quantisation", info.file_type),
        ("tensor types", ", ".join(f"{k}: {v}" for k, v in info.tensor_types.items())),
        ("file size", _mib(info.size_bytes)),
        ("sha256", digest or "(skipped)"),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.2f} MiB ({n} bytes)"


def _cmd_engine_status(args: argparse.Namespace) -> int:
    config = _load(args)
    info = find_engine(config.cache_dir, config.engine_dir)
    if args.json:
        print(json.dumps(info.as_dict(), indent=2))
    else:
        for key, value in info.as_dict().items():
            print(f"{key:<13} {value}")
    return 0


def _cmd_engine_build(args: argparse.Namespace) -> int:
    config = _load(args)
    with progress_reporter("building llama.cpp") as report:
        info = build_engine(
            config.cache_dir,
            jobs=args.jobs,
            force=args.force,
            progress=report,
            backend=args.backend,
        )
    where = info.llama_server.parent
    print(f"engine ready: {where} (version {info.version}, RPC {info.rpc_protocol})")
    return 0


def _engine_for(config: NodeConfig) -> EngineInfo:
    engine = _find_or_build_engine(config)
    if config.rpc_protocol is not None:
        return dataclasses.replace(engine, rpc_protocol=config.rpc_protocol)
    return engine


def _find_or_build_engine(config: NodeConfig) -> EngineInfo:
    try:
        return find_engine(config.cache_dir, config.engine_dir)
    except EngineNotFoundError:
        if config.engine_dir is not None:
            raise
    print(
        "llama.cpp not found: building the pinned version once (5-15 minutes)...", file=sys.stderr
    )
    with progress_reporter("building llama.cpp") as report:
        return build_engine(config.cache_dir, progress=report)


def _node_name(args: argparse.Namespace) -> str:
    return getattr(args, "name", None) or socket.gethostname()


def _cmd_mesh_create(args: argparse.Namespace) -> int:
    config = _load(args)
    identity = load_or_create_identity(config.data_dir)
    files = create_mesh(config.data_dir, identity, args.name, socket.gethostname(), time.time())
    print(f"created mesh {files.name!r}; this node ({identity.peer_id}) is its admin")
    return 0


def _cmd_invite(args: argparse.Namespace) -> int:
    config = _load(args)
    files = load_mesh(config.data_dir)
    key = load_mesh_key(config.data_dir)
    addresses = args.address or load_addresses(config.data_dir)
    if not addresses:
        raise CommandError(
            "no address to put in the invite: start this node (sharedllm-node up) or pass --address"
        )
    identity = load_or_create_identity(config.data_dir)
    suffix = f"/p2p/{identity.peer_id}"
    bootstrap = [a if "/p2p/" in a else a + suffix for a in addresses]
    invite = Invite.create(
        key,
        files.name,
        now=time.time(),
        expires_in_s=parse_duration(args.expires),
        uses=args.uses,
        bootstrap=bootstrap,
    )
    print(invite.to_token())
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    from ...mesh.identity import public_key_of_peer_id

    config = _load(args)
    key = load_mesh_key(config.data_dir)
    try:
        public_key_of_peer_id(args.peer)
    except ValueError as err:
        raise CommandError(str(err)) from None
    if len(args.reason) > MAX_REASON_CHARS:
        raise CommandError(
            f"--reason is {len(args.reason)} characters; at most {MAX_REASON_CHARS} travel "
            "with a revocation"
        )
    if count_revocations(config.data_dir) >= MAX_REVOCATIONS:
        raise CommandError(
            f"this mesh already holds {MAX_REVOCATIONS} revocations, the most it keeps"
        )
    save_revocation(config.data_dir, Revocation.issue(key, args.peer, args.reason, time.time()))
    print(f"revoked {args.peer}; the running node spreads this to the mesh")
    return 0


def _number(value: Any, digits: int, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def _peer_columns(peer: dict[str, Any]) -> tuple[str, ...]:
    engine = f"{peer.get('engine_version', '-')} rpc {peer.get('rpc_protocol', '-')}"
    return (
        peer["peer_id"][-12:],
        str(peer.get("name", "-"))[:16],
        peer["state"],
        _number(peer.get("data_rtt_ms") or peer.get("rtt_ms"), 2),
        _number(peer.get("bandwidth_mbps"), 0),
        _number(peer.get("ram_total"), 1, 1024**3),
        _number(peer.get("vram_total"), 1, 1024**3),
        str(peer.get("gflops", "-")),
        engine,
        ",".join(m.get("id", "?") for m in peer.get("models", [])),
        " ".join(peer.get("addrs", []))[:120],
    )


def _ask_local_node(args: argparse.Namespace) -> dict[str, Any]:
    """The local node's view of the mesh, from its API (the port it recorded, unless given)."""
    import httpx

    config = _load(args)
    url = f"http://127.0.0.1:{args.api_port}" if args.api_port else running_api_url(config)
    try:
        key = {"authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        answer = httpx.get(f"{url}/mesh/peers", timeout=5.0, headers=key)
        view = answer.json()
    except (httpx.HTTPError, ValueError) as err:
        raise CommandError(
            f"no node answers at {url} ({type(err).__name__}); is it running?"
        ) from None
    if not isinstance(view, dict) or "peers" not in view:
        raise CommandError(f"{url} does not look like a sharedllm node")
    return view


def _cmd_simulate(args: argparse.Namespace) -> int:
    from ...simnet.scenarios import SCENARIOS, simulate

    if args.scenario not in SCENARIOS:
        raise CommandError(f"unknown scenario {args.scenario!r} (known: {', '.join(SCENARIOS)})")
    if not 2 <= args.nodes <= 5000:
        raise CommandError("--nodes must be between 2 and 5000")
    if not 0.0 <= args.loss < 0.5:
        raise CommandError("--loss must be between 0 and 0.5")
    report = simulate(args.scenario, args.nodes, args.seed, loss=args.loss)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} s"

    rows = [
        ("scenario", f"{report.scenario}, {report.nodes} nodes, seed {report.seed}"),
        ("converged", "yes" if report.converged else "NO"),
        (
            "convergence",
            f"{seconds(report.convergence_s)} virtual, {report.rounds or 0:.1f} rounds",
        ),
        ("failure detection", seconds(report.failure_detection_s)),
        ("recovery", seconds(report.recovery_s)),
        ("false suspicions", str(report.false_suspicions)),
        (
            "elections",
            f"{report.elections} (epochs with two primaries: {report.election_safety_violations})",
        ),
        ("placements agree", _agreement(report)),
        (
            "per node per s",
            f"{report.messages_per_node_per_s:.1f} messages, "
            f"{report.bytes_per_node_per_s / 1024:.1f} KiB",
        ),
        ("time", f"{report.virtual_s:.1f} s virtual in {report.wall_s:.1f} s wall"),
        ("trace digest", report.trace_digest),
    ]
    for label, value in rows:
        print(f"{label:<18} {value}")
    for note in report.notes:
        print(f"note: {note}")
    return 0 if report.converged else 1


def _agreement(report: Any) -> str:
    agreed = "yes" if report.placements_agree else "no"
    if report.placements_agree_s is not None:
        agreed += f" ({report.placements_agree_s:.1f} s after convergence)"
    return agreed


def _cmd_status(args: argparse.Namespace) -> int:
    view = _ask_local_node(args)
    if args.json:
        traffic = view.get("api_traffic", {})
        models = {
            model_id: {"model": model_id, **entry, "api_traffic": traffic.get(model_id)}
            for model_id, entry in view["models"].items()
        }
        print(
            json.dumps(
                {"peer_id": view["peer_id"], "mesh": view["mesh"], "models": models}, indent=2
            )
        )
        return 0
    names = {p["peer_id"]: p.get("name", "?") for p in view["peers"]}
    print(f"mesh {view['mesh']}, this node {names.get(view['peer_id'], '?')} ({view['peer_id']})")
    if not view["models"]:
        print("no model is offered in the mesh yet")
    for model_id, entry in view["models"].items():
        _print_placement(model_id, entry, names)
        _print_speed(entry, view.get("api_traffic", {}).get(model_id))
    return 0


def _print_speed(entry: dict[str, Any], traffic: dict[str, Any] | None) -> None:
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


def _print_placement(model_id: str, entry: dict[str, Any], names: dict[str, str]) -> None:
    print(f"\nmodel {model_id}: {entry['state']}")
    primary = entry["primary"]
    if primary is not None:
        print(f"  primary {names.get(primary, '?')} ({primary[-12:]}), epoch {entry['epoch']}")
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
        print(line)
    for node, why in sorted(entry.get("unused", {}).items()):
        print(f"  {names.get(node, '?'):<16} {node[-12:]:<14} unused: {why}")
    if entry.get("problem"):
        print(f"  problem: {entry['problem']}")


def _cmd_peers(args: argparse.Namespace) -> int:
    view = _ask_local_node(args)
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    print(f"mesh {view['mesh']}, this node {view['peer_id']}")
    columns = "{:<14} {:<16} {:<8} {:>7} {:>8} {:>8} {:>8} {:>7} {:<30} {:<20} {}"
    headers = ("peer", "name", "state", "rtt ms", "Mbit/s", "RAM GiB", "VRAM GiB", "GFLOPS")
    print(columns.format(*headers, "engine", "models", "addresses"))
    for peer in view["peers"]:
        print(columns.format(*_peer_columns(peer)))
    return 0


def _first_leaf(error: BaseException) -> BaseException:
    """The first real error inside nested exception groups (nurseries wrap what they raise)."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _models_to_offer(args: argparse.Namespace, config: NodeConfig) -> list[LocalModel]:
    """The model files this node offers: --model, else the embedded default, except that a node
    joining a mesh (or started with --no-model) offers none and lends its memory instead."""
    if config.model is not None:
        path = config.model
    elif args.no_model or args.join:
        return []
    else:
        with progress_reporter("default model") as report:
            path = default_model_path(config.cache_dir, report)
    info = inspect_model(path)  # refuse a bad file before starting anything
    model_id = config.model_name or path.name.removesuffix(".gguf")
    return [LocalModel(model_id, info, int(path.stat().st_mtime))]


def _measured_speed(config: NodeConfig, engine: EngineInfo, *, gpu: bool) -> float:
    """The engine's own speed on the default model; a matrix-multiply figure if it cannot be
    timed (it is then on another scale: the planner will misjudge this node)."""
    from ..capacity import measured_gflops
    from ..engine.speed import EngineSpeedError, engine_gflops

    try:
        model = default_model_path(config.cache_dir)
        return engine_gflops(
            engine,
            model,
            inspect_model(model).profile,
            threads=config.threads or os.cpu_count() or 1,
            gpu_layers=gpu,
            cache_dir=config.cache_dir,
        )
    except (EngineSpeedError, DefaultModelError, ModelFileError, OSError) as err:
        _log.warning("could not time the engine (%s); measuring matrix multiplies instead", err)
        return measured_gflops(config.cache_dir)


def _cmd_up(args: argparse.Namespace) -> int:
    from ..capacity import describe
    from ..daemon import ApiBindError, MeshOptions, check_ports_free, run_node

    config = _load(args)
    logging.getLogger().setLevel(config.log_level.upper())
    listen = tuple(args.listen or [DEFAULT_LISTEN])
    try:
        check_ports_free(config, listen)
    except (ApiBindError, TransportError) as err:
        raise CommandError(str(err)) from None
    models = _models_to_offer(args, config)
    engine = _engine_for(config)
    _log.info("engine %s (RPC %s) from %s", engine.version, engine.rpc_protocol, engine.source)
    plan = prepare_mesh(config.data_dir, _node_name(args), args.join, time.time())
    if plan.created:
        print(
            f"created a new mesh; this node ({plan.identity.peer_id}) is its admin; "
            "`sharedllm-node invite` prints a token for other nodes",
            file=sys.stderr,
        )
    devices = list_devices(engine.llama_server)
    gflops = config.compute_gflops or _measured_speed(config, engine, gpu=bool(devices))
    cap = config.max_memory_bytes
    mesh = MeshOptions(
        plan=plan,
        listen=listen,
        peers=tuple(args.peer),
        node_name=_node_name(args),
        data_dir=config.data_dir,
        capacity=lambda: describe(engine, gflops, config.api_port, cap, devices),
    )
    try:
        trio.run(run_node, config, engine, models, mesh)
    except* (ApiBindError, TransportError) as group:
        raise CommandError(str(_first_leaf(group))) from None
    return 0
