"""`sharedllm-node model ...` and `plan`: model files, synthetic models, and placement previews."""

from __future__ import annotations

import argparse
import json
import sys

from ...scheduler.cluster_file import ClusterFileError
from ..models.model_file import file_sha256, inspect_model
from ..tools.synthetic_model import SHAPES, write_synthetic_model
from .render import print_model


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan_preview import load_cluster, preview, render

    if args.context is not None and args.context < 1:
        raise ClusterFileError("--context must be positive")
    info = inspect_model(args.model)
    spec = load_cluster(args.cluster, args.model.name.removesuffix(".gguf"))
    result = preview(info, spec, args.context)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


def cmd_model_inspect(args: argparse.Namespace) -> int:
    info = inspect_model(args.file)
    digest = None if args.no_hash else file_sha256(args.file)
    if args.json:
        print(json.dumps({**info.as_dict(), "sha256": digest}, indent=2))
    else:
        print_model(info, digest)
    return 0


def cmd_model_synthetic(args: argparse.Namespace) -> int:
    if args.file.exists():
        print(f"error: {args.file} exists; choose another name", file=sys.stderr)
        return 2
    write_synthetic_model(args.file, SHAPES[args.shape], seed=args.seed, dtype=args.type)
    size = args.file.stat().st_size
    print(f"{args.file}: {args.shape} shape, {args.type} weights, {size / 1024**3:.2f} GiB")
    return 0
