"""What the commands share: their error, exit codes, the node's configuration and engine, and
asking the running node."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import socket
import sys
from collections.abc import Callable
from typing import Any

from ..config import NodeConfig, load_config, setting_names
from ..daemon_files import running_api_url
from ..engine.archive import EngineArchiveError, install_engine
from ..engine.build import build_engine
from ..engine.locate import EngineInfo, EngineNotFoundError, find_engine
from .progress import progress_reporter

_log = logging.getLogger("sharedllm.cli")


EXIT_ERROR = 1


EXIT_USAGE = 2


class CommandError(Exception):
    """A command cannot go on; the message is shown to the user as is."""


def load_node_config(args: argparse.Namespace) -> NodeConfig:
    overrides = {name: getattr(args, name, None) for name in setting_names()}
    return load_config(data_dir=args.data_dir, config_file=args.config, overrides=overrides)


def node_name(args: argparse.Namespace) -> str:
    return getattr(args, "name", None) or socket.gethostname()


def first_leaf(error: BaseException) -> BaseException:
    """The first real error inside nested exception groups (nurseries wrap what they raise)."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def ask_local_node(args: argparse.Namespace) -> dict[str, Any]:
    """The local node's view of the mesh, from its API (the port it recorded, unless given)."""
    import httpx

    config = load_node_config(args)
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


def engine_for(config: NodeConfig, fetch: Callable[[], EngineInfo] | None = None) -> EngineInfo:
    """The engine to run: found, else installed from `engine_archive`, else fetched from a
    member (`fetch`, with --engine-from-mesh), else built here."""
    engine = find_or_build_engine(config, fetch)
    if config.rpc_protocol is not None:
        return dataclasses.replace(engine, rpc_protocol=config.rpc_protocol)
    return engine


def find_or_build_engine(
    config: NodeConfig, fetch: Callable[[], EngineInfo] | None = None
) -> EngineInfo:
    try:
        return find_engine(config.cache_dir, config.engine_dir)
    except EngineNotFoundError:
        if config.engine_dir is not None:
            raise
    if config.engine_archive is not None:
        try:
            return install_engine(config.engine_archive, config.cache_dir)
        except (EngineArchiveError, OSError) as err:
            raise CommandError(f"cannot install {config.engine_archive}: {err}") from None
    if fetch is not None:
        print("llama.cpp not found: fetching it from a member of the mesh...", file=sys.stderr)
        return fetch()
    print(
        "llama.cpp not found: building the pinned version once (5-15 minutes)...", file=sys.stderr
    )
    with progress_reporter("building llama.cpp") as report:
        return build_engine(config.cache_dir, progress=report)
