"""`sharedllm-node engine ...`: where the engine is, and building it."""

from __future__ import annotations

import argparse
import json
import logging

from ..engine.build import build_engine
from ..engine.locate import find_engine
from .common import load_node_config
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
