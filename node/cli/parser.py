"""The command line's grammar: every command, its flags, and the function that runs it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import DEFAULT_API_PORT
from ..engine.locate import BACKENDS
from ..mesh_setup import DEFAULT_LISTEN
from ..models.model_kind import KINDS
from ..tools.synthetic_model import SHAPES, WEIGHT_TYPES
from .engine_commands import (
    cmd_engine_build,
    cmd_engine_install,
    cmd_engine_pack,
    cmd_engine_status,
)
from .mesh_commands import cmd_invite, cmd_mesh_create, cmd_peers, cmd_revoke, cmd_status
from .model_commands import cmd_model_inspect, cmd_model_synthetic, cmd_plan
from .service_commands import cmd_service_install, cmd_service_status, cmd_service_uninstall
from .simulate import cmd_simulate
from .up import cmd_up


def command_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sharedllm-node",
        description="Serve one large language model from a mesh of ordinary machines.",
    )
    commands = parser.add_subparsers(metavar="COMMAND")

    add_up_command(commands)

    add_mesh_commands(commands)

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
    simulate.set_defaults(handler=cmd_simulate)

    _add_engine_commands(commands)
    _add_service_commands(commands)

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
    plan.set_defaults(handler=cmd_plan)

    model = commands.add_parser("model", help="model files").add_subparsers(metavar="ACTION")
    inspect = model.add_parser("inspect", help="show a GGUF file's architecture, layers and sizes")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.add_argument("--no-hash", action="store_true", help="skip the SHA-256 of the file")
    inspect.add_argument("--log-level", default="warning", help=argparse.SUPPRESS)
    inspect.set_defaults(handler=cmd_model_inspect)
    synthetic = model.add_parser(
        "synthetic",
        help="write a model of a real model's shape with random weights (for benchmarks)",
    )
    synthetic.add_argument("file", type=Path, help="the GGUF file to write")
    synthetic.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    synthetic.add_argument("--type", choices=WEIGHT_TYPES, default="q4_k", help="weight type")
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--log-level", default="warning", help=argparse.SUPPRESS)
    synthetic.set_defaults(handler=cmd_model_synthetic)
    return parser


def add_mesh_commands(commands: Any) -> None:
    mesh = commands.add_parser("mesh", help="the mesh this node belongs to").add_subparsers(
        metavar="ACTION"
    )
    create = mesh.add_parser("create", help="found a new mesh; this node becomes its admin")
    add_common(create)
    create.add_argument("--name", default="sharedllm", help="the mesh's name")
    create.set_defaults(handler=cmd_mesh_create)

    invite = commands.add_parser("invite", help="print an invite token (admins only)")
    add_common(invite)
    invite.add_argument("--expires", default="1h", help="validity, e.g. 30m, 1h, 2d (default: 1h)")
    invite.add_argument(
        "--uses", type=positive_int, default=1, help="how many nodes may join with it"
    )
    invite.add_argument(
        "--address", action="append", help="bootstrap multiaddr to put in the token"
    )
    invite.set_defaults(handler=cmd_invite)

    revoke = commands.add_parser(
        "revoke", help="remove a member from the mesh for good (admins only)"
    )
    add_common(revoke)
    revoke.add_argument("peer", help="the peer id to revoke")
    revoke.add_argument("--reason", default="revoked by an admin")
    revoke.set_defaults(handler=cmd_revoke)

    peers = commands.add_parser(
        "peers", help="list the mesh's members, as the local node sees them"
    )
    add_common(peers)
    peers.add_argument("--api-port", type=int, help="the local node's API port")
    peers.add_argument("--json", action="store_true", help="print JSON")
    peers.set_defaults(handler=cmd_peers)

    status = commands.add_parser(
        "status", help="where each model's layers live, as the local node sees it"
    )
    add_common(status)
    status.add_argument("--api-port", type=int, help="the local node's API port")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=cmd_status)


def add_up_command(commands: Any) -> None:
    up = commands.add_parser("up", help="run the node: serve a model on an OpenAI-compatible port")
    add_common(up)
    up.add_argument(
        "--model", type=Path, help="GGUF file to serve (default: the embedded Gemma 3 270M)"
    )
    up.add_argument(
        "--model-name", help="model id in the API (default: the file name without .gguf)"
    )
    up.add_argument(
        "--kind",
        dest="model_kind",
        choices=KINDS,
        help="what the model is for (default: read from the GGUF; text unless it pools "
        "embeddings or ranks)",
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
    up.add_argument(
        "--parallel-slots",
        type=int,
        help="requests the model's engine runs at once (default: 4; fewer if memory is short)",
    )
    up.add_argument(
        "--min-replicas",
        type=int,
        help="placements of the model kept at once, on separate nodes, however idle (default: 1)",
    )
    up.add_argument(
        "--max-replicas",
        type=int,
        help="placements of the model demand may add up to (default: 4; 1 turns replicas off)",
    )
    up.add_argument("--threads", type=int, help="CPU threads for the engine (default: all)")
    up.add_argument(
        "--listen", action="append", help=f"mesh listen multiaddr (default: {DEFAULT_LISTEN})"
    )
    up.add_argument(
        "--data-port",
        type=int,
        help="TCP port of the data plane, on the --listen interfaces (default: the mesh port + 1)",
    )
    up.add_argument(
        "--no-mdns",
        dest="mdns",
        action="store_const",
        const=False,
        help="do not announce this node or look for members on the LAN (mDNS)",
    )
    up.add_argument(
        "--no-upnp",
        dest="upnp",
        action="store_const",
        const=False,
        help="do not ask the router to forward the mesh and data ports (UPnP)",
    )
    up.add_argument(
        "--no-native-relay",
        dest="native_relay",
        action="store_const",
        const=False,
        help="copy rpc tunnels in Python rather than with the native relay (to compare)",
    )
    up.add_argument(
        "--no-engine-seal",
        dest="engine_seals",
        action="store_const",
        const=False,
        help="relay rpc tunnels natively rather than hand them to the engine to seal (to compare)",
    )
    up.add_argument(
        "--speculation",
        choices=("auto", "off", "ngram", "draft"),
        help="speculative decoding of this node's models: ngram drafts from the text so far, "
        "draft with a draft model (--draft-model); auto lets the planner choose by what drafts "
        "yield (default: auto)",
    )
    up.add_argument(
        "--draft-model",
        type=Path,
        help="a small GGUF model of the same vocabulary that drafts tokens for --model when "
        "this node leads it (default: the embedded Gemma 3 270M where it matches)",
    )
    up.add_argument(
        "--split",
        choices=("planner", "memory"),
        help="how this node's models are split: by the planner (default), or in proportion "
        "to memory as llama.cpp does (to compare)",
    )
    up.add_argument(
        "--engine-from-mesh",
        action="store_const",
        const=True,
        help="with no engine here, take a member's build of this platform instead of building",
    )
    up.add_argument(
        "--relay",
        action="store_const",
        const=True,
        help="carry connections for members behind NATs (circuit relay v2, members only)",
    )
    up.add_argument(
        "--join",
        metavar="TOKEN",
        help="join a mesh with an invite token (@FILE: read it from FILE, waiting for it)",
    )
    up.add_argument(
        "--invite-file",
        type=Path,
        help="once running, write an invite token to this file (admins; for container stacks)",
    )
    up.add_argument(
        "--invite-uses", type=positive_int, default=8, help="joiners the --invite-file token admits"
    )
    up.add_argument(
        "--peer", action="append", default=[], help="a member's multiaddr to bootstrap from"
    )
    up.add_argument("--name", help="this node's name in the mesh (default: the host name)")
    up.set_defaults(handler=cmd_up)


def _add_engine_commands(commands: Any) -> None:
    engine = commands.add_parser("engine", help="the llama.cpp engine").add_subparsers(
        metavar="ACTION"
    )
    status = engine.add_parser(
        "status", help="show which engine binaries are used and their versions"
    )
    add_common(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=cmd_engine_status)
    build = engine.add_parser("build", help="build the pinned llama.cpp into the user cache")
    add_common(build)
    build.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    build.add_argument("--force", action="store_true", help="rebuild even if a build exists")
    build.add_argument(
        "--backend",
        choices=BACKENDS,
        help="compute backend (default: cuda where nvcc and an NVIDIA GPU are present, metal on "
        "macOS, else cpu)",
    )
    build.set_defaults(handler=cmd_engine_build)
    pack = engine.add_parser(
        "pack", help="write the built engine to one archive, for other machines of this platform"
    )
    add_common(pack)
    pack.add_argument("--output", type=Path, help="the archive (default: ./BUILD-KEY.tar.gz)")
    pack.add_argument("--backend", choices=BACKENDS, help="which build (default: this machine's)")
    pack.set_defaults(handler=cmd_engine_pack)
    install = engine.add_parser(
        "install", help="install an engine archive into the cache, after checking it runs here"
    )
    add_common(install)
    install.add_argument("archive", type=Path, help="an archive written by `engine pack`")
    install.set_defaults(handler=cmd_engine_install)


def _add_service_commands(commands: Any) -> None:
    service = commands.add_parser("service", help="run the node as a service").add_subparsers(
        metavar="ACTION"
    )
    scope = "the whole system's service (root), not this user's"
    install_parser = service.add_parser(
        "install", help="start the node at boot and again after a failure (systemd, launchd)"
    )
    add_common(install_parser)
    install_parser.add_argument("--system", action="store_true", help=scope)
    install_parser.add_argument(
        "up_args", nargs=argparse.REMAINDER, help="after --: arguments for `up` (e.g. --relay)"
    )
    install_parser.set_defaults(handler=cmd_service_install)
    for name, handler, words in (
        ("status", cmd_service_status, "whether the service is installed and running"),
        ("uninstall", cmd_service_uninstall, "stop the service and remove it"),
    ):
        sub = service.add_parser(name, help=words)
        add_common(sub)
        sub.add_argument("--system", action="store_true", help=scope)
        sub.set_defaults(handler=handler)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="where keys, state and config.toml live")
    parser.add_argument(
        "--config", type=Path, help="a TOML config file (default: DATA_DIR/config.toml)"
    )
    parser.add_argument(
        "--engine-dir", type=Path, help="directory with llama-server and ggml-rpc-server"
    )
    parser.add_argument(
        "--engine-archive",
        type=Path,
        help="an archive from `engine pack` to install when no engine is found (not built)",
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--log-json", action="store_true", help="log one JSON object a line (for log collectors)"
    )
