"""Quantize an exported ONNX model: int8 (dynamic) or int4 (MatMulNBits) base weights.

    quantize_onnx_model("merged_out", "merged_int8", mode="int8")         # an export folder
    quantize_onnx_model("sparse_out", "sparse_int4", mode="int4", block_size=32)
    quantize_onnx_model("model.onnx", "model.int8.onnx", mode="int8")     # a bare file

A merged folder: every `.onnx` file quantized, the rest copied, the manifest gets
`"quantization": mode` plus the details. A sparse folder: its graph is taken back to the
base graph, the base weights are quantized, and the sparse delta is re-attached on the
activation side in fp32 (export.quant_delta); the `.onnx_adapter` files are copied
unchanged and still switch per call. `output == source` (a folder) quantizes in place.

int8: `quantize_dynamic`, per-channel weights by default. Without VNNI, u8 x s8 products
can saturate (ANCHORS 6); `reduce_range="auto"` probes the largest weights on this CPU
with and without 7-bit weights and keeps 7 bits only where that is measurably better.
int4: `MatMulNBitsQuantizer` (RTN, asymmetric by default: more accurate on MiniLM); the
last `int8_tail` (default a third) of the MatMuls, nearest the output, get 8-bit blocks
(export.quant_mixed): MiniLM's worst embedding cosine 0.971 -> 0.987 for 0.168x -> 0.183x.
Embedding tables (Gather, not MatMul) are quantized too unless `embeddings=False`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import numpy as np
import onnx

from shira_export._io import atomic_dir, atomic_path
from shira_export.errors import ShiraInputError
from shira_export.export import quant_graph, quant_mixed
from shira_export.export.onnx_io import needs_external_data
from shira_export.export.quant_probe import probe_int8_saturation

__all__ = ["QuantMode", "BLOCK_SIZES", "QuantizeReport", "quantize_onnx_model", "check_quantize_options"]

PathLike = Union[str, os.PathLike]
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits: a power of two, at least 16
MANIFEST_NAME = "shira_export.json"


class QuantMode(str, Enum):
    INT8 = "int8"
    INT4 = "int4"


@dataclass
class QuantizeReport:
    """What one `quantize_onnx_model` call did (also written into the manifest)."""

    mode: str
    block_size: Optional[int]
    symmetric: Optional[bool]
    per_channel: Optional[bool]
    reduce_range: Optional[bool]
    embeddings_quantized: bool
    files: dict = field(default_factory=dict)  # rel path -> {"matmuls": [q, expected], "gathers": [...], bytes}
    fp32_bytes: int = 0  # every .onnx (+ external data) before
    quantized_bytes: int = 0
    probe: Optional[dict] = None  # int8 saturation probe (quant_probe)
    sparse_sites: int = 0  # delta branches re-attached (sparse folders)
    tied_tables_shared: int = 0  # embedding lookups that read the tied head's quantized weights
    int8_tail: Optional[float] = None  # int4: fraction of the MatMuls kept at 8 bits
    matmuls_8bit: int = 0  # int4: MatMuls given 8-bit blocks (summed over files)

    @property
    def size_ratio(self) -> float:
        return self.quantized_bytes / self.fp32_bytes if self.fp32_bytes else float("nan")

    def to_json(self) -> dict:
        return dict(asdict(self), size_ratio=round(self.size_ratio, 4))


def check_quantize_options(mode: object, block_size: object) -> tuple[QuantMode, int]:
    """Validate `mode` and `block_size` before anything is read or written."""
    try:
        qmode = QuantMode(mode)
    except ValueError:
        raise ShiraInputError(f"quantize: expected one of {[m.value for m in QuantMode]}, found {mode!r}") from None
    if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise ShiraInputError(f"block_size: expected one of {list(BLOCK_SIZES)} (MatMulNBits needs a power of two "
                              f">= 16), found {block_size!r}")
    return qmode, int(block_size)


def quantize_onnx_model(
    source: PathLike,
    output: PathLike,
    *,
    mode: Union[str, QuantMode],
    block_size: int = 32,
    symmetric: bool = False,
    per_channel: bool = True,
    reduce_range: Union[bool, Literal["auto"]] = "auto",
    accuracy_level: Optional[int] = None,
    embeddings: bool = True,
    int8_tail: float = 1 / 3,
    nodes_to_exclude: Sequence[str] = (),
    overwrite: bool = False,
) -> QuantizeReport:
    """Quantize `source` (a .onnx file or an export folder) into `output` (a file or folder).

    Raises ShiraInputError, with nothing written, for an unknown mode or block size, an
    already quantized graph, weights computed in the graph (the quantizer would skip them
    silently) or any quantizable MatMul the quantizer left in fp32. int4 only: the last
    `int8_tail` of the MatMuls (graph order, LM heads excluded) get 8-bit blocks; 0 = all 4-bit."""
    qmode, block = check_quantize_options(mode, block_size)
    tail = quant_mixed.check_int8_tail(int8_tail)
    if reduce_range not in (True, False, "auto"):
        raise ShiraInputError(f"reduce_range: expected True, False or 'auto', found {reduce_range!r}")
    if accuracy_level not in (None, 0, 1, 2, 3, 4):
        raise ShiraInputError(f"accuracy_level: expected None or 0-4 (MatMulNBits), found {accuracy_level!r}")
    source, output = Path(source), Path(output)
    report = QuantizeReport(qmode.value, block if qmode is QuantMode.INT4 else None,
                            symmetric if qmode is QuantMode.INT4 else None,
                            per_channel if qmode is QuantMode.INT8 else None, None, embeddings,
                            int8_tail=tail if qmode is QuantMode.INT4 else None)
    opts = dict(mode=qmode, block_size=block, symmetric=symmetric, per_channel=per_channel, reduce_range=reduce_range,
                accuracy_level=accuracy_level, embeddings=embeddings, int8_tail=tail, exclude=tuple(nodes_to_exclude))
    if source.is_file():
        if source.suffix != ".onnx":
            raise ShiraInputError(f"{source}: expected a .onnx file or an export folder")
        if output.exists() and not overwrite:
            raise ShiraInputError(f"{output}: exists (pass overwrite=True / --overwrite to replace it)")
        model = _load(source)
        q = _quantize(model, report, str(source), opts)
        report.fp32_bytes = _onnx_bytes(source)
        with atomic_path(output) as tmp:
            _save(q, tmp, location=output.name + "_data")
        report.quantized_bytes = _onnx_bytes(output)
        report.files = {output.name: report.files.pop(str(source))}
        return report
    if not source.is_dir():
        raise ShiraInputError(f"{source}: not found (expected a .onnx file or an export folder)")
    in_place = output.resolve() == source.resolve()
    if not in_place and output.exists() and not overwrite:
        raise ShiraInputError(f"{output}: exists (pass overwrite=True / --overwrite to replace it)")
    files = sorted(source.glob("*.onnx"))
    if not files:
        raise ShiraInputError(f"{source}: no .onnx file (expected an ONNX export folder)")
    manifest = _read_manifest(source)
    # everything is computed in memory first: bad input leaves no output behind
    results = {f.name: _quantize_file(f, manifest, report, opts) for f in files}
    report.fp32_bytes = sum(_onnx_bytes(f) for f in files)
    if in_place:
        _write_in_place(source, results, manifest, report)
    else:
        with atomic_dir(output, overwrite=overwrite) as tmp:
            data = {f"{name}_data" for name in results} | set(_external_files(source, files))
            for item in source.iterdir():
                if item.name in results or item.name in data:
                    continue
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
            _write_models(tmp, results)
            report.quantized_bytes = sum(_onnx_bytes(tmp / n) for n in results)
            if manifest is not None:
                _write_manifest(tmp, manifest, report)
    return report


def _quantize_file(path: Path, manifest: Optional[dict], report: QuantizeReport, opts: dict) -> onnx.ModelProto:
    model = _load(path)
    if manifest is not None and manifest.get("kind") == "sparse" and path.name == manifest.get("model", "model.onnx"):
        return _quantize_sparse(model, path, manifest, report, opts)
    return _quantize(model, report, path.name, opts)


def _quantize_sparse(model: onnx.ModelProto, path: Path, manifest: dict, report: QuantizeReport,
                     opts: dict) -> onnx.ModelProto:
    from shira_export.export.manifest import read_sparse_manifest
    from shira_export.export.quant_delta import attach_quantized_deltas, strip_sparse_deltas

    sparse = read_sparse_manifest(path.parent)
    io = strip_sparse_deltas(model, sparse.targets)
    q = _quantize(model, report, path.name, opts)
    attach_quantized_deltas(q, sparse.targets, io, threshold=sparse.token_threshold)
    report.sparse_sites = len(sparse.targets)
    return q


def _quantize(model: onnx.ModelProto, report: QuantizeReport, where: str, opts: dict) -> onnx.ModelProto:
    quant_graph.check_not_quantized(model, where)
    quant_graph.fold_transposed_weights(model)  # a tied head reads Transpose(embedding): a constant, made explicit
    computed = quant_graph.computed_weight_matmuls(model)
    if computed:
        raise ShiraInputError(
            f"{where}: {len(computed)} MatMul/Gemm nodes read weights computed in the graph ({computed[:3]}"
            f"{' ...' if len(computed) > 3 else ''}); onnxruntime's quantizers skip those silently and leave them fp32. "
            f"Quantize the base graph before attaching deltas (export_sparse(..., quantize=...))"
        )
    external = needs_external_data(model)
    wide: list[str] = []
    if opts["mode"] is QuantMode.INT8:
        rr = opts["reduce_range"]
        if rr == "auto":
            report.probe = probe_int8_saturation(model, per_channel=opts["per_channel"])
            rr = bool(report.probe["use_reduce_range"])
        report.reduce_range = bool(rr)
        q, counts = quant_graph.run_int8(model, per_channel=opts["per_channel"], reduce_range=bool(rr),
                                         embeddings=opts["embeddings"], exclude=opts["exclude"], external=external)
    else:
        quant_graph.gemms_to_matmuls(model)
        wide = quant_mixed.tail_matmuls(model, opts["int8_tail"], exclude=opts["exclude"])
        with np.errstate(invalid="ignore"):  # all-zero blocks: the quantizer's np.where picks its fallback
            q, counts = quant_graph.run_int4(model, block_size=opts["block_size"], symmetric=opts["symmetric"],
                                             accuracy_level=opts["accuracy_level"], embeddings=opts["embeddings"],
                                             exclude=tuple(opts["exclude"]) + tuple(wide))
        # 8 bits after 4: run first, it left OPT's tied head reading Transpose(table) in fp32, uncounted
        if wide:
            q = quant_mixed.run_8bit_blocks(q, wide, block_size=opts["block_size"], symmetric=opts["symmetric"],
                                            accuracy_level=quant_mixed.tail_accuracy_level(opts["accuracy_level"]))
        report.matmuls_8bit += len(wide)
    if counts.missed:
        raise ShiraInputError(
            f"{where}: the {opts['mode'].value} quantizer left {len(counts.missed)} of "
            f"{counts.matmuls_expected + counts.gathers_expected} quantizable nodes in fp32 ({list(counts.missed[:3])}); "
            f"expected all of them (exclude nodes on purpose with nodes_to_exclude)"
        )
    report.tied_tables_shared = quant_graph.share_tied_embeddings(q)  # a tied head and its lookup read one table
    quant_graph.drop_unused_initializers(q)
    # run_int4 counted without the 8-bit tail (quantized after it, each checked by run_8bit_blocks)
    report.files[where] = {"matmuls": [counts.matmuls_quantized + len(wide), counts.matmuls_expected + len(wide)],
                           "gathers": [counts.gathers_quantized, counts.gathers_expected]}
    return q


def _load(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # onnx raises DecodeError / OSError / ValidationError
        raise ShiraInputError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None


def _save(model: onnx.ModelProto, path: Path, *, location: str) -> None:
    external = needs_external_data(model)
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)


def _external_files(folder: Path, files: Sequence[Path]) -> list[str]:
    names = []
    for f in files:
        proto = onnx.load(str(f), load_external_data=False)
        for init in proto.graph.initializer:
            names += [e.value for e in init.external_data if e.key == "location"]
    return sorted(set(names))


def _onnx_bytes(path: Path) -> int:
    return path.stat().st_size + sum((path.parent / n).stat().st_size for n in _external_files(path.parent, [path])
                                     if (path.parent / n).is_file())


def _write_models(folder: Path, results: dict) -> None:
    for name, model in results.items():
        _save(model, folder / name, location=f"{name}_data")


def _write_in_place(folder: Path, results: dict, manifest: Optional[dict], report: QuantizeReport) -> None:
    """Each file goes through a temp file + rename; old external data is removed after."""
    stale = set(_external_files(folder, [folder / n for n in results]))
    for name, model in results.items():
        with atomic_path(folder / name) as tmp:
            _save(model, tmp, location=f"{name}_data")
        stale.discard(f"{name}_data")
    for n in stale:
        (folder / n).unlink(missing_ok=True)
    report.quantized_bytes = sum(_onnx_bytes(folder / n) for n in results)
    if manifest is not None:
        _write_manifest(folder, manifest, report)


def _read_manifest(folder: Path) -> Optional[dict]:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ShiraInputError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if raw.get("quantization"):
        raise ShiraInputError(f"{path}: export is already quantized (quantization={raw['quantization']!r}); "
                              f"quantize the fp32 export instead")
    return raw


def _write_manifest(folder: Path, manifest: dict, report: QuantizeReport) -> None:
    from shira_export._io import atomic_write_text

    data = dict(manifest, quantization=report.mode, quantization_details=report.to_json())
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(data, indent=2) + "\n")
