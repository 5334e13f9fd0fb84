"""`shira-export sparse`: export the base model once with sparse-delta sites, one
.onnx_adapter per adapter, adapters switchable per call in onnxruntime."""

from __future__ import annotations

import argparse

from shira_export._cli import add_output_options
from shira_export._cli.merged import EXPORTER_HELP, EXPORTERS
from shira_export.artifacts.tasks import task_choices

TASKS = task_choices(sparse=True)


def parse_named(values: list[str]) -> dict[str, str]:
    """`DIR` (named after the folder) or `NAME=DIR`, in order."""
    from pathlib import Path

    from shira_export.errors import ShiraInputError

    named: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value.rstrip("/")).name, value
        if name in named:
            raise ShiraInputError(f"--adapter: name {name!r} given twice; use NAME=DIR to tell them apart")
        named[name] = path
    return named


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sparse",
        help="export the base model once + one small .onnx_adapter per adapter (switch per call)",
        description="Export BASE_DIR to ONNX (torch.onnx or optimum-onnx), add a sparse-delta branch at every layer any adapter "
        "targets, and write OUT_DIR/adapters/<name>.onnx_adapter per adapter (onnxruntime's adapter format). "
        "Unless --no-verify, each adapter is checked against PyTorch (OUT_DIR/parity.json; exit 1 on failure).",
    )
    p.add_argument("--model", required=True, metavar="BASE_DIR", help="local Hugging Face model folder")
    p.add_argument(
        "--adapter",
        required=True,
        action="append",
        metavar="[NAME=]DIR",
        help="SHiRA adapter folder (PEFT layout); repeat for more; NAME defaults to the folder name",
    )
    p.add_argument("--output", required=True, metavar="OUT_DIR", help="folder to create")
    p.add_argument("--task", default="auto", choices=TASKS)
    p.add_argument("--opset", type=int, metavar="N", help="ONNX opset, >= 16 (default 18)")
    p.add_argument("--exporter", default="auto", choices=EXPORTERS, help=EXPORTER_HELP)
    add_output_options(
        p, quantize_help="quantize the constant base weights (int8: dynamic; int4: MatMulNBits); deltas stay fp32"
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from shira_export.pipeline import export_sparse

    result = export_sparse(
        args.model,
        parse_named(args.adapter),
        args.output,
        task=args.task,
        opset=args.opset,
        overwrite=args.overwrite,
        verify=args.verify,
        quantize=args.quantize,
        block_size=args.block_size,
        exporter=args.exporter,
    )
    print(f"wrote {result.output_dir}: {result.model_path.name} with {len(result.targets)} sparse-delta sites")
    for name, path in result.adapter_paths.items():
        print(f"  {name}: {path.relative_to(result.output_dir)} ({path.stat().st_size / 1e3:.1f} kB)")
    if result.quantization is not None:
        q = result.quantization
        print(f"quantized base weights: {q['mode']}, model size {q['size_ratio']:.2f}x of fp32")
    if result.report is not None:
        print(f"{result.report.summary_line()} -> {result.parity_path}")
    else:
        print("parity: not checked (--no-verify)")
    return 0
