"""Subcommands of `shira-export`, one module each (see shira_export/cli.py)."""

from __future__ import annotations

import argparse


def add_output_options(parser: argparse.ArgumentParser, *, quantize_help: str) -> None:
    """The options every export subcommand shares: quantization, overwrite, verify."""
    parser.add_argument("--quantize", choices=("int8", "int4"), help=quantize_help)
    parser.add_argument(
        "--block-size", type=int, default=32, metavar="N", help="int4 block size: 16, 32, 64, 128 or 256 (default: 32)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip the parity check")
