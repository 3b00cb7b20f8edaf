"""`sharedllm-node up`: preparing this node (models, engine, speed) and running it."""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from collections.abc import Callable

import trio

from ...mesh.mesh_store import load_known_peers
from ...mesh.transport.seam import TransportError
from ..config import NodeConfig
from ..engine.archive import EngineArchiveError
from ..engine.devices import list_devices
from ..engine.locate import EngineInfo, detect_backend
from ..mesh_setup import DEFAULT_LISTEN, MeshPlan, join_token_from, prepare_mesh
from ..models.default_model import DefaultModelError, default_model_path
from ..models.draft_model import draft_for
from ..models.model_file import ModelFileError, inspect_model
from ..models.model_kind import inferred_kind
from ..serving.jobs import LocalModel
from .common import CommandError, engine_for, first_leaf, load_node_config, node_name
from .progress import progress_reporter

_log = logging.getLogger("sharedllm.cli")


def models_to_offer(args: argparse.Namespace, config: NodeConfig) -> list[LocalModel]:
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
    kind = config.model_kind or inferred_kind(info.profile.architecture, info.pooling_type)
    draft = draft_for(info, config.draft_model, config.cache_dir) if kind == "text" else None
    if draft is not None:
        _log.info("model %s: %s can draft for it", model_id, draft.path.name)
    modified = int(path.stat().st_mtime)
    return [LocalModel(model_id, info, modified, config.model_aliases, kind, draft)]


def measured_speed(config: NodeConfig, engine: EngineInfo, *, gpu: bool) -> float:
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


def _fetcher(
    config: NodeConfig, plan: MeshPlan, listen: tuple[str, ...], bootstrap: tuple[str, ...]
) -> Callable[[], EngineInfo]:
    def fetch() -> EngineInfo:
        from ..engine_share import EngineFetchError, fetch_engine_from_mesh

        try:
            return fetch_engine_from_mesh(
                plan,
                listen,
                bootstrap,
                config.cache_dir,
                backend=detect_backend(),
                wall_clock=time.time,
                rng=random.Random(),
            )
        except (EngineFetchError, EngineArchiveError, TransportError, OSError) as err:
            raise CommandError(f"cannot fetch the engine from the mesh: {err}") from None

    return fetch


def cmd_up(args: argparse.Namespace) -> int:
    from ..api.server import ApiBindError
    from ..capacity import describe
    from ..daemon import MeshOptions, check_ports_free, run_node

    config = load_node_config(args)
    logging.getLogger().setLevel(config.log_level.upper())
    listen = tuple(args.listen or [DEFAULT_LISTEN])
    try:
        check_ports_free(config, listen)
    except (ApiBindError, TransportError) as err:
        raise CommandError(str(err)) from None
    models = models_to_offer(args, config)
    join = join_token_from(args.join, config.data_dir)
    plan = prepare_mesh(config.data_dir, node_name(args), join, time.time())
    bootstrap = (*plan.bootstrap, *args.peer, *load_known_peers(config.data_dir))
    engine = engine_for(
        config, _fetcher(config, plan, listen, bootstrap) if config.engine_from_mesh else None
    )
    _log.info("engine %s (RPC %s) from %s", engine.version, engine.rpc_protocol, engine.source)
    if plan.created:
        print(
            f"created a new mesh; this node ({plan.identity.peer_id}) is its admin; "
            "`sharedllm-node invite` prints a token for other nodes",
            file=sys.stderr,
        )
    listing = time.monotonic()
    devices = list_devices(engine.llama_server)
    _log.info(
        "engine devices: %s (listed in %.1f s)",
        ", ".join(f"{d.name} {d.description} ({d.total_bytes / 1024**3:.0f} GiB)" for d in devices)
        or "none, it computes on the CPU",
        time.monotonic() - listing,
    )
    gflops = config.compute_gflops or measured_speed(config, engine, gpu=bool(devices))
    cap = config.max_memory_bytes
    mesh = MeshOptions(
        plan=plan,
        listen=listen,
        peers=tuple(args.peer),
        node_name=node_name(args),
        data_dir=config.data_dir,
        capacity=lambda: describe(engine, gflops, config.api_port, cap, devices),
        invite_file=args.invite_file,
        invite_uses=args.invite_uses,
    )
    try:
        trio.run(run_node, config, engine, models, mesh)
    except* (ApiBindError, TransportError) as group:
        raise CommandError(str(first_leaf(group))) from None
    return 0
