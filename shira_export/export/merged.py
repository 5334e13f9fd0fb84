"""Merged export: fold one SHiRA adapter into the base weights (W + S) and ship a plain
model, as an HF safetensors folder or as ONNX (torch.onnx or optimum-onnx), checked for parity
against the PyTorch model with the adapter merged.

The folder is built in a temporary sibling and renamed into place at the end, so bad
input never leaves a partial output. A parity failure still publishes the folder (with
its `parity.json`, for inspection) and then raises `ParityFailure`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TYPE_CHECKING, Optional, Union

from tqdm import tqdm

from shira_export._io import atomic_dir, check_output_location, describe_path
from shira_export.errors import ParityFailure, ShiraInputError, check_opset
from shira_export.export.exporters import Exporter, choose_exporter, export_onnx
from shira_export.export.tasks import (
    Dtype,
    Task,
    convert_onnx_to_fp16,
    copy_tokenizer_files,
    load_base_config,
    load_base_model,
    resolve_task,
)

if TYPE_CHECKING:
    from torch import nn

    from shira_export.tuner.checkpoint import AdapterCheckpoint
    from shira_export.verify import VerifyReport

__all__ = ["Format", "MergedExport", "export_merged", "MANIFEST_NAME", "PARITY_NAME", "resolve_adapter_dir"]

PathLike = Union[str, os.PathLike]
MANIFEST_NAME = "shira_export.json"
PARITY_NAME = "parity.json"
_ADAPTER_CONFIG = "adapter_config.json"
# Heads a classification adapter replaces (modules_to_save); their weight's rows = labels.
_HEAD_NAMES = ("classifier", "score", "out_proj")


class Format(str, Enum):
    ONNX = "onnx"
    SAFETENSORS = "safetensors"


@dataclass(frozen=True)
class MergedExport:
    """What `export_merged` wrote."""

    output_dir: Path
    format: Format
    task: Task
    dtype: Dtype
    exporter: Optional[Exporter]  # the ONNX exporter that ran (None for safetensors)
    files: tuple[Path, ...]  # every file in the folder, relative to output_dir
    manifest_path: Path
    parity_path: Optional[Path] = None  # None when verify=False
    report: Optional["VerifyReport"] = None  # None when verify=False


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
    matching profile. `exporter` ("auto", "torch", "optimum") picks the ONNX exporter; the
    manifest records the one that ran.

    Raises ShiraInputError for bad input (nothing is written) and ParityFailure when the
    export does not match (the folder and its parity.json are kept for inspection)."""
    fmt = _enum(Format, format, "format")
    precision = _enum(Dtype, dtype, "dtype")
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    folder, name = resolve_adapter_dir(adapter_dir, adapter_name)
    _check_output(output_dir, overwrite=overwrite, inputs=(model_dir, folder))
    if quantize is not None:
        from shira_export.export.quantize import check_quantize_options

        if fmt is not Format.ONNX or precision is not Dtype.FP32:
            raise ShiraInputError(f"quantize={quantize!r} needs format='onnx' and dtype='fp32', "
                                  f"found format={fmt.value!r}, dtype={precision.value!r}")
        quantize = check_quantize_options(quantize, block_size)[0].value
    check_opset(opset, 14)

    from shira_export.tuner.checkpoint import read_adapter_dir

    config = load_base_config(model_dir)
    ckpt = read_adapter_dir(folder, name=name)
    resolved = resolve_task(config, task, adapter_task_type=ckpt.config.task_type)
    chosen = choose_exporter(exporter, config, resolved.value) if fmt is Format.ONNX else None
    if chosen is Exporter.GENAI:
        return _merged_via_genai(model_dir, folder, output_dir, name=name, precision=quantize or precision.value,
                                 overwrite=overwrite, verify=verify)

    steps = tqdm(total=4 if verify else 3, desc="merged export", unit="step", file=sys.stderr, leave=False)
    try:
        steps.set_postfix_str("load + merge")
        model = _merged_model(model_dir, folder, ckpt, resolved)
        steps.update()
        with atomic_dir(output_dir, overwrite=overwrite, inputs=(model_dir, folder)) as tmp:
            steps.set_postfix_str(f"write {fmt.value}")
            _write_model(model, tmp, fmt=fmt, task=resolved, dtype=precision, opset=opset, exporter=chosen)
            copy_tokenizer_files(model_dir, tmp)
            del model  # the verifier builds its own reference; free the weights first
            manifest = _manifest(fmt, resolved, precision, model_dir, folder, name, chosen)
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
            if quantize is not None:
                from shira_export.export.quantize import quantize_onnx_model

                steps.set_postfix_str(f"quantize {quantize}")
                quantize_onnx_model(tmp, tmp, mode=quantize, block_size=block_size)  # in place, updates the manifest
            if fmt is Format.ONNX and resolved is Task.TEXT_GENERATION_WITH_PAST:
                from shira_export.export.genai_config import write_genai_config

                write_genai_config(tmp)  # the folder also runs in onnxruntime-genai as it is
            steps.update()
            report = None
            if verify:
                steps.set_postfix_str("verify")
                report = _verify(model_dir, folder, tmp, quantize or precision.value)
                report.write_json(tmp / PARITY_NAME)
                steps.update()
            files = tuple(sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file()))
        steps.update()
    finally:
        steps.close()

    result = MergedExport(
        output_dir=output_dir,
        format=fmt,
        task=resolved,
        dtype=precision,
        exporter=chosen,
        files=files,
        manifest_path=output_dir / MANIFEST_NAME,
        parity_path=output_dir / PARITY_NAME if verify else None,
        report=report,
    )
    if report is not None and not report.passed:
        raise ParityFailure(f"{output_dir}: {_failure_summary(report)} (details: {output_dir / PARITY_NAME})", report)
    return result


def resolve_adapter_dir(adapter_dir: PathLike, adapter_name: Optional[str] = None) -> tuple[Path, str]:
    """(folder holding adapter_config.json, adapter name). PEFT saves the adapter "default"
    at the top of a folder and any other name NAME in the subfolder NAME/."""
    root = Path(adapter_dir)
    if not root.is_dir():
        raise ShiraInputError(f"{root}: adapter folder {describe_path(root, want='folder')} (expected a folder with "
                              f"{_ADAPTER_CONFIG})")
    if adapter_name and (root / adapter_name / _ADAPTER_CONFIG).is_file():
        return root / adapter_name, adapter_name
    if adapter_name not in (None, "default"):  # PEFT keeps only "default" at the top
        found = (["default"] if (root / _ADAPTER_CONFIG).is_file() else []) + sorted(
            p.parent.name for p in root.glob(f"*/{_ADAPTER_CONFIG}"))
        raise ShiraInputError(f"{root}: no adapter named {adapter_name!r} (expected {adapter_name}/{_ADAPTER_CONFIG}); "
                              f"available: {found} (\"default\" is the one at the top)")
    if (root / _ADAPTER_CONFIG).is_file():
        return root, adapter_name or "default"
    found = sorted(p.parent.name for p in root.glob(f"*/{_ADAPTER_CONFIG}"))
    wanted = f"{_ADAPTER_CONFIG} or {adapter_name}/{_ADAPTER_CONFIG}" if adapter_name else _ADAPTER_CONFIG
    hint = f"; adapters in subfolders: {found} (pick one with adapter_name / --adapter-name)" if found else ""
    raise ShiraInputError(f"{root}: no {wanted}{hint}")


def _enum(cls: type[Enum], value: object, what: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise ShiraInputError(f"{what}: expected one of {[m.value for m in cls]}, found {value!r}") from None


def _check_output(output_dir: Path, *, overwrite: bool, inputs: tuple[Path, ...]) -> None:
    check_output_location(output_dir, inputs, overwrite=overwrite)  # replacing it must not delete an input


def _num_labels(ckpt: "AdapterCheckpoint") -> Optional[int]:
    """Label count of a classification head saved with the adapter (a fresh head may
    differ from the base config's num_labels)."""
    for path, state in ckpt.modules_to_save.items():
        if path.rpartition(".")[2] in _HEAD_NAMES and "weight" in state and state["weight"].dim() == 2:
            return int(state["weight"].shape[0])
    return None


def _merged_model(model_dir: Path, folder: Path, ckpt: "AdapterCheckpoint", task: Task) -> "nn.Module":
    """Base model for `task` with the adapter merged into its weights (fp32)."""
    from shira_export.tuner import ShiraModel

    kwargs = {}
    num_labels = _num_labels(ckpt) if task is Task.TEXT_CLASSIFICATION else None
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    model = load_base_model(model_dir, task, **kwargs)
    ckpt.validate_against(model)  # names the first mismatching modules/shapes before any change
    return ShiraModel.from_pretrained(model, folder, adapter_name=ckpt.name).merge_and_unload().eval()


def _write_model(model: Any, out: Path, *, fmt: Format, task: Task, dtype: Dtype, opset: Optional[int],
                 exporter: Optional[Exporter]) -> None:
    # The merge ran in fp32; casting after it rounds W + S once, not W and S apart.
    if task.is_causal_lm:
        model.config.use_cache = task is Task.TEXT_GENERATION_WITH_PAST
    if fmt is Format.SAFETENSORS:
        model.to(dtype.torch_dtype).save_pretrained(out, safe_serialization=True)
        return
    if exporter is None:
        raise ValueError("an ONNX export needs a concrete exporter (choose_exporter)")
    path = export_onnx(model, out, task=task.value, exporter=exporter, opset=opset)
    if dtype is Dtype.FP16:
        convert_onnx_to_fp16(path)


def _manifest(fmt: Format, task: Task, dtype: Dtype, model_dir: Path, folder: Path, name: str,
              exporter: Optional[Exporter]) -> dict:
    from shira_export import __version__

    return {
        "schema": 1,
        "kind": "merged",
        "format": fmt.value,
        "task": task.value,
        "dtype": dtype.value,
        "exporter": exporter.value if exporter is not None else None,
        "package_version": __version__,
        "base_model": str(model_dir.resolve()),
        "adapter": {"name": name, "source": str(folder.resolve())},
    }


def _merged_via_genai(model_dir: Path, folder: Path, output_dir: Path, *, name: str, precision: str, overwrite: bool,
                      verify: bool) -> MergedExport:
    """onnxruntime-genai's model builder over the merged model (it loads folders itself)."""
    from shira_export.export.genai_builder import export_merged_genai

    export_merged_genai(model_dir, folder, output_dir, adapter_name=name, precision=precision, overwrite=overwrite)
    report = None
    if verify:
        report = _verify(model_dir, folder, output_dir, precision)
        report.write_json(output_dir / PARITY_NAME)
    files = tuple(sorted(p.relative_to(output_dir) for p in output_dir.rglob("*") if p.is_file()))
    result = MergedExport(output_dir=output_dir, format=Format.ONNX, task=Task.TEXT_GENERATION_WITH_PAST,
                          dtype=Dtype.FP32, exporter=Exporter.GENAI, files=files,
                          manifest_path=output_dir / MANIFEST_NAME,
                          parity_path=output_dir / PARITY_NAME if verify else None, report=report)
    if report is not None and not report.passed:
        raise ParityFailure(f"{output_dir}: {_failure_summary(report)} (details: {output_dir / PARITY_NAME})", report)
    return result


def _verify(model_dir: Path, folder: Path, candidate: Path, profile: str) -> "VerifyReport":
    from shira_export.verify import verify

    # 32 greedy tokens: long enough for a frozen-shape bug in the KV cache to show.
    return verify(model=model_dir, adapters=[folder], candidate=candidate, profile=profile,
                  overrides={"greedy_tokens": 32})


def _failure_summary(report: "VerifyReport") -> str:
    failures = report.failures
    if not failures:
        return "parity check failed"
    parts = [f.summary for f in failures[:3]]
    more = f" (+{len(failures) - 3} more)" if len(failures) > 3 else ""
    return "parity check failed: " + "; ".join(parts) + more
