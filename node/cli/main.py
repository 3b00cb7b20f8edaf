"""`sharedllm-node`: the command line.

Every command turns our own errors into one line on stderr and a non-zero exit: users see what
to fix, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from ...mesh.identity import IdentityError
from ...mesh.mesh_store import (
    MeshStoreError,
)
from ...mesh.records import RecordError
from ...mesh.transport.seam import TransportError
from ...scheduler.cluster_file import ClusterFileError
from ...scheduler.placement import PlannerError
from ..config_checks import ConfigError
from ..engine.build import EngineBuildError
from ..engine.locate import EngineNotFoundError, EngineProbeError
from ..mesh_setup import MeshSetupError
from ..models.default_model import DefaultModelError
from ..models.model_file import ModelFileError
from .common import EXIT_ERROR, EXIT_USAGE, CommandError
from .logs import setup_logging
from .parser import command_parser

_log = logging.getLogger("sharedllm.cli")


def main(argv: Sequence[str] | None = None) -> None:
    parser = command_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        sys.exit(EXIT_USAGE)
    setup_logging(getattr(args, "log_level", None) or "info", getattr(args, "log_json", False))
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
