"""Merged export, the export stage: fold one SHiRA adapter into the base weights (W + S)
and write a plain model, as an HF safetensors folder or as ONNX (torch.onnx, optimum-onnx or
genai's builder), with its manifest.

`plan_merged` checks every input before anything is written; `merged_model` loads the base
and merges; `write_merged` writes the folder it is given (an unpublished temporary one:
`shira_export.pipeline.export_merged` publishes it after quantizing and verifying).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TYPE_CHECKING, Optional, Union

from shira_export._io import check_output_location, describe_path
from shira_export.artifacts.manifest import MANIFEST_NAME, MergedManifest, weights_fingerprint
from shira_export.artifacts.tasks import is_label_head
from shira_export.errors import ShiraInputError, check_opset
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

__all__ = [
    "Format",
    "MergedExport",
    "MergedPlan",
    "plan_merged",
    "merged_model",
    "write_merged",
    "MANIFEST_NAME",
    "PARITY_NAME",
    "resolve_adapter_dir",
]

PathLike = Union[str, os.PathLike]
PARITY_NAME = "parity.json"
_ADAPTER_CONFIG = "adapter_config.json"


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


@dataclass(frozen=True)
class MergedPlan:
    """A merged export's inputs, checked and resolved (nothing written yet)."""

    model_dir: Path
    adapter_dir: Path  # the folder holding adapter_config.json
    adapter_name: str
    output_dir: Path
    format: Format
    task: Task
    dtype: Dtype
    exporter: Optional[Exporter]  # concrete (None for safetensors)
    opset: Optional[int]
    quantize: Optional[str]  # "int8" | "int4"
    block_size: int
    checkpoint: "AdapterCheckpoint"

    @property
    def precision(self) -> str:
        """What the folder's weights are: the quantization, else the dtype."""
        return self.quantize or self.dtype.value

    @property
    def inputs(self) -> tuple[Path, Path]:
        return self.model_dir, self.adapter_dir


def plan_merged(
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
    quantize: Optional[str] = None,
    block_size: int = 32,
    exporter: Union[str, Exporter] = Exporter.AUTO,
) -> MergedPlan:
    """Check every input of a merged export (ShiraInputError naming it) and resolve the task
    and the exporter; reads the adapter, writes nothing."""
    fmt = _enum(Format, format, "format")
    precision = _enum(Dtype, dtype, "dtype")
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    folder, name = resolve_adapter_dir(adapter_dir, adapter_name)
    check_output_location(output_dir, (model_dir, folder), overwrite=overwrite)  # replacing it must not delete an input
    if quantize is not None:
        from shira_export.export.quantize import check_quantize_options

        if fmt is not Format.ONNX or precision is not Dtype.FP32:
            raise ShiraInputError(
                f"quantize={quantize!r} needs format='onnx' and dtype='fp32', "
                f"found format={fmt.value!r}, dtype={precision.value!r}"
            )
        quantize = check_quantize_options(quantize, block_size)[0].value
    check_opset(opset, 14)

    from shira_export.tuner.checkpoint import read_adapter_dir

    config = load_base_config(model_dir)
    ckpt = read_adapter_dir(folder, name=name)
    resolved = resolve_task(config, task, adapter_task_type=ckpt.config.task_type)
    chosen = choose_exporter(exporter, config, resolved.value) if fmt is Format.ONNX else None
    return MergedPlan(
        model_dir, folder, name, output_dir, fmt, resolved, precision, chosen, opset, quantize, block_size, ckpt
    )


def merged_model(plan: MergedPlan) -> tuple["nn.Module", str]:
    """(base model for the task with the adapter merged into its weights (fp32), the base's
    weights_fingerprint taken before the merge)."""
    from shira_export.tuner import ShiraModel

    kwargs = {}
    num_labels = _num_labels(plan.checkpoint) if plan.task is Task.TEXT_CLASSIFICATION else None
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    model = load_base_model(plan.model_dir, plan.task, **kwargs)
    plan.checkpoint.validate_against(model)  # names the first mismatching modules/shapes before any change
    fingerprint = weights_fingerprint(model)
    merged = ShiraModel.from_pretrained(model, plan.adapter_dir, adapter_name=plan.checkpoint.name)
    return merged.merge_and_unload().eval(), fingerprint


def write_merged(plan: MergedPlan, model: Any, fingerprint: str, folder: Path) -> MergedManifest:
    """Write the merged model, its tokenizer files and its manifest into `folder`."""
    _write_model(
        model, folder, fmt=plan.format, task=plan.task, dtype=plan.dtype, opset=plan.opset, exporter=plan.exporter
    )
    copy_tokenizer_files(plan.model_dir, folder)
    manifest = merged_manifest(folder, plan, fingerprint)
    manifest.write(atomic=False)
    return manifest


def merged_manifest(folder: Path, plan: MergedPlan, fingerprint: str, **extra: Any) -> MergedManifest:
    from shira_export import __version__

    return MergedManifest(
        folder,
        plan.task.value,
        plan.format.value,
        plan.dtype.value,
        plan.exporter.value if plan.exporter is not None else None,
        __version__,
        str(plan.model_dir.resolve()),
        fingerprint,
        {"name": plan.adapter_name, "source": str(plan.adapter_dir.resolve())},
        dict(extra),
    )


def resolve_adapter_dir(adapter_dir: PathLike, adapter_name: Optional[str] = None) -> tuple[Path, str]:
    """(folder holding adapter_config.json, adapter name). PEFT saves the adapter "default"
    at the top of a folder and any other name NAME in the subfolder NAME/."""
    root = Path(adapter_dir)
    if not root.is_dir():
        raise ShiraInputError(
            f"{root}: adapter folder {describe_path(root, want='folder')} (expected a folder with {_ADAPTER_CONFIG})"
        )
    if adapter_name and (root / adapter_name / _ADAPTER_CONFIG).is_file():
        return root / adapter_name, adapter_name
    if adapter_name not in (None, "default"):  # PEFT keeps only "default" at the top
        found = (["default"] if (root / _ADAPTER_CONFIG).is_file() else []) + sorted(
            p.parent.name for p in root.glob(f"*/{_ADAPTER_CONFIG}")
        )
        raise ShiraInputError(
            f"{root}: no adapter named {adapter_name!r} (expected {adapter_name}/{_ADAPTER_CONFIG}); "
            f'available: {found} ("default" is the one at the top)'
        )
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


def _num_labels(ckpt: "AdapterCheckpoint") -> Optional[int]:
    """Label count of a classification head saved with the adapter (a fresh head may
    differ from the base config's num_labels)."""
    for path, state in ckpt.modules_to_save.items():
        if is_label_head(path) and "weight" in state and state["weight"].dim() == 2:
            return int(state["weight"].shape[0])
    return None


def _write_model(
    model: Any, out: Path, *, fmt: Format, task: Task, dtype: Dtype, opset: Optional[int], exporter: Optional[Exporter]
) -> None:
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
