"""Sparse-delta export: the base model exported once, one `.onnx_adapter` per adapter.

    OUT_DIR/model.onnx                    base graph + a sparse-delta branch per targeted layer
    OUT_DIR/adapters/<name>.onnx_adapter  onnxruntime AdapterFormat, 8 bytes per nonzero
    OUT_DIR/shira_export.json             manifest (targets, fingerprint, adapters)
    OUT_DIR/parity.json                   per adapter: ORT vs PyTorch with that adapter merged
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import numpy as np
import onnx

from shira_export._io import atomic_dir, check_output_location
from shira_export.errors import ParityFailure, ShiraInputError, check_opset
from shira_export.export import graph_delta
from shira_export.export.adapter_file import (
    SUFFIX, adapter_arrays, check_adapter_name, install_adapter_file, write_adapter_file,
)
from shira_export.export.manifest import ADAPTER_DIR, MODEL_NAME, SparseManifest, adapter_entry, read_sparse_manifest
from shira_export.export.onnx_io import needs_external_data, tensor_bytes

if TYPE_CHECKING:
    from shira_export.verify.report import VerifyReport

__all__ = ["SparseExportResult", "export_sparse", "add_adapter_file", "tensor_bytes"]

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


def _read_checkpoint(path: Path, name: str):
    from shira_export.tuner.checkpoint import read_adapter_dir

    ckpt = read_adapter_dir(path, name=name)
    if ckpt.modules_to_save:
        raise ShiraInputError(
            f"{path}: adapter has modules_to_save {sorted(ckpt.modules_to_save)}, which a sparse export cannot "
            f"switch per call (they replace whole modules); use `shira-export merged` for this adapter"
        )
    return ckpt


def _module_weights(model, modules: Sequence[str]) -> dict[str, np.ndarray]:
    """Each targeted module's weight in PyTorch's (out, in) layout (GPT-2 Conv1D stores (in, out))."""
    from shira_export.tuner.masks import base_weight_out_in

    named = dict(model.named_modules())
    return {path: np.ascontiguousarray(base_weight_out_in(named[path]).cpu().numpy()) for path in modules}


def _save_model(model: onnx.ModelProto, path: Path) -> None:
    external = needs_external_data(model)
    for stale in path.parent.glob(path.name + "_data"):
        stale.unlink()
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=path.name + "_data", size_threshold=1024)


def export_sparse(
    model_dir: PathLike,
    adapter_dirs: Union[Sequence[PathLike], Mapping[str, PathLike]],
    output_dir: PathLike,
    *,
    task: str = "auto",
    opset: Optional[int] = None,
    overwrite: bool = False,
    verify: bool = True,
    token_threshold: int = graph_delta.DEFAULT_TOKEN_THRESHOLD,
    quantize: Optional[str] = None,
    block_size: int = 32,
    exporter: str = "auto",
) -> SparseExportResult:
    """Export `model_dir` once with a sparse-delta site at every layer any adapter targets,
    and write one `.onnx_adapter` per adapter. `adapter_dirs` is a list of folders (named
    after the folder) or a {name: folder} mapping. `quantize` ("int8" | "int4") quantizes the
    constant base weights only; the sparse deltas and adapter files stay fp32. With `verify`,
    each adapter (and the base) is checked against PyTorch with the matching profile and a
    failure raises ParityFailure after the folder is written. `exporter` ("auto", "torch",
    "optimum") picks the ONNX exporter; the manifest records the one that ran."""
    from tqdm.auto import tqdm

    from shira_export import __version__
    from shira_export.export.exporters import DEFAULT_OPSET, choose_exporter, export_onnx
    from shira_export.export.tasks import copy_tokenizer_files, load_base_config, load_base_model, resolve_task

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
    if chosen.value == "genai":  # genai's builder loads the folder itself and builds the base its own way
        return _sparse_via_genai(model_dir, named, output_dir, precision=quantize or "fp32", overwrite=overwrite,
                                 verify=verify, token_threshold=token_threshold)
    model = load_base_model(model_dir, resolved)
    for ckpt in checkpoints.values():
        ckpt.validate_against(model)
    modules = sorted({m for c in checkpoints.values() for m in c.deltas})
    weights = _module_weights(model, modules)
    output_dir = Path(output_dir)
    steps = tqdm(total=3 + len(checkpoints), desc="sparse export", unit="step", disable=None)
    with atomic_dir(output_dir, overwrite=overwrite, inputs=[model_dir, *named.values()]) as tmp:
        export_onnx(model, tmp, task=resolved.value, exporter=chosen, opset=opset or DEFAULT_OPSET)
        copy_tokenizer_files(model_dir, tmp)
        steps.update()
        graph = onnx.load(str(tmp / MODEL_NAME))
        sites, unused = graph_delta.locate_targets(graph, weights)
        if not sites:
            raise ShiraInputError(f"{model_dir}: none of the targeted modules {modules} is in the exported graph")
        fingerprint = graph_delta.graph_fingerprint(sites)
        graph_delta.insert_sparse_deltas(graph, sites, threshold=token_threshold)
        _save_model(graph, tmp / MODEL_NAME)
        del graph
        steps.update()
        manifest = SparseManifest(tmp, resolved.value, fingerprint, sites, token_threshold=token_threshold,
                                  package_version=__version__, unused_targets=unused,
                                  extra={"exporter": chosen.value})
        for name, ckpt in checkpoints.items():
            arrays = adapter_arrays(ckpt.deltas, sites, source=str(named[name]), fingerprint=fingerprint,
                                    unused=unused)
            rel = f"{ADAPTER_DIR}/{name}{SUFFIX}"
            write_adapter_file(tmp / rel, arrays)
            manifest.adapters[name] = adapter_entry(tmp, rel, str(named[name]), arrays.nnz)
            steps.update()
        manifest.write()
        quant_report = None
        if quantize is not None:
            from shira_export.export.quantize import quantize_onnx_model

            # in place: the base weights are quantized, the delta branches re-attached in fp32
            quant_report = quantize_onnx_model(tmp, tmp, mode=quantize, block_size=block_size).to_json()
        if resolved.value == "text-generation-with-past":
            from shira_export.export.genai_config import write_genai_config

            write_genai_config(tmp)  # the folder also runs in onnxruntime-genai, adapters included
        report = None
        if verify:  # before the folder is published (as merged does): a run killed here publishes nothing
            from shira_export.verify import verify as run_verify

            # every adapter of the manifest and the base; 32 greedy tokens show a frozen KV-cache shape
            report = run_verify(model=model_dir, candidate=tmp, profile=quantize or "fp32",
                                overrides={"greedy_tokens": 32}, report_dir=tmp)
    steps.update()
    steps.close()
    del model
    result = SparseExportResult(
        output_dir, output_dir / MODEL_NAME, output_dir / "shira_export.json",
        {n: output_dir / e["file"] for n, e in manifest.adapters.items()}, targets=modules,
        quantization=quant_report,
    )
    if report is not None:
        result.report = report
        result.parity_path = output_dir / "parity.json"
        if not result.passed:
            failures = "; ".join(f.summary for f in result.report.failures[:3])
            raise ParityFailure(f"{output_dir}: sparse export does not match PyTorch: {failures} "
                                f"(details: {result.parity_path})", report=result.report)
    return result


def _sparse_via_genai(model_dir: PathLike, named: dict[str, Path], output_dir: PathLike, *, precision: str,
                      overwrite: bool, verify: bool, token_threshold: int) -> SparseExportResult:
    from shira_export.export.genai_builder import export_sparse_genai

    result = export_sparse_genai(model_dir, named, output_dir, precision=precision, overwrite=overwrite,
                                 verify=verify, token_threshold=token_threshold)
    if not result.passed:
        assert result.report is not None  # passed is True without a report
        failures = "; ".join(f.summary for f in result.report.failures[:3])
        raise ParityFailure(f"{output_dir}: sparse export does not match PyTorch: {failures} "
                            f"(details: {result.parity_path})", report=result.report)
    return result


def add_adapter_file(graph_dir: PathLike, adapter_dir: PathLike, *, name: Optional[str] = None,
                     overwrite: bool = False) -> Path:
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
    arrays = adapter_arrays(ckpt.deltas, manifest.targets, source=str(adapter_dir),
                            fingerprint=manifest.base_fingerprint, unused=manifest.unused_targets)
    # under the folder's lock: concurrent runs are serialized; an error leaves the folder as it was
    return install_adapter_file(manifest.folder, name, arrays, source=str(adapter_dir), overwrite=overwrite)
