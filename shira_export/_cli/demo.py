"""`shira-export demo`: the whole pipeline on an embedded default."""

from __future__ import annotations

import argparse
import tempfile


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train two adapters on built-in data, export once, switch per call in onnxruntime, check parity",
        description=(
            "Runs the pipeline on an embedded default (no downloads): trains two SHiRA adapters on a small "
            "OPT-shaped model, exports the base graph once with a sparse-delta add, switches between the "
            "adapters per call in onnxruntime and checks each against PyTorch."
        ),
    )
    parser.add_argument("--output", default=None, help="folder for the artifacts (default: a new temp folder)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per adapter (default: 60)")
    parser.add_argument("--r", type=int, default=8, help="SHiRA budget r (default: 8)")
    parser.add_argument("--overwrite", action="store_true", help="reuse a non-empty output folder")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from shira_export.demo import run_demo
    from shira_export.errors import ShiraInputError

    for option, value in (("--steps", args.steps), ("--r", args.r)):
        if value < 1:  # before a temp folder is made for it
            raise ShiraInputError(f"{option}: expected an integer >= 1, found {value}")
    output = args.output or tempfile.mkdtemp(prefix="shira-demo-")
    result = run_demo(output, steps=args.steps, r=args.r, overwrite=args.overwrite)
    return 0 if result.passed else 1
