"""The `shira-export` command: a thin layer over the Python API.

Each subcommand lives in `shira_export._cli.<name>` with `register(subparsers)` (which
adds its parser and sets `func`) and keeps heavy imports inside its handler.
Exit codes: 0 success, 1 parity failure, 2 usage or input error, 3 internal error.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import traceback
from typing import Optional, Sequence

from shira_export import __version__
from shira_export.errors import ParityFailure, ShiraInputError

SUBCOMMANDS = ("demo", "merged", "sparse", "adapter", "run", "verify")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shira-export",
        description="Train, export, quantize, switch and verify SHiRA adapters for ONNX Runtime.",
    )
    parser.add_argument("--version", action="version", version=f"shira-export {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module_name = f"shira_export._cli.{name}"
        if importlib.util.find_spec(module_name) is not None:
            importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ParityFailure as exc:
        print(f"shira-export: parity check failed: {exc}", file=sys.stderr)
        return 1
    except (ShiraInputError, FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, TypeError) as exc:
        print(f"shira-export: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:  # a bug, not a verdict: never exit 1 (parity failure) for it
        traceback.print_exc()
        print("shira-export: internal error (please report it with the traceback above)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
