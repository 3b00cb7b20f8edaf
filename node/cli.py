"""`sharedllm-node`: the command line.

Every command turns our own errors into one line on stderr and a non-zero exit: users see what
to fix, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from ..scheduler.cluster_file import ClusterFileError
from ..scheduler.placement import PlannerError
from .config import DEFAULT_API_PORT, ConfigError, NodeConfig, load_config, setting_names
from .default_model import DefaultModelError, default_model_path
from .engine import EngineInfo, EngineNotFoundError, EngineProbeError, find_engine
from .engine_build import EngineBuildError, build_engine
from .model_file import ModelFileError, ModelInfo, file_sha256, inspect_model
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
    _setup_logging(getattr(args, "log_level", None) or "info")
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

    up = commands.add_parser("up", help="run the node: serve a model on an OpenAI-compatible port")
    _add_common(up)
    up.add_argument(
        "--model", type=Path, help="GGUF file to serve (default: the embedded Gemma 3 270M)"
    )
    up.add_argument(
        "--model-name", help="model id in the API (default: the file name without .gguf)"
    )
    up.add_argument("--api-host", help="address of the API (default: 127.0.0.1)")
    up.add_argument("--api-port", type=int, help=f"port of the API (default: {DEFAULT_API_PORT})")
    up.add_argument("--context-size", type=int, help="context length per request (default: 4096)")
    up.add_argument("--threads", type=int, help="CPU threads for the engine (default: all)")
    up.set_defaults(handler=_cmd_up)

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
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="where keys, state and config.toml live")
    parser.add_argument(
        "--config", type=Path, help="a TOML config file (default: DATA_DIR/config.toml)"
    )
    parser.add_argument(
        "--engine-dir", type=Path, help="directory with llama-server and ggml-rpc-server"
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _load(args: argparse.Namespace) -> NodeConfig:
    overrides = {name: getattr(args, name, None) for name in setting_names()}
    return load_config(data_dir=args.data_dir, config_file=args.config, overrides=overrides)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)


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
        info = build_engine(config.cache_dir, jobs=args.jobs, force=args.force, progress=report)
    where = info.llama_server.parent
    print(f"engine ready: {where} (version {info.version}, RPC {info.rpc_protocol})")
    return 0


def _engine_for(config: NodeConfig) -> EngineInfo:
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


def _cmd_up(args: argparse.Namespace) -> int:
    from .daemon import ApiBindError, ServedModel, run_node

    config = _load(args)
    logging.getLogger().setLevel(config.log_level.upper())
    if config.model is not None:
        model_path = config.model
    else:
        with progress_reporter("assembling the default model") as report:
            report("assemble", 0.0)
            model_path = default_model_path(config.cache_dir)
    inspect_model(model_path)  # refuse a bad file before starting anything
    engine = _engine_for(config)
    model = ServedModel(
        model_id=config.model_name or model_path.name.removesuffix(".gguf"),
        path=model_path,
        created=int(model_path.stat().st_mtime),
    )
    _log.info("engine %s (RPC %s) from %s", engine.version, engine.rpc_protocol, engine.source)
    try:
        trio.run(run_node, config, engine, model)
    except* ApiBindError as group:
        raise CommandError(str(group.exceptions[0])) from None
    return 0
