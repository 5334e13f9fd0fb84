"""`shira-export adapter`: convert one more adapter for an existing sparse export."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "adapter",
        help="convert a newly trained adapter for an existing sparse export (no re-export)",
        description="Write OUT_DIR/adapters/<NAME>.onnx_adapter for a SHiRA adapter folder and add it to "
        "OUT_DIR/shira_export.json. The adapter may only target layers the graph has sites for.",
    )
    p.add_argument("--graph", required=True, metavar="OUT_DIR", help="folder written by `shira-export sparse`")
    p.add_argument("--adapter", required=True, metavar="DIR", help="SHiRA adapter folder (PEFT layout)")
    p.add_argument("--name", metavar="NAME", help="adapter name (default: the folder name)")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter of the same name")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from shira_export.export.sparse import add_adapter_file

    path = add_adapter_file(args.graph, args.adapter, name=args.name, overwrite=args.overwrite)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.1f} kB)")
    return 0
