"""`sharedllm-node mesh create`, `invite`, `revoke`, `status` and `peers`."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import time

from ...mesh.addresses import host_of_multiaddr, only_this_machine
from ...mesh.identity import load_or_create_identity
from ...mesh.membership import MAX_REASON_CHARS, MAX_REVOCATIONS, Revocation
from ...mesh.mesh_store import (
    count_revocations,
    load_addresses,
    load_mesh_key,
    save_revocation,
)
from ..mesh_setup import create_mesh, make_invite, parse_duration
from .common import CommandError, ask_local_node, load_node_config
from .render import peer_columns, print_placement, print_speed

_log = logging.getLogger("sharedllm.cli")


def cmd_mesh_create(args: argparse.Namespace) -> int:
    config = load_node_config(args)
    identity = load_or_create_identity(config.data_dir)
    files = create_mesh(config.data_dir, identity, args.name, socket.gethostname(), time.time())
    print(f"created mesh {files.name!r}; this node ({identity.peer_id}) is its admin")
    return 0


def cmd_invite(args: argparse.Namespace) -> int:
    config = load_node_config(args)
    addresses = args.address or load_addresses(config.data_dir)
    if not addresses:
        raise CommandError(
            "no address to put in the invite: start this node (sharedllm-node up) or pass --address"
        )
    if only_this_machine([host_of_multiaddr(a) or "" for a in addresses]):
        print(
            "warning: this invite's addresses reach only this machine (the node listens on "
            "loopback); for other machines, run `up --listen /ip4/0.0.0.0/tcp/9338` or pass "
            "--address with an address they can reach",
            file=sys.stderr,
        )
    token = make_invite(
        config.data_dir,
        addresses,
        uses=args.uses,
        expires_in_s=parse_duration(args.expires),
        now=time.time(),
    )
    print(token)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from ...mesh.identity import public_key_of_peer_id

    config = load_node_config(args)
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


def cmd_status(args: argparse.Namespace) -> int:
    view = ask_local_node(args)
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
        print_placement(model_id, entry, names)
        print_speed(entry, view.get("api_traffic", {}).get(model_id))
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    view = ask_local_node(args)
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    print(f"mesh {view['mesh']}, this node {view['peer_id']}")
    columns = "{:<14} {:<16} {:<8} {:>7} {:>8} {:>8} {:>8} {:>7} {:<30} {:<20} {:<13} {}"
    headers = ("peer", "name", "state", "rtt ms", "Mbit/s", "RAM GiB", "VRAM GiB", "GFLOPS")
    print(columns.format(*headers, "engine", "models", "path", "address in use"))
    for peer in view["peers"]:
        print(columns.format(*peer_columns(peer)))
    return 0
