"""The pipeline: export -> quantize -> verify, composed. What the CLI and the public API
(`shira_export.export_merged`, `shira_export.export_sparse`) call.

Each stage hands the next a folder described by its manifest (`shira_export.artifacts`):
the export stage writes it into an unpublished temporary folder, quantize rewrites it in
place, every causal-LM folder gets its `genai_config.json`, verify reads it back through
the contract and writes `parity.json`. The folder is published (renamed into place) only
when all of that is done, so bad input or an interrupted run leaves nothing behind; a
parity failure still publishes it, for inspection, and then raises `ParityFailure`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import shira_export.verify as verify_stage  # looked up per call: tests stand in for verify
from shira_export._io import atomic_dir
from shira_export.artifacts.naming import DEFAULT_TOKEN_THRESHOLD
from shira_export.errors import ParityFailure
from shira_export.export import genai_builder
from shira_export.export import merged as merged_stage
from shira_export.export import sparse as sparse_stage
from shira_export.export.exporters import Exporter
from shira_export.export.merged import PARITY_NAME, Format, MergedExport
from shira_export.export.sparse import SparseExportResult
from shira_export.export.tasks import Dtype, Task

if TYPE_CHECKING:
    from shira_export.export.quantize import QuantizeReport
    from shira_export.verify import VerifyReport

__all__ = ["export_merged", "export_sparse", "PARITY_NAME"]

PathLike = Union[str, os.PathLike]


def export_merged(
    model_dir: PathLike,
    adapter_dir: PathLike,
    output_dir: PathLike,
    *,
    adapter_name: Optional[str] = None,
    format: Union[str, Format] = Format.ONNX,
    task: Union[str, Task] = Task.AUTO,
    opset: Optional[int] = None,
    dtype: Union[str, Dtype] = Dtype.FP32,
    overwrite: bool = False,
    verify: bool = True,
    quantize: Optional[str] = None,
    block_size: int = 32,
    exporter: Union[str, Exporter] = Exporter.AUTO,
) -> MergedExport:
    """Merge the adapter at `adapter_dir` into the base model at `model_dir` and write
    `output_dir` (`format` "onnx" or "safetensors"), then check it against PyTorch.

    `quantize` ("int8" or "int4", ONNX only) quantizes the merged weights with ONNX
    Runtime's quantizers (int4: MatMulNBits with `block_size`) and verifies with the
    matching profile. `exporter` ("auto", "torch", "optimum", "genai") picks the ONNX
    exporter; the manifest records the one that ran.

    Raises ShiraInputError for bad input (nothing is written) and ParityFailure when the
    export does not match (the folder and its parity.json are kept for inspection)."""
    from tqdm import tqdm

    plan = merged_stage.plan_merged(
        model_dir,
        adapter_dir,
        output_dir,
        adapter_name=adapter_name,
        format=format,
        task=task,
        opset=opset,
        dtype=dtype,
        overwrite=overwrite,
        quantize=quantize,
        block_size=block_size,
        exporter=exporter,
    )
    out = plan.output_dir
    report = None
    if plan.exporter is Exporter.GENAI:  # the builder loads the folders itself, and quantizes itself
        with atomic_dir(out, overwrite=overwrite, inputs=plan.inputs) as tmp:
            genai_builder.write_merged_genai(
                plan.model_dir, plan.adapter_dir, tmp, adapter_name=plan.adapter_name, precision=plan.precision
            )
            if verify:
                report = _verify(plan.model_dir, tmp, adapters=[plan.adapter_dir], profile=plan.precision)
                report.write_json(tmp / PARITY_NAME)
            files = _files(tmp)
        return _checked(
            MergedExport(
                out,
                Format.ONNX,
                Task.TEXT_GENERATION_WITH_PAST,
                Dtype.FP32,
                Exporter.GENAI,
                files,
                out / merged_stage.MANIFEST_NAME,
                _parity(out, verify),
                report,
            )
        )

    steps = tqdm(total=4 if verify else 3, desc="merged export", unit="step", file=sys.stderr, leave=False)
    try:
        steps.set_postfix_str("load + merge")
        model, fingerprint = merged_stage.merged_model(plan)
        steps.update()
        with atomic_dir(out, overwrite=overwrite, inputs=plan.inputs) as tmp:
            steps.set_postfix_str(f"write {plan.format.value}")
            merged_stage.write_merged(plan, model, fingerprint, tmp)
            del model  # the verifier builds its own reference; free the weights first
            if plan.quantize is not None:
                steps.set_postfix_str(f"quantize {plan.quantize}")
                _quantize(tmp, plan.quantize, plan.block_size)
            if plan.format is Format.ONNX:
                _genai_config(tmp, plan.task)
            steps.update()
            if verify:
                steps.set_postfix_str("verify")
                report = _verify(plan.model_dir, tmp, adapters=[plan.adapter_dir], profile=plan.precision)
                report.write_json(tmp / PARITY_NAME)
                steps.update()
            files = _files(tmp)
        steps.update()
    finally:
        steps.close()
    return _checked(
        MergedExport(
            out,
            plan.format,
            plan.task,
            plan.dtype,
            plan.exporter,
            files,
            out / merged_stage.MANIFEST_NAME,
            _parity(out, verify),
            report,
        )
    )


def export_sparse(
    model_dir: PathLike,
    adapter_dirs: Union[Sequence[PathLike], Mapping[str, PathLike]],
    output_dir: PathLike,
    *,
    task: str = "auto",
    opset: Optional[int] = None,
    overwrite: bool = False,
    verify: bool = True,
    token_threshold: int = DEFAULT_TOKEN_THRESHOLD,
    quantize: Optional[str] = None,
    block_size: int = 32,
    exporter: str = "auto",
) -> SparseExportResult:
    """Export `model_dir` once with a sparse-delta site at every layer any adapter targets,
    and write one `.onnx_adapter` per adapter. `adapter_dirs` is a list of folders (named
    after the folder) or a {name: folder} mapping. `quantize` ("int8" | "int4") quantizes the
    constant base weights only; the sparse deltas and adapter files stay fp32. With `verify`,
    each adapter (and the base) is checked against PyTorch with the matching profile, before
    the folder is published, and a failure raises ParityFailure after it is. `exporter`
    ("auto", "torch", "optimum", "genai") picks the ONNX exporter; the manifest records it."""
    from tqdm.auto import tqdm

    plan = sparse_stage.plan_sparse(
        model_dir,
        adapter_dirs,
        output_dir,
        task=task,
        opset=opset,
        overwrite=overwrite,
        token_threshold=token_threshold,
        quantize=quantize,
        block_size=block_size,
        exporter=exporter,
    )
    out = plan.output_dir
    report, quantized = None, None
    if plan.exporter is Exporter.GENAI:  # genai's builder loads the folder itself and builds the base its own way
        with atomic_dir(out, overwrite=overwrite, inputs=plan.inputs) as tmp:
            manifest = genai_builder.write_sparse_genai(
                plan.model_dir,
                plan.adapters,
                tmp,
                precision=plan.quantize or "fp32",
                token_threshold=plan.token_threshold,
            )
            if verify:
                report = verify_stage.verify(
                    model=plan.model_dir, candidate=tmp, profile=plan.quantize or "fp32", report_dir=tmp
                )
    else:
        model = sparse_stage.load_sparse_base(plan)
        steps = tqdm(total=3 + len(plan.checkpoints), desc="sparse export", unit="step", disable=None)
        with atomic_dir(out, overwrite=overwrite, inputs=plan.inputs) as tmp:
            manifest = sparse_stage.write_sparse(plan, model, tmp, progress=steps)
            del model
            if plan.quantize is not None:
                # in place: the base weights are quantized, the delta branches re-attached in fp32
                quantized = _quantize(tmp, plan.quantize, plan.block_size).to_json()
            _genai_config(tmp, plan.task)  # the folder also runs in onnxruntime-genai, adapters included
            if verify:  # before the folder is published: a run killed here publishes nothing
                report = _verify(plan.model_dir, tmp, profile=plan.quantize or "fp32", report_dir=tmp)
        steps.update()
        steps.close()
    result = sparse_stage.sparse_result(out, manifest, plan.modules, quantized)
    if report is not None:
        result.report, result.parity_path = report, out / PARITY_NAME
        if not report.passed:
            failures = "; ".join(f.summary for f in report.failures[:3])
            raise ParityFailure(
                f"{out}: sparse export does not match PyTorch: {failures} (details: {result.parity_path})",
                report=report,
            )
    return result


def _quantize(folder: Path, mode: str, block_size: int) -> "QuantizeReport":
    from shira_export.export.quantize import quantize_onnx_model

    return quantize_onnx_model(folder, folder, mode=mode, block_size=block_size)  # in place, updates the manifest


def _genai_config(folder: Path, task: Task) -> None:
    """Every causal-LM folder with a KV cache is also an onnxruntime-genai folder."""
    if task is Task.TEXT_GENERATION_WITH_PAST:
        from shira_export.export.genai_config import write_genai_config

        write_genai_config(folder)


def _verify(
    model_dir: Path, candidate: Path, *, profile: str, adapters: Sequence[Path] = (), report_dir: Optional[Path] = None
) -> "VerifyReport":
    # the check a standalone `verify` of the folder repeats (32 greedy tokens: long enough
    # for a frozen-shape bug in the KV cache to show)
    profile, overrides = verify_stage.export_check_settings(
        profile if profile in ("int8", "int4") else None, dtype=profile
    )
    return verify_stage.verify(
        model=model_dir,
        adapters=list(adapters),
        candidate=candidate,
        profile=profile,
        overrides=overrides,
        report_dir=report_dir,
    )


def _files(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file()))


def _parity(out: Path, verify: bool) -> Optional[Path]:
    return out / PARITY_NAME if verify else None


def _checked(result: MergedExport) -> MergedExport:
    report = result.report
    if report is not None and not report.passed:
        failures = report.failures
        parts = [f.summary for f in failures[:3]]
        more = f" (+{len(failures) - 3} more)" if len(failures) > 3 else ""
        summary = "parity check failed: " + "; ".join(parts) + more if parts else "parity check failed"
        raise ParityFailure(f"{result.output_dir}: {summary} (details: {result.output_dir / PARITY_NAME})", report)
    return result
