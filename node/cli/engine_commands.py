"""`sharedllm-node engine ...`: where the engine is, and building it."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..engine.archive import EngineArchiveError, install_engine, pack_engine
from ..engine.build import build_engine
from ..engine.locate import detect_backend, find_engine, pinned_build_key
from .common import CommandError, load_node_config
from .progress import progress_reporter

_log = logging.getLogger("sharedllm.cli")


def cmd_engine_status(args: argparse.Namespace) -> int:
    config = load_node_config(args)
    info = find_engine(config.cache_dir, config.engine_dir)
    if args.json:
        print(json.dumps(info.as_dict(), indent=2))
    else:
        for key, value in info.as_dict().items():
            print(f"{key:<13} {value}")
    return 0


def cmd_engine_build(args: argparse.Namespace) -> int:
    config = load_node_config(args)
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


def cmd_engine_pack(args: argparse.Namespace) -> int:
    config = load_node_config(args)
    backend = args.backend or detect_backend()
    output = args.output or Path(f"{pinned_build_key(backend)}.tar.gz")
    try:
        written = pack_engine(config.cache_dir, backend, output)
    except (EngineArchiveError, OSError) as err:
        raise CommandError(f"cannot pack the engine: {err}") from None
    size = written.stat().st_size / 1e6
    print(
        f"engine packed: {written} ({size:.1f} MB); on another machine of this platform: "
        f"sharedllm-node engine install {written.name}"
    )
    return 0


def cmd_engine_install(args: argparse.Namespace) -> int:
    config = load_node_config(args)
    try:
        info = install_engine(args.archive, config.cache_dir)
    except (EngineArchiveError, OSError) as err:
        raise CommandError(f"cannot install {args.archive}: {err}") from None
    where = info.llama_server.parent
    print(f"engine installed: {where} (version {info.version}, RPC {info.rpc_protocol})")
    return 0
