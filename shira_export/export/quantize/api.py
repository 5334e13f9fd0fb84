"""Quantize an exported ONNX model: int8 or int4 base weights, written as a folder or file.

    quantize_onnx_model("merged_out", "merged_int8", mode="int8")         # an export folder
    quantize_onnx_model("sparse_out", "sparse_int4", mode="int4", block_size=32)
    quantize_onnx_model("model.onnx", "model.int8.onnx", options=QuantizeOptions(mode="int8"))

A merged folder: every `.onnx` file quantized, the rest copied, the manifest gets
`"quantization": mode` plus `"quantization_details"` (options, the CPU features and what
was chosen from them, each pass's statistics). A sparse folder: its graph is taken back
to the base graph, the base weights are quantized, and the sparse delta is re-attached on
the activation side in fp32 (export.quant_delta); the `.onnx_adapter` files are copied
unchanged and still switch per call. `output == source` (a folder) quantizes in place.

Passes, in order (each returns its statistics, kept in `report.passes`): fold tied heads'
Transpose, Gemm -> MatMul (int4/blocks), the bit plan (quantize.mixed), MatMulNBits at 4
and 8 bits (or `quantize_dynamic` for Int8Method.DYNAMIC), embedding tables
(quantize.tables), tied-table sharing (quantize.tied), dead initializers.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import onnx

from shira_export._io import atomic_dir, atomic_path
from shira_export.artifacts.manifest import MANIFEST_NAME, MODEL_NAME, Manifest, SparseManifest, read_manifest
from shira_export.artifacts.onnx_io import needs_external_data, save_onnx
from shira_export.errors import ShiraInputError
from shira_export.export.quantize import graph as qgraph
from shira_export.export.quantize.cpu import Choices, choose
from shira_export.export.quantize.mixed import label_outputs, plan_bits
from shira_export.export.quantize.options import Int8Method, QuantizeOptions, QuantMode
from shira_export.export.quantize.tables import quantize_tables
from shira_export.export.quantize.tied import share_tied_embeddings

__all__ = ["QuantizeReport", "quantize_onnx_model", "quantize_model"]

PathLike = Union[str, os.PathLike]


@dataclass
class QuantizeReport:
    """What one `quantize_onnx_model` call did (also written into the manifest)."""

    mode: str
    options: dict
    choices: dict  # CPU features and the settings chosen from them, with reasons (quantize.cpu)
    files: dict = field(default_factory=dict)  # rel path -> {"matmuls": [q, expected], "gathers": [q, expected]}
    passes: dict = field(default_factory=dict)  # rel path -> [{"pass": name, ...its statistics}]
    fp32_bytes: int = 0  # every .onnx (+ external data) before
    quantized_bytes: int = 0
    sparse_sites: int = 0  # delta branches re-attached (sparse folders)
    tied_tables_shared: int = 0  # embedding lookups that read the tied head's quantized weights
    matmuls_8bit: int = 0  # MatMuls at 8-bit blocks (summed over files)
    matmuls_4bit: int = 0
    notes: list = field(default_factory=list)  # one line per file: the int4 bit plan and why (printed)

    @property
    def size_ratio(self) -> float:
        return self.quantized_bytes / self.fp32_bytes if self.fp32_bytes else float("nan")

    @property
    def reduce_range(self) -> Optional[bool]:
        return self.choices.get("reduce_range")

    def to_json(self) -> dict:
        return dict(asdict(self), size_ratio=round(self.size_ratio, 4))


def quantize_onnx_model(
    source: PathLike,
    output: PathLike,
    *,
    options: Optional[QuantizeOptions] = None,
    overwrite: bool = False,
    **kwargs: object,
) -> QuantizeReport:
    """Quantize `source` (a .onnx file or an export folder) into `output` (a file or folder).

    Options: `options=QuantizeOptions(...)` or its fields as keywords (`mode="int4",
    block_size=32`; `reduce_range="auto"` is read as None, chosen per CPU).

    Raises ShiraInputError, with nothing written, for bad options, an already quantized
    graph, weights computed in the graph (the quantizer would skip them silently) or any
    quantizable MatMul or table the quantizer left in fp32."""
    if kwargs.get("reduce_range") == "auto":
        kwargs["reduce_range"] = None
    if options is None:
        options = QuantizeOptions.from_kwargs(**kwargs)
    elif kwargs:
        raise ShiraInputError(f"quantize: pass options= or keywords, not both (found {sorted(kwargs)})")
    choices = choose(options)
    source, output = Path(source), Path(output)
    report = QuantizeReport(options.mode.value, options.to_json(), choices.to_json())
    if source.is_file():
        if source.suffix != ".onnx":
            raise ShiraInputError(f"{source}: expected a .onnx file or an export folder")
        if output.exists() and not overwrite:
            raise ShiraInputError(f"{output}: exists (pass overwrite=True / --overwrite to replace it)")
        q = quantize_model(_load(source), report, output.name, options, choices)
        _print_notes(report)
        report.fp32_bytes = _onnx_bytes(source)
        with atomic_path(output) as tmp:
            _save(q, tmp, location=output.name + "_data")
        report.quantized_bytes = _onnx_bytes(output)
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
    results = {f.name: _quantize_file(f, manifest, report, options, choices) for f in files}
    _print_notes(report)
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


def _quantize_file(
    path: Path, manifest: Optional[Manifest], report: QuantizeReport, options: QuantizeOptions, choices: Choices
) -> onnx.ModelProto:
    model = _load(path)
    if isinstance(manifest, SparseManifest) and path.name == MODEL_NAME:
        from shira_export.export.quant_delta import attach_quantized_deltas, strip_sparse_deltas

        sparse = manifest
        io = strip_sparse_deltas(model, sparse.targets)
        q = quantize_model(model, report, path.name, options, choices, folder=path.parent)
        attach_quantized_deltas(q, sparse.targets, io, threshold=sparse.token_threshold)
        report.sparse_sites = len(sparse.targets)
        report.passes[path.name].append({"pass": "attach_sparse_deltas", "sites": len(sparse.targets)})
        return q
    return quantize_model(model, report, path.name, options, choices, folder=path.parent)


def _print_notes(report: QuantizeReport) -> None:
    import sys

    for line in report.notes:
        print(f"quantize: {line}", file=sys.stderr)


def quantize_model(
    model: onnx.ModelProto,
    report: QuantizeReport,
    where: str,
    options: QuantizeOptions,
    choices: Choices,
    folder: Optional[Path] = None,
) -> onnx.ModelProto:
    """One in-memory graph through every pass; statistics into `report` under `where`.
    `folder`: the export folder, whose tokenizer gives int4's measured plan real text."""
    passes: list[dict] = []
    qgraph.check_not_quantized(model, where)
    passes.append({"pass": "fold_transposed_weights", "matmuls": len(qgraph.fold_transposed_weights(model))})
    computed = qgraph.computed_weight_matmuls(model)
    if computed:
        raise ShiraInputError(
            f"{where}: {len(computed)} MatMul/Gemm nodes read weights computed in the graph ({computed[:3]}"
            f"{' ...' if len(computed) > 3 else ''}); onnxruntime's quantizers skip those silently and leave them fp32. "
            f"Quantize the base graph before attaching deltas (export_sparse(..., quantize=...))"
        )
    exclude = options.nodes_to_exclude
    if options.mode is QuantMode.INT8 and options.int8_method is Int8Method.DYNAMIC:
        reduce_range = bool(choices.reduce_range)
        q, counts = qgraph.run_int8_dynamic(
            model,
            per_channel=options.per_channel,
            reduce_range=reduce_range,
            embeddings=options.embeddings,
            exclude=exclude,
            external=needs_external_data(model),
        )
        passes.append({"pass": "quantize_dynamic", "reduce_range": reduce_range, **asdict(counts)})
        missed = list(counts.missed)
        matmuls = [counts.matmuls_quantized, counts.matmuls_expected]
        gathers = [counts.gathers_quantized, counts.gathers_expected]
    else:
        passes.append({"pass": "gemms_to_matmuls", "gemms": len(qgraph.gemms_to_matmuls(model))})
        _, tables = qgraph.count_quantizable(model, gemm=False)
        plan = plan_bits(model, options, folder)
        passes.append({"pass": "plan_bits", **plan.to_json()})
        if options.mode is QuantMode.INT4:
            report.notes.append(f"{where}: {plan.summary()}")
        q, c4 = qgraph.run_nbits(
            model,
            plan.four,
            bits=4,
            block_size=options.block_size,
            symmetric=options.symmetric,
            accuracy_level=options.accuracy_level,
        )
        passes.append({"pass": "matmul_nbits_4", **asdict(c4)})
        level8 = _level_8bit(model, options, choices, report)
        q, c8 = qgraph.run_nbits(
            q,
            plan.eight,
            bits=8,
            block_size=options.block_size,
            symmetric=options.symmetric,
            accuracy_level=level8,
        )
        passes.append({"pass": "matmul_nbits_8", "accuracy_level": level8, **asdict(c8)})
        missed = list(c4.missed + c8.missed)
        expected_tables = [t for t in tables if t not in exclude] if options.embeddings else []
        quantized_tables = 0
        if expected_tables:
            t = quantize_tables(q, bits=int(choices.table_bits or 8), block_size=options.block_size, exclude=exclude)
            passes.append({"pass": "tables", **asdict(t)})
            missed += list(t.skipped)
            quantized_tables = t.tables
        report.matmuls_4bit += c4.matmuls_quantized
        report.matmuls_8bit += c8.matmuls_quantized
        matmuls = [c4.matmuls_quantized + c8.matmuls_quantized, c4.matmuls_expected + c8.matmuls_expected]
        gathers = [quantized_tables, len(expected_tables)]
    if missed:
        raise ShiraInputError(
            f"{where}: the {options.mode.value} quantizer left {len(missed)} of {matmuls[1] + gathers[1]} quantizable "
            f"nodes in fp32 ({missed[:3]}); expected all of them (exclude nodes on purpose with nodes_to_exclude)"
        )
    shared = share_tied_embeddings(q)  # a tied head and its lookup read one table
    report.tied_tables_shared += shared
    passes.append({"pass": "share_tied_embeddings", "lookups": shared})
    passes.append({"pass": "drop_unused_initializers", "dropped": qgraph.drop_unused_initializers(q)})
    report.files[where] = {"matmuls": matmuls, "gathers": gathers}
    report.passes[where] = passes
    return q


def _level_8bit(
    model: onnx.ModelProto, options: QuantizeOptions, choices: Choices, report: QuantizeReport
) -> Optional[int]:
    """8-bit MatMulNBits' accuracy level for this graph: the CPU's choice, except for classifiers
    (unless given). A label is one argmax, and out-of-domain inputs have top-2 logits 0.02 apart
    (MiniLM): int8 activations per block (level 4) moved them up to 0.053 and flipped 1 of 90
    sentences in the sparse int8 export; fp32 activations (level 0, what int4's plan simulates) up
    to 0.028, none flipped. An encoder call runs all tokens at once, where level 0 is no slower
    on AVX2 (MiniLM 1 x 64: 219 ms vs 252 ms; a VNNI machine not measured)."""
    level = choices.accuracy_level_8bit
    if options.accuracy_level_8bit is not None or level is None or not label_outputs(model):
        return level
    report.choices["accuracy_level_8bit"] = 0
    report.choices.setdefault("reasons", {})["accuracy_level_8bit"] = (
        f"classifier graph (outputs {label_outputs(model)[:2]}): fp32 activations keep near-tie labels; "
        "no slower for an encoder call on AVX2 (docs/quantize.md)"
    )
    return 0


def _load(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # onnx raises DecodeError / OSError / ValidationError
        raise ShiraInputError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None


def _save(model: onnx.ModelProto, path: Path, *, location: str) -> None:
    save_onnx(model, path, location=location)


def _external_files(folder: Path, files: Sequence[Path]) -> list[str]:
    names = []
    for f in files:
        proto = onnx.load(str(f), load_external_data=False)
        for init in proto.graph.initializer:
            names += [e.value for e in init.external_data if e.key == "location"]
    return sorted(set(names))


def _onnx_bytes(path: Path) -> int:
    return path.stat().st_size + sum(
        (path.parent / n).stat().st_size for n in _external_files(path.parent, [path]) if (path.parent / n).is_file()
    )


def _write_models(folder: Path, results: dict) -> None:
    for name, model in results.items():
        _save(model, folder / name, location=f"{name}_data")


def _write_in_place(folder: Path, results: dict, manifest: Optional[Manifest], report: QuantizeReport) -> None:
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


def _read_manifest(folder: Path) -> Optional[Manifest]:
    """The folder's manifest through the contract (None: a folder without one)."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    manifest = read_manifest(folder)
    if manifest.quantization:
        raise ShiraInputError(
            f"{path}: export is already quantized (quantization={manifest.quantization!r}); "
            f"quantize the fp32 export instead"
        )
    return manifest


def _write_manifest(folder: Path, manifest: Manifest, report: QuantizeReport) -> None:
    manifest.extra.update(quantization=report.mode, quantization_details=report.to_json())
    manifest.write(folder)
