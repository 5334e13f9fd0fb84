"""Sparse-delta export, the export stage: the base model exported once, one `.onnx_adapter`
per adapter.

    OUT_DIR/model.onnx                    base graph + a sparse-delta branch per targeted layer
    OUT_DIR/adapters/<name>.onnx_adapter  onnxruntime AdapterFormat, 8 bytes per nonzero
    OUT_DIR/shira_export.json             manifest (targets, fingerprint, adapters)
    OUT_DIR/parity.json                   per adapter: ORT vs PyTorch with that adapter merged (pipeline)

`plan_sparse` checks every input, `load_sparse_base` loads and checks the base, `write_sparse`
writes the folder it is given (`shira_export.pipeline.export_sparse` publishes it after
quantizing and verifying). `add_adapter_file` converts one more adapter for a folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import numpy as np
import onnx

from shira_export._io import check_output_location
from shira_export.artifacts.manifest import (
    ADAPTER_DIR,
    MANIFEST_NAME,
    MODEL_NAME,
    SparseManifest,
    adapter_entry,
    read_sparse_manifest,
)
from shira_export.artifacts.onnx_io import save_onnx, tensor_bytes
from shira_export.errors import ShiraInputError, check_opset
from shira_export.export import graph_delta
from shira_export.export.adapter_file import (
    SUFFIX,
    adapter_arrays,
    check_adapter_name,
    install_adapter_file,
    write_adapter_file,
)
from shira_export.export.exporters import Exporter
from shira_export.export.tasks import Task

if TYPE_CHECKING:
    from shira_export.tuner.checkpoint import AdapterCheckpoint
    from shira_export.verify.report import VerifyReport

__all__ = [
    "SparseExportResult",
    "SparsePlan",
    "plan_sparse",
    "load_sparse_base",
    "write_sparse",
    "sparse_result",
    "add_adapter_file",
    "tensor_bytes",
]

PathLike = Union[str, os.PathLike]


@dataclass
class SparseExportResult:
    output_dir: Path
    model_path: Path
    manifest_path: Path
    adapter_paths: dict[str, Path]
    parity_path: Optional[Path] = None
    report: Optional["VerifyReport"] = None  # None when verify=False
    targets: list[str] = field(default_factory=list)
    quantization: Optional[dict] = None  # what quantize_onnx_model did, when asked

    @property
    def passed(self) -> bool:
        return self.report is None or self.report.passed


def sparse_result(
    output_dir: Path, manifest: SparseManifest, targets: list[str], quantization: Optional[dict] = None
) -> SparseExportResult:
    """The result of a sparse export published at `output_dir` (paths there, not in the temp folder)."""
    return SparseExportResult(
        output_dir,
        output_dir / MODEL_NAME,
        output_dir / MANIFEST_NAME,
        {n: output_dir / e["file"] for n, e in manifest.adapters.items()},
        targets=targets,
        quantization=quantization,
    )


@dataclass(frozen=True)
class SparsePlan:
    """A sparse export's inputs, checked and resolved (nothing written yet)."""

    model_dir: Path
    adapters: dict[str, Path]  # name -> adapter folder
    checkpoints: dict[str, "AdapterCheckpoint"]
    output_dir: Path
    task: Task
    exporter: Exporter  # concrete
    opset: Optional[int]
    token_threshold: int
    quantize: Optional[str]
    block_size: int

    @property
    def modules(self) -> list[str]:
        """Every module any adapter targets."""
        return sorted({m for c in self.checkpoints.values() for m in c.deltas})

    @property
    def inputs(self) -> list[Path]:
        return [self.model_dir, *self.adapters.values()]


def _named_dirs(adapter_dirs: Union[Sequence[PathLike], Mapping[str, PathLike]]) -> dict[str, Path]:
    if isinstance(adapter_dirs, (str, os.PathLike)):
        adapter_dirs = [adapter_dirs]
    items = adapter_dirs.items() if isinstance(adapter_dirs, Mapping) else ((Path(d).name, d) for d in adapter_dirs)
    named: dict[str, Path] = {}
    for name, path in items:
        check_adapter_name(name)
        if name in named:
            raise ShiraInputError(f"adapter name {name!r} given twice ({named[name]} and {path}); name them NAME=DIR")
        named[name] = Path(path)
    if not named:
        raise ShiraInputError("no adapters given (expected at least one adapter folder)")
    return named


def _read_checkpoint(path: Path, name: str) -> "AdapterCheckpoint":
    from shira_export.tuner.checkpoint import read_adapter_dir

    ckpt = read_adapter_dir(path, name=name)
    if ckpt.modules_to_save:
        raise ShiraInputError(
            f"{path}: adapter has modules_to_save {sorted(ckpt.modules_to_save)}, which a sparse export cannot "
            f"switch per call (they replace whole modules); use `shira-export merged` for this adapter"
        )
    return ckpt


def _module_weights(model: Any, modules: Sequence[str]) -> dict[str, np.ndarray]:
    """Each targeted module's weight in PyTorch's (out, in) layout (GPT-2 Conv1D stores (in, out))."""
    from shira_export.tuner.masks import base_weight_out_in

    named = dict(model.named_modules())
    return {path: np.ascontiguousarray(base_weight_out_in(named[path]).cpu().numpy()) for path in modules}


def plan_sparse(
    model_dir: PathLike,
    adapter_dirs: Union[Sequence[PathLike], Mapping[str, PathLike]],
    output_dir: PathLike,
    *,
    task: str = "auto",
    opset: Optional[int] = None,
    overwrite: bool = False,
    token_threshold: int = graph_delta.DEFAULT_TOKEN_THRESHOLD,
    quantize: Optional[str] = None,
    block_size: int = 32,
    exporter: str = "auto",
) -> SparsePlan:
    """Check every input of a sparse export (ShiraInputError naming it), read the adapters and
    resolve the task and the exporter; writes nothing."""
    from shira_export.export.exporters import choose_exporter
    from shira_export.export.tasks import load_base_config, resolve_task

    check_opset(opset, 16, why=" (the sparse delta needs ScatterND/ScatterElements with reduction='add')")
    if quantize is not None:
        from shira_export.export.quantize import check_quantize_options

        quantize = check_quantize_options(quantize, block_size)[0].value
    named = _named_dirs(adapter_dirs)
    check_output_location(output_dir, [model_dir, *named.values()], overwrite=overwrite)  # before any work
    checkpoints = {name: _read_checkpoint(path, name) for name, path in named.items()}
    config = load_base_config(model_dir)
    task_types = {c.config.task_type for c in checkpoints.values()} - {None}
    resolved = resolve_task(config, task, adapter_task_type=next(iter(task_types)) if len(task_types) == 1 else None)
    chosen = choose_exporter(exporter, config, resolved.value)
    return SparsePlan(
        Path(model_dir),
        named,
        checkpoints,
        Path(output_dir),
        resolved,
        chosen,
        opset,
        token_threshold,
        quantize,
        block_size,
    )


def load_sparse_base(plan: SparsePlan) -> Any:
    """The base model for the plan's task, every adapter checked against it."""
    from shira_export.export.tasks import load_base_model

    model = load_base_model(plan.model_dir, plan.task)
    for ckpt in plan.checkpoints.values():
        ckpt.validate_against(model)
    return model


def write_sparse(plan: SparsePlan, model: Any, folder: Path, *, progress: Optional[Any] = None) -> SparseManifest:
    """Export `model` into `folder` once, add a sparse-delta site per targeted module, write
    one .onnx_adapter per adapter and the manifest. `progress` (a tqdm) is advanced per step."""
    from shira_export import __version__
    from shira_export.export.exporters import DEFAULT_OPSET, export_onnx
    from shira_export.export.tasks import copy_tokenizer_files

    step = progress.update if progress is not None else (lambda: None)
    modules = plan.modules
    weights = _module_weights(model, modules)
    export_onnx(model, folder, task=plan.task.value, exporter=plan.exporter, opset=plan.opset or DEFAULT_OPSET)
    copy_tokenizer_files(plan.model_dir, folder)
    step()
    graph = onnx.load(str(folder / MODEL_NAME))
    sites, unused = graph_delta.locate_targets(graph, weights)
    if not sites:
        raise ShiraInputError(f"{plan.model_dir}: none of the targeted modules {modules} is in the exported graph")
    fingerprint = graph_delta.graph_fingerprint(sites)
    graph_delta.insert_sparse_deltas(graph, sites, threshold=plan.token_threshold)
    save_onnx(graph, folder / MODEL_NAME)
    del graph
    step()
    manifest = SparseManifest(
        folder,
        plan.task.value,
        fingerprint,
        sites,
        token_threshold=plan.token_threshold,
        package_version=__version__,
        unused_targets=unused,
        extra={"exporter": plan.exporter.value},
    )
    for name, ckpt in plan.checkpoints.items():
        source = str(plan.adapters[name])
        arrays = adapter_arrays(ckpt.deltas, sites, source=source, fingerprint=fingerprint, unused=unused)
        rel = f"{ADAPTER_DIR}/{name}{SUFFIX}"
        write_adapter_file(folder / rel, arrays)
        manifest.adapters[name] = adapter_entry(folder, rel, source, arrays.nnz)
        step()
    manifest.write()
    return manifest


def add_adapter_file(
    graph_dir: PathLike, adapter_dir: PathLike, *, name: Optional[str] = None, overwrite: bool = False
) -> Path:
    """Convert one more adapter for an existing sparse export (no re-export); returns its file.

    The adapter must only target modules the graph has sites for. Nothing outside
    `graph_dir/adapters/` is written except the manifest; on error nothing changes."""
    manifest = read_sparse_manifest(graph_dir)
    name = check_adapter_name(name or Path(adapter_dir).name)
    rel = f"{ADAPTER_DIR}/{name}{SUFFIX}"
    target = manifest.folder / rel
    if name in manifest.adapters and not overwrite:  # checked again under the lock
        raise ShiraInputError(f"{target}: adapter {name!r} exists (pass overwrite=True / --overwrite to replace it)")
    ckpt = _read_checkpoint(Path(adapter_dir), name)
    arrays = adapter_arrays(
        ckpt.deltas,
        manifest.targets,
        source=str(adapter_dir),
        fingerprint=manifest.base_fingerprint,
        unused=manifest.unused_targets,
    )
    # under the folder's lock: concurrent runs are serialized; an error leaves the folder as it was
    return install_adapter_file(manifest.folder, name, arrays, source=str(adapter_dir), overwrite=overwrite)
