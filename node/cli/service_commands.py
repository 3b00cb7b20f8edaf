"""`sharedllm-node service install | status | uninstall`: the node as a service that starts at
boot and comes back after a failure (systemd on Linux, launchd on macOS)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from ..service.manager import ServiceError, ServiceHome, install, status, uninstall
from ..service.units import ServiceSpec, unit_arguments
from .common import CommandError, load_node_config


def _program() -> Path:
    """This installation's `sharedllm-node`, by absolute path (a service has no PATH of ours)."""
    beside = Path(sys.executable).parent / "sharedllm-node"
    found = beside if beside.exists() else shutil.which("sharedllm-node")
    if found is None:
        raise CommandError("cannot find the sharedllm-node program to run as a service")
    return Path(found).absolute()


def cmd_service_install(args: argparse.Namespace) -> int:
    config = load_node_config(args)
    try:
        arguments = unit_arguments(args.up_args)
        user = os.environ.get("SUDO_USER") or os.environ.get("USER") if args.system else None
        spec = ServiceSpec(_program(), arguments, config.data_dir.absolute(), user)
        said = install(spec, ServiceHome.here(args.system))
    except (ServiceError, ValueError) as err:
        raise CommandError(f"cannot install the service: {err}") from None
    print("\n".join(said))
    return 0


def cmd_service_status(args: argparse.Namespace) -> int:
    try:
        print("\n".join(status(ServiceHome.here(args.system))))
    except ServiceError as err:
        raise CommandError(str(err)) from None
    return 0


def cmd_service_uninstall(args: argparse.Namespace) -> int:
    try:
        print("\n".join(uninstall(ServiceHome.here(args.system))))
    except ServiceError as err:
        raise CommandError(f"cannot remove the service: {err}") from None
    return 0
