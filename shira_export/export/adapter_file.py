""".onnx_adapter files (onnxruntime's AdapterFormat) for a sparse export.

Parameters, per module `m` the adapter touches (modules it does not touch are left out:
the graph's defaults are empty, i.e. no delta):

    shira.<m>.indices   int32 [nnz]   flat index out * in_features + in (PyTorch's (out, in) layout)
    shira.<m>.values    fp32  [nnz]   the delta at that position (duplicates are summed)

8 bytes per nonzero. The file's model_version is the graph's short fingerprint
(first 28 bits of the manifest's `base_fingerprint`), its adapter_version the format
schema; plain-onnxruntime users can compare `get_model_version()` themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np

from shira_export._io import atomic_path
from shira_export.errors import ShiraInputError
from shira_export.export.graph_delta import TargetSite, indices_name, values_name

__all__ = [
    "ADAPTER_SCHEMA",
    "AdapterArrays",
    "short_fingerprint",
    "adapter_arrays",
    "write_adapter_file",
    "read_adapter_file",
    "check_adapter_name",
]

ADAPTER_SCHEMA = 1
SUFFIX = ".onnx_adapter"


def short_fingerprint(fingerprint: str) -> int:
    """The part of the graph fingerprint that fits the format's int model_version."""
    return int(fingerprint[:7], 16)


@dataclass
class AdapterArrays:
    """An adapter in the graph's terms: module -> (flat int32 indices, fp32 values)."""

    deltas: dict[str, tuple[np.ndarray, np.ndarray]]
    model_version: int = 0

    @property
    def nnz(self) -> int:
        return int(sum(v.size for _, v in self.deltas.values()))

    def parameters(self) -> dict[str, np.ndarray]:
        params: dict[str, np.ndarray] = {}
        for module, (idx, vals) in sorted(self.deltas.items()):
            params[indices_name(module)] = idx
            params[values_name(module)] = vals
        return params


def check_adapter_name(name: str) -> str:
    """An adapter name becomes a file name under OUT_DIR/adapters/: no paths, no dots first."""
    ok = name and all(c.isalnum() or c in "-_." for c in name) and not name.startswith(".")
    if not ok or len(name) > 100:
        raise ShiraInputError(
            f"adapter name {name!r}: expected 1-100 letters, digits, '-', '_' or '.', not starting with '.' "
            f"(it names the file adapters/<name>{SUFFIX} and must stay inside the output folder)"
        )
    return name


def adapter_arrays(deltas: Mapping[str, object], sites: Sequence[TargetSite], *, source: str,
                   fingerprint: str, unused: Sequence[str] = ()) -> AdapterArrays:
    """Convert checkpoint deltas (SparseDelta: int [2, nnz] (out, in), values [nnz]) to flat
    arrays; every module must be a site of the graph (or in `unused`: modules the graph's
    outputs do not depend on) and every index in range."""
    by_module = {s.module: s for s in sites}
    deltas = {m: d for m, d in deltas.items() if m not in set(unused)}
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    problems: list[str] = []
    for module, delta in sorted(deltas.items()):
        site = by_module.get(module)
        if site is None:
            problems.append(f"module {module!r} has no sparse-delta site in this graph (sites: {len(by_module)}; "
                            f"re-export with this adapter to add it)")
            continue
        pairs = np.asarray(delta.indices, dtype=np.int64)
        vals = np.ascontiguousarray(np.asarray(delta.values.detach().cpu() if hasattr(delta.values, "detach")
                                               else delta.values, dtype=np.float32))
        if pairs.size and (pairs.min() < 0 or pairs[0].max() >= site.out_features or pairs[1].max() >= site.in_features):
            problems.append(f"module {module!r}: indices reach ({int(pairs[0].max())}, {int(pairs[1].max())}) "
                            f"but the layer is (out={site.out_features}, in={site.in_features})")
            continue
        if site.out_features * site.in_features >= 2**31:
            problems.append(f"module {module!r}: {site.out_features}x{site.in_features} is too large for int32 indices")
            continue
        flat = (pairs[0] * site.in_features + pairs[1]).astype(np.int32)
        out[module] = (np.ascontiguousarray(flat), vals)
    if problems:
        raise ShiraInputError(f"{source}: adapter does not fit the exported graph:\n  " + "\n  ".join(problems))
    return AdapterArrays(out, short_fingerprint(fingerprint))


def write_adapter_file(path: Union[str, os.PathLike], arrays: AdapterArrays) -> Path:
    """Write atomically, then read the file back and compare (ORT keeps only native views of
    the arrays, so a freed array would be written as garbage: ANCHORS 3)."""
    import onnxruntime as ort

    path = Path(path)
    params = arrays.parameters()  # keeps every array alive until export_adapter returns
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(ADAPTER_SCHEMA)
    fmt.set_model_version(arrays.model_version)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    with atomic_path(path) as tmp:
        fmt.export_adapter(str(tmp))
        back = _read_params(tmp)
        if set(back) != set(params) or any(not np.array_equal(back[k], v) for k, v in params.items()):
            raise RuntimeError(f"{path}: the written adapter does not read back equal (onnxruntime AdapterFormat)")
    return path


def _read_params(path: Path) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    fmt = ort.AdapterFormat.read_adapter(str(path))
    return {k: np.array(v.numpy()) for k, v in fmt.get_parameters().items()}


def read_adapter_file(path: Union[str, os.PathLike], sites: Sequence[TargetSite], *,
                      fingerprint: str) -> AdapterArrays:
    """Read and validate a .onnx_adapter against a graph's sites and fingerprint."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ShiraInputError(f"{path}: adapter file not found")
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        params = {k: np.array(v.numpy()) for k, v in fmt.get_parameters().items()}
        version, model_version = fmt.get_adapter_version(), fmt.get_model_version()
    except Exception as exc:  # onnxruntime raises a bare RuntimeError on a bad flatbuffer
        raise ShiraInputError(f"{path}: not a readable .onnx_adapter file ({exc}); re-create it with "
                              f"`shira-export adapter`") from None
    expected = short_fingerprint(fingerprint)
    if model_version != expected:
        raise ShiraInputError(f"{path}: made for another graph (model_version {model_version}, this graph's "
                              f"fingerprint gives {expected}); convert the adapter for this graph with `shira-export adapter`")
    if version != ADAPTER_SCHEMA:
        raise ShiraInputError(f"{path}: adapter schema {version}, expected {ADAPTER_SCHEMA}")
    by_module = {s.module: s for s in sites}
    deltas: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    problems: list[str] = []
    for module, site in by_module.items():
        iname, vname = indices_name(module), values_name(module)
        if iname not in params and vname not in params:
            continue
        idx, vals = params.pop(iname, None), params.pop(vname, None)
        if idx is None or vals is None:
            problems.append(f"{iname if idx is None else vname}: missing (its pair is present)")
        elif idx.dtype != np.int32 or vals.dtype != np.float32 or idx.ndim != 1 or idx.shape != vals.shape:
            problems.append(f"{module}: expected int32 [nnz] indices and fp32 [nnz] values, found "
                            f"{idx.dtype}{list(idx.shape)} and {vals.dtype}{list(vals.shape)}")
        elif idx.size and (idx.min() < 0 or int(idx.max()) >= site.out_features * site.in_features):
            problems.append(f"{iname}: index {int(idx.max()) if idx.min() >= 0 else int(idx.min())} out of range "
                            f"[0, {site.out_features * site.in_features})")
        elif not np.isfinite(vals).all():
            problems.append(f"{vname}: NaN/Inf values")
        else:
            deltas[module] = (idx, vals)
    problems += [f"unexpected parameter {k!r} (not an input of this graph)" for k in sorted(params)]
    if problems:
        raise ShiraInputError(f"{path}: invalid adapter:\n  " + "\n  ".join(problems))
    return AdapterArrays(deltas, model_version)
