"""The `shira-export` command: a thin layer over the Python API.

Each subcommand lives in `shira_export._cli.<name>` with `register(subparsers)` (which
adds its parser and sets `func`) and keeps heavy imports (torch, onnx, transformers)
inside its handler, so `--help` and `--version` answer without them.

Exit codes (the contract CI scripts read):
    0   success
    1   parity failure (the artifact does not match PyTorch; see its parity.json)
    2   usage or input error: a ShiraInputError, or the OS refusing a path the user named
        (not found, exists, read-only, no space, permission, name too long); one line
    3   internal error, i.e. a bug: printed with its traceback
    130 interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from typing import Optional, Sequence

from shira_export.errors import ParityFailure, ShiraInputError, is_input_os_error

SUBCOMMANDS = ("demo", "merged", "sparse", "adapter", "run", "verify")
EXIT_OK, EXIT_PARITY, EXIT_INPUT, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def build_parser() -> argparse.ArgumentParser:
    from shira_export import __version__

    parser = argparse.ArgumentParser(
        prog="shira-export",
        description="Train, export, quantize, switch and verify SHiRA adapters for ONNX Runtime.",
        epilog="exit codes: 0 success, 1 parity failure, 2 usage or input error, 3 internal error (a bug)",
    )
    parser.add_argument("--version", action="version", version=f"shira-export {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"shira_export._cli.{name}").register(subparsers)
    return parser


def _os_message(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    what = exc.strerror or str(exc)
    return f"{where}: {what}" if where else what


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_INPUT
        return int(args.func(args) or 0)
    except ParityFailure as exc:
        print(f"shira-export: parity check failed: {exc}", file=sys.stderr)
        return EXIT_PARITY
    except ShiraInputError as exc:
        print(f"shira-export: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as exc:
        if not is_input_os_error(exc):
            return _report_bug(exc)
        print(f"shira-export: error: {_os_message(exc)}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("shira-export: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug, not a verdict: never exit 1 (parity failure) or 2 (input) for it
        return _report_bug(exc)


def _report_bug(exc: BaseException) -> int:
    traceback.print_exception(type(exc), exc, exc.__traceback__)
    print("shira-export: internal error (please report it with the traceback above)", file=sys.stderr)
    return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
