"""`shira-export merged`: fold an adapter into the base weights, export, verify."""

from __future__ import annotations

import argparse

from shira_export._cli import add_output_options
from shira_export.artifacts.tasks import task_choices
from shira_export.export.exporters import Exporter  # imports no torch: --help stays fast

FORMATS = ("onnx", "safetensors")
TASKS = task_choices()
DTYPES = ("fp32", "fp16")
EXPORTERS = tuple(e.value for e in Exporter)
EXPORTER_HELP = (
    "ONNX exporter: torch (torch.onnx dynamo, any transformers), optimum (optimum-onnx, "
    "transformers 4.x), genai (onnxruntime-genai's model builder: Llama, Mistral, Qwen, Phi-3, "
    "Gemma; causal LMs), auto (optimum when installed and it supports the model, else torch)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merged",
        help="merge an adapter into the base model and export it (ONNX or safetensors), verified",
        description="Fold a SHiRA adapter into the base weights (W + S) and write a plain model folder: "
        "ONNX (torch.onnx or optimum-onnx), or a Hugging Face safetensors folder. Unless --no-verify, the result is "
        "checked against PyTorch and the figures are written to OUT_DIR/parity.json "
        "(exit 1 on a parity failure, 2 on bad input).",
    )
    p.add_argument("--model", required=True, metavar="BASE_DIR", help="local Hugging Face model folder")
    p.add_argument("--adapter", required=True, metavar="ADAPTER_DIR", help="SHiRA adapter folder (PEFT layout)")
    p.add_argument("--adapter-name", metavar="NAME", help="adapter saved in ADAPTER_DIR/NAME/ (default: the top one)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True, metavar="OUT_DIR", help="folder to create")
    p.add_argument("--task", default="auto", choices=TASKS)
    p.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default: 18, or optimum's for the model)")
    p.add_argument("--exporter", default="auto", choices=EXPORTERS, help=EXPORTER_HELP)
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    add_output_options(
        p, quantize_help="quantize the weights with ONNX Runtime (int8: dynamic; int4: MatMulNBits); ONNX only"
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from shira_export.pipeline import export_merged

    result = export_merged(
        args.model,
        args.adapter,
        args.output,
        adapter_name=args.adapter_name,
        format=args.format,
        task=args.task,
        opset=args.opset,
        dtype=args.dtype,
        overwrite=args.overwrite,
        verify=args.verify,
        quantize=args.quantize,
        block_size=args.block_size,
        exporter=args.exporter,
    )
    size = sum((result.output_dir / f).stat().st_size for f in result.files)
    exporter = f", exporter {result.exporter.value}" if result.exporter is not None else ""
    print(
        f"wrote {result.output_dir} ({result.format.value}, {result.task.value}, {result.dtype.value}{exporter}, "
        f"{len(result.files)} files, {size / 1e6:.1f} MB)"
    )
    for f in result.files:
        print(f"  {f}")
    if result.report is not None:
        print(f"{result.report.summary_line()} -> {result.parity_path}")
        for record in result.report.records:
            if record.metric in ("max_abs", "greedy_prefix"):
                print(f"  {record.summary}")
    else:
        print("parity: not checked (--no-verify)")
    return 0
