"""onnxruntime-genai's model builder as an exporter (`--exporter genai`).

The builder writes genai's own graphs (GroupQueryAttention with RoPE inside, q|k|v packed,
MatMulNBits for int4) for Llama, Mistral, Qwen2/3, Phi-3, Gemma and more; it handles LoRA
only. Here it builds the base (sparse export) or the merged model (merged export), and the
sparse export attaches our delta to its MatMul / MatMulNBits sites (`genai_sites`):

    OUT/model.onnx, model.onnx.data       the builder's graph + one delta branch per targeted node
    OUT/genai_config.json                 the builder's, sessions logging errors only
    OUT/adapters/<name>.onnx_adapter      the same files as any sparse export of this base
    OUT/shira_export.json                 sparse manifest (exporter "genai", precision)

CPU precisions: fp32, int8 and int4 (MatMulNBits, block 32 by default). Not fp16: the
builder's fp16 CPU graph (MultiHeadAttention + repeat_kv, not one of the builder's listed
CPU combinations) fails at its first decode step in onnxruntime 1.32 / genai 0.18 ("Shape
mismatch attempting to re-use buffer"; it runs only with memory reuse off, which genai
cannot set). For fp16 use the torch/optimum route (`export_merged(..., dtype="fp16")`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import numpy as np
import onnx
import torch

from shira_export._io import atomic_dir, atomic_write_text
from shira_export.artifacts.hf_folder import load_model
from shira_export.errors import ShiraInputError
from shira_export.export import graph_delta
from shira_export.export.adapter_file import SUFFIX, adapter_arrays, check_adapter_name, write_adapter_file
from shira_export.export.genai_config import GENAI_CONFIG_NAME
from shira_export.artifacts.manifest import (
    ADAPTER_DIR,
    MODEL_NAME,
    MergedManifest,
    SparseManifest,
    adapter_entry,
    weights_fingerprint,
)
from shira_export.artifacts.onnx_io import save_onnx

if TYPE_CHECKING:
    from shira_export.export.sparse import SparseExportResult

__all__ = [
    "PRECISIONS",
    "build_genai_model",
    "export_sparse_genai",
    "write_sparse_genai",
    "export_merged_genai",
    "write_merged_genai",
]

PathLike = Union[str, os.PathLike]
PRECISIONS = ("fp32", "int8", "int4")
TASK = "text-generation-with-past"
_DATA = MODEL_NAME + ".data"  # the builder's external-data file


def _check_precision(precision: str) -> str:
    if precision == "fp16":
        raise ShiraInputError(
            "precision 'fp16': the genai builder's fp16 CPU graph fails at decode in onnxruntime "
            "1.32 (buffer re-use error); use fp32, int8 or int4 here, or the torch/optimum exporter for fp16"
        )
    if precision not in PRECISIONS:
        raise ShiraInputError(f"precision {precision!r}: expected one of {list(PRECISIONS)} (CPU builds)")
    return precision


def build_genai_model(
    model_dir: PathLike,
    output_dir: PathLike,
    *,
    precision: str = "fp32",
    extra_options: Optional[Mapping[str, object]] = None,
    quiet: bool = True,
) -> Path:
    """Run `onnxruntime_genai.models.builder` on the HF folder `model_dir` (needs its
    tokenizer) into `output_dir` for the CPU; returns output_dir."""
    try:
        from onnxruntime_genai.models.builder import create_model, parse_extra_options
    except ImportError as exc:
        raise ShiraInputError(
            f"the genai exporter needs onnxruntime-genai (pip install onnxruntime-genai): {exc}"
        ) from None
    from shira_export.artifacts.hf_folder import check_folder

    model_dir, output_dir = Path(model_dir), Path(output_dir)
    _check_precision(precision)
    check_folder(model_dir)  # the builder loads the folder itself: no code fields, no pickles
    if not any(
        (model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    ):
        raise ShiraInputError(
            f"{model_dir}: no tokenizer files (the genai builder loads the tokenizer; save it into the "
            f"model folder with tokenizer.save_pretrained)"
        )
    options = [f"{k}={v}" for k, v in (extra_options or {}).items()]
    with tempfile.TemporaryDirectory(prefix="shira_genai_cache_") as cache:
        sink = io.StringIO()
        quiet_ctx = (contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink)) if quiet else ()
        with contextlib.ExitStack() as stack:
            for ctx in quiet_ctx:
                stack.enter_context(ctx)
            try:
                kwargs = parse_extra_options(None, str(model_dir), str(output_dir), precision, "cpu", cache, options)
                create_model(None, str(model_dir), str(output_dir), precision, "cpu", cache, **kwargs)
            except NotImplementedError as exc:
                raise ShiraInputError(
                    f"{model_dir}: the genai model builder does not support this architecture ({exc})"
                ) from None
    _quiet_sessions(output_dir)
    return output_dir


def _quiet_sessions(folder: Path) -> None:
    """ORT warns once per overridable `shira.*` input at load (intended): log errors only."""
    path = folder / GENAI_CONFIG_NAME
    config = json.loads(path.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["log_severity_level"] = 3
    atomic_write_text(path, json.dumps(config, indent=4) + "\n")


def _named(adapter_dirs) -> dict[str, Path]:
    if isinstance(adapter_dirs, (str, os.PathLike)):
        adapter_dirs = [adapter_dirs]
    items = adapter_dirs.items() if isinstance(adapter_dirs, Mapping) else ((Path(d).name, d) for d in adapter_dirs)
    named: dict[str, Path] = {}
    for name, path in items:
        if check_adapter_name(name) in named:
            raise ShiraInputError(f"adapter name {name!r} given twice ({named[name]} and {path}); name them NAME=DIR")
        named[name] = Path(path)
    if not named:
        raise ShiraInputError("no adapters given (expected at least one adapter folder)")
    return named


def _linear_weights(model) -> dict[str, np.ndarray]:
    from torch import nn

    return {
        name: m.weight.detach().float().cpu().numpy() for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }


def export_sparse_genai(
    model_dir: PathLike,
    adapter_dirs: Union[Sequence[PathLike], Mapping[str, PathLike]],
    output_dir: PathLike,
    *,
    precision: str = "fp32",
    overwrite: bool = False,
    token_threshold: int = graph_delta.DEFAULT_TOKEN_THRESHOLD,
    builder_options: Optional[Mapping[str, object]] = None,
) -> "SparseExportResult":
    """`write_sparse_genai` into a new folder `output_dir`, published when complete. Returns a
    `SparseExportResult` without a report (verifying is the pipeline's:
    `shira_export.export_sparse(..., exporter="genai")`)."""
    from shira_export.export.sparse import sparse_result

    output_dir = Path(output_dir)
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        manifest = write_sparse_genai(
            model_dir,
            adapter_dirs,
            tmp,
            precision=precision,
            token_threshold=token_threshold,
            builder_options=builder_options,
        )
    return sparse_result(output_dir, manifest, sorted({t.module for t in manifest.targets}))


def write_sparse_genai(
    model_dir: PathLike,
    adapter_dirs: Union[Sequence[PathLike], Mapping[str, PathLike]],
    folder: Path,
    *,
    precision: str = "fp32",
    token_threshold: int = graph_delta.DEFAULT_TOKEN_THRESHOLD,
    builder_options: Optional[Mapping[str, object]] = None,
) -> SparseManifest:
    """Build the base with genai's model builder into `folder`, attach a sparse delta at every
    builder node a targeted module lives in, and write one `.onnx_adapter` per adapter and the
    manifest (its folder reads with `read_sparse_manifest` / `ShiraSession`, and runs in
    `onnxruntime_genai` as it is). `builder_options` are the builder's extra options (e.g.
    {"block_size": 16, "accuracy_level": 1} for int4)."""
    from transformers import AutoModelForCausalLM

    from shira_export import __version__
    from shira_export.export.genai_sites import builder_sites, insert_builder_deltas, locate_builder_pieces
    from shira_export.tuner.checkpoint import read_adapter_dir

    _check_precision(precision)
    model_dir = Path(model_dir)
    named = _named(adapter_dirs)
    checkpoints = {name: read_adapter_dir(path, name=name) for name, path in named.items()}
    for name, ckpt in checkpoints.items():
        if ckpt.modules_to_save:
            raise ShiraInputError(
                f"{named[name]}: adapter has modules_to_save {sorted(ckpt.modules_to_save)}, which a "
                f"sparse export cannot switch per call; use a merged export for this adapter"
            )
    model = load_model(model_dir, AutoModelForCausalLM, dtype=torch.float32)
    for ckpt in checkpoints.values():
        ckpt.validate_against(model)
    all_weights = _linear_weights(model)
    del model
    modules = sorted({m for c in checkpoints.values() for m in c.deltas})
    weights = {m: all_weights[m] for m in modules}
    build_genai_model(model_dir, folder, precision=precision, extra_options=builder_options)
    for extra_file in ("config.json", "generation_config.json"):  # for runtimes reading the HF config
        if (model_dir / extra_file).is_file():
            shutil.copy2(model_dir / extra_file, folder / extra_file)
    graph = onnx.load(str(folder / MODEL_NAME))
    pieces = locate_builder_pieces(graph, weights, all_weights)
    sites = builder_sites(pieces, weights)
    fingerprint = graph_delta.graph_fingerprint(sites)
    insert_builder_deltas(graph, pieces, {m: w.shape[0] for m, w in weights.items()}, threshold=token_threshold)
    # the builder's layout: tensors in model.onnx.data (onnx appends to it: save_onnx drops the builder's first)
    save_onnx(graph, folder / MODEL_NAME, location=_DATA, external=True)
    del graph
    extra: dict = {
        "exporter": "genai",
        "precision": precision,
        "genai_config": GENAI_CONFIG_NAME,
        "builder_options": dict(builder_options or {}),
    }
    if precision in ("int8", "int4"):
        extra["quantization"] = precision  # ShiraSession and verify run quantized bases portable
    manifest = SparseManifest(
        folder, TASK, fingerprint, sites, token_threshold=token_threshold, package_version=__version__, extra=extra
    )
    for name, ckpt in checkpoints.items():
        arrays = adapter_arrays(ckpt.deltas, sites, source=str(named[name]), fingerprint=fingerprint)
        rel = f"{ADAPTER_DIR}/{name}{SUFFIX}"
        write_adapter_file(folder / rel, arrays)
        manifest.adapters[name] = adapter_entry(folder, rel, str(named[name]), arrays.nnz)
    manifest.write()
    return manifest


def export_merged_genai(
    model_dir: PathLike,
    adapter_dir: PathLike,
    output_dir: PathLike,
    *,
    adapter_name: Optional[str] = None,
    precision: str = "fp32",
    overwrite: bool = False,
    builder_options: Optional[Mapping[str, object]] = None,
) -> Path:
    """`write_merged_genai` into a new folder `output_dir`, published when complete."""
    output_dir = Path(output_dir)
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        write_merged_genai(
            model_dir, adapter_dir, tmp, adapter_name=adapter_name, precision=precision, builder_options=builder_options
        )
    return output_dir


def write_merged_genai(
    model_dir: PathLike,
    adapter_dir: PathLike,
    folder: Path,
    *,
    adapter_name: Optional[str] = None,
    precision: str = "fp32",
    builder_options: Optional[Mapping[str, object]] = None,
) -> MergedManifest:
    """The adapter merged into the base (our tuner's merge_and_unload), then built into `folder`
    with genai's model builder. Writes a merged manifest (kind "merged", exporter "genai")."""
    from transformers import AutoModelForCausalLM

    from shira_export import __version__
    from shira_export.tuner import ShiraModel
    from shira_export.tuner.checkpoint import read_adapter_dir

    _check_precision(precision)
    model_dir, adapter_dir = Path(model_dir), Path(adapter_dir)
    name = check_adapter_name(adapter_name or adapter_dir.name)
    ckpt = read_adapter_dir(adapter_dir, name=name)
    base = load_model(model_dir, AutoModelForCausalLM, dtype=torch.float32)
    ckpt.validate_against(base)
    fingerprint = weights_fingerprint(base)  # as every merged exporter takes it: the fp32 base, before the merge
    merged = ShiraModel.from_pretrained(base, adapter_dir, adapter_name=ckpt.name).merge_and_unload().eval()
    with tempfile.TemporaryDirectory(prefix="shira_genai_merged_") as hf:
        merged.save_pretrained(hf)  # type: ignore[operator]
        for item in model_dir.iterdir():  # tokenizer and generation files the builder reads
            if (
                item.is_file()
                and item.name not in ("config.json",)
                and not item.name.endswith((".safetensors", ".bin"))
            ):
                if not (Path(hf) / item.name).exists():
                    shutil.copy2(item, Path(hf) / item.name)
        build_genai_model(hf, folder, precision=precision, extra_options=builder_options)
        shutil.copy2(Path(hf) / "config.json", folder / "config.json")
    extra: dict = {"precision": precision, "builder_options": dict(builder_options or {})}
    if precision in ("int8", "int4"):
        extra["quantization"] = precision
    manifest = MergedManifest(
        folder,
        TASK,
        "onnx",
        "fp32",
        "genai",
        __version__,
        str(model_dir.resolve()),
        fingerprint,
        {"name": name, "source": str(adapter_dir.resolve())},
        extra,
    )
    manifest.write(atomic=False)
    return manifest
