""".onnx_adapter files (onnxruntime's AdapterFormat) for a sparse export.

Parameters, per module `m` the adapter touches (modules it does not touch, and empty parts,
are left out: the graph's defaults are empty, i.e. no delta), in the two parts of
export.site_layout:

    shira.<m>.ell_indices  int32 [1, 1, K * out]  slot k of output feature j (at k * out + j): its input
    shira.<m>.ell_values   fp32  [1, 1, K * out]  feature and value (padding: index 0 / value 0.0)
    shira.<m>.indices      int32 [1, 1, nnz]      the rest: flat index out * in_features + in
    shira.<m>.values       fp32  [1, 1, nnz]      (PyTorch's (out, in) layout; repeats add up)

8 bytes per slot or entry; the ELL padding is bounded (site_layout.MAX_BYTES_PER_NONZERO).
The leading 1 is the graph's adapter-row axis (R = 1: one adapter for the whole batch; a
mixed batch feeds R = batch rows, see `batch_parameters`); the second is the tokens' axis the
decode gathers broadcast over. Schema 4 files have these shapes; schema 3 ([1, nnz] and
[1, K, out]) and 2 (scattered part only) are still read and fed in schema 4's shapes; schema 1
(1-D [nnz] arrays, before #18) is refused: re-export the adapter. The file's model_version is the graph's short fingerprint
(first 28 bits of the manifest's `base_fingerprint`), its adapter_version the format
schema; plain-onnxruntime users can compare `get_model_version()` themselves.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from shira_export._io import (
    atomic_path,
    confined,
    describe_path,
    folder_lock,
    run_owned_name,
    sha256_file,
    stale_siblings,
)
from shira_export.errors import ShiraInputError
from shira_export.export.graph_delta import TargetSite, adapter_input_names
from shira_export.export.site_layout import (
    MAX_BYTES_PER_NONZERO,
    SiteArrays,
    checked_part,
    graph_arrays,
    join,
    split,
)

__all__ = [
    "ADAPTER_SCHEMA",
    "AdapterArrays",
    "short_fingerprint",
    "adapter_arrays",
    "write_adapter_file",
    "read_adapter_file",
    "check_adapter_name",
    "max_file_bytes",
    "install_adapter_file",
    "RESERVED_NAMES",
    "batch_parameters",
]

ADAPTER_SCHEMA = 4  # 4: [1, 1, n] arrays; 3: [1, nnz] + [1, K, out] (read); 2: [1, nnz] only (read); 1: refused
_READABLE_SCHEMAS = (2, 3, 4)
SUFFIX = ".onnx_adapter"
# Reports call the model without an adapter "base": an adapter may not take that name.
RESERVED_NAMES = frozenset({"base"})
_NAME_BYTES = 180  # adapters/<name>.onnx_adapter plus our temp-name tag stays under NAME_MAX (255)
# Bytes a file of nnz nonzeros may take: the layout's bound per nonzero, names and flatbuffer
# tables per parameter.
_BYTES_PER_PARAM, _BYTES_FIXED = 1024, 65536


def max_file_bytes(nnz: int, n_params: int) -> int:
    """Upper bound on the size of a valid .onnx_adapter holding `nnz` nonzeros in `n_params`
    parameters: a larger file is refused before it is read."""
    return int(MAX_BYTES_PER_NONZERO * nnz) + _BYTES_PER_PARAM * n_params + _BYTES_FIXED


def short_fingerprint(fingerprint: str) -> int:
    """The part of the graph fingerprint that fits the format's int model_version."""
    return int(fingerprint[:7], 16)


@dataclass
class AdapterArrays:
    """An adapter in the graph's terms: module -> its site's two parts (site_layout.SiteArrays),
    with each module's in_features (to read the scattered part's flat indices)."""

    parts: dict[str, SiteArrays]
    in_features: dict[str, int]
    model_version: int = 0

    @classmethod
    def from_flat(
        cls,
        deltas: Mapping[str, tuple[np.ndarray, np.ndarray]],
        shapes: Mapping[str, tuple[int, int]],
        model_version: int = 0,
    ) -> "AdapterArrays":
        """From {module: (flat int32 indices, fp32 values)} and {module: (out, in)}: laid out by site_layout.split."""
        parts = {m: split(idx, vals, shapes[m][1], shapes[m][0]) for m, (idx, vals) in deltas.items()}
        return cls(parts, {m: int(shapes[m][1]) for m in deltas}, model_version)

    @property
    def deltas(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{module: (flat int32 indices, fp32 values)}: both parts as one list (a new array each call)."""
        return {m: join(part, self.in_features[m]) for m, part in self.parts.items()}

    @property
    def nnz(self) -> int:
        return int(sum(v.size for _, v in self.deltas.values()))

    @property
    def nbytes(self) -> int:
        return int(sum(part.nbytes for part in self.parts.values()))

    def parameters(self) -> dict[str, np.ndarray]:
        """The graph's inputs for this adapter alone, [1, 1, ...] views of `parts`
        (site_layout.graph_arrays); an empty part is left out (the graph's defaults add nothing)."""
        params: dict[str, np.ndarray] = {}
        for module, part in sorted(self.parts.items()):
            idx, vals, ell_idx, ell_vals = adapter_input_names(module)
            arrays = graph_arrays(part)
            if part.indices.size:
                params[idx], params[vals] = arrays[:2]
            if part.ell_indices.size:
                params[ell_idx], params[ell_vals] = arrays[2:]
        return params


def batch_parameters(rows: Sequence[Optional[AdapterArrays]], modules: Sequence[str]) -> dict[str, np.ndarray]:
    """Graph inputs for a mixed batch: row b of the batch uses `rows[b]` (None: the base model).

    Returns {input name: [B, ...] array} for every module in `modules` that some row
    touches, both parts with R = B, padded with index 0 / value 0.0 (a padding entry adds 0:
    a no-op) to the longest row's nnz and K (at least 1: the graph reads K from the ELL part's
    size); modules no row touches are left out (the graph's empty defaults: no delta)."""
    params: dict[str, np.ndarray] = {}
    for module in modules:
        parts = [r.parts.get(module) if r is not None else None for r in rows]
        present = [p for p in parts if p is not None]
        if not present:
            continue
        width = max(p.indices.size for p in present)
        k = max(1, max(p.ell_indices.shape[0] for p in present))
        out_f = present[0].ell_indices.shape[1]
        idx = np.zeros((len(rows), width), np.int32)
        vals = np.zeros((len(rows), width), np.float32)
        ell_idx = np.zeros((len(rows), k, out_f), np.int32)
        ell_vals = np.zeros((len(rows), k, out_f), np.float32)
        for b, part in enumerate(parts):
            if part is not None:
                idx[b, : part.indices.size], vals[b, : part.values.size] = part.indices, part.values
                n = part.ell_indices.shape[0]
                ell_idx[b, :n], ell_vals[b, :n] = part.ell_indices, part.ell_values
        names = adapter_input_names(module)
        rows_ = len(rows)
        shaped = (idx[:, None], vals[:, None], ell_idx.reshape(rows_, 1, -1), ell_vals.reshape(rows_, 1, -1))
        params.update(zip(names, shaped))
    return params


def check_adapter_name(name: str) -> str:
    """An adapter name becomes a file name under OUT_DIR/adapters/: no paths, no dots first."""
    ok = isinstance(name, str) and name and all(c.isalnum() or c in "-_." for c in name) and not name.startswith(".")
    if not ok or len(name) > 100 or len(name.encode("utf-8", "surrogatepass")) > _NAME_BYTES:
        raise ShiraInputError(
            f"adapter name {name!r}: expected 1-100 letters, digits, '-', '_' or '.' (at most {_NAME_BYTES} bytes "
            f"as UTF-8), not starting with '.' (it names the file adapters/<name>{SUFFIX} and must stay inside "
            f"the output folder)"
        )
    if name.lower() in RESERVED_NAMES:
        raise ShiraInputError(
            f"adapter name {name!r}: reserved (reports call the model without an adapter "
            f"{name.lower()!r}); choose another name"
        )
    return name


def adapter_arrays(
    deltas: Mapping[str, Any], sites: Sequence[TargetSite], *, source: str, fingerprint: str, unused: Sequence[str] = ()
) -> AdapterArrays:
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
            problems.append(
                f"module {module!r} has no sparse-delta site in this graph (sites: {len(by_module)}; "
                f"re-export with this adapter to add it)"
            )
            continue
        pairs = np.asarray(delta.indices, dtype=np.int64)
        vals = np.ascontiguousarray(
            np.asarray(
                delta.values.detach().cpu() if hasattr(delta.values, "detach") else delta.values, dtype=np.float32
            )
        )
        if pairs.size and (
            pairs.min() < 0 or pairs[0].max() >= site.out_features or pairs[1].max() >= site.in_features
        ):
            problems.append(
                f"module {module!r}: indices reach ({int(pairs[0].max())}, {int(pairs[1].max())}) "
                f"but the layer is (out={site.out_features}, in={site.in_features})"
            )
            continue
        if site.out_features * site.in_features >= 2**31:
            problems.append(f"module {module!r}: {site.out_features}x{site.in_features} is too large for int32 indices")
            continue
        flat = (pairs[0] * site.in_features + pairs[1]).astype(np.int32)
        out[module] = (np.ascontiguousarray(flat), vals)
    if problems:
        raise ShiraInputError(f"{source}: adapter does not fit the exported graph:\n  " + "\n  ".join(problems))
    shapes = {m: (by_module[m].out_features, by_module[m].in_features) for m in out}
    return AdapterArrays.from_flat(out, shapes, short_fingerprint(fingerprint))


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
        try:
            fmt.export_adapter(str(tmp))
        except RuntimeError as exc:  # onnxruntime reports a failed write as a bare RuntimeError
            need = sum(v.nbytes for v in params.values())
            if shutil.disk_usage(tmp.parent).free < need:
                raise OSError(errno.ENOSPC, f"no space left to write {need} bytes ({exc})", str(path)) from None
            raise
        back = _read_params(tmp)
        if set(back) != set(params) or any(not np.array_equal(back[k], v) for k, v in params.items()):
            raise RuntimeError(f"{path}: the written adapter does not read back equal (onnxruntime AdapterFormat)")
    return path


def install_adapter_file(
    folder: Union[str, os.PathLike], name: str, arrays: AdapterArrays, *, source: str, overwrite: bool = False
) -> Path:
    """Write `folder/adapters/<name>.onnx_adapter` and record it (with its sha256) in the
    folder's manifest, under the folder's lock, so concurrent writers are serialized and
    none loses another's entry. On any error (a full disk included) the folder is left as
    it was: a new file is removed, a replaced one put back. `adapters/` must be a real
    folder inside `folder` (a symlink out of it is refused)."""
    from shira_export.export.manifest import ADAPTER_DIR, adapter_entry, read_sparse_manifest

    with folder_lock(folder):
        manifest = read_sparse_manifest(folder)  # again, under the lock: another writer may have added one
        if arrays.model_version != short_fingerprint(manifest.base_fingerprint):
            raise ShiraInputError(
                f"{manifest.folder}: the graph changed while the adapter was converted (fingerprint); run again"
            )
        rel = f"{ADAPTER_DIR}/{name}{SUFFIX}"
        adapters = manifest.folder / ADAPTER_DIR
        if adapters.is_symlink() or (adapters.exists() and not adapters.is_dir()):
            raise ShiraInputError(
                f"{adapters}: is a symlink or not a folder; refusing to write adapters through it "
                f"(it could point outside {manifest.folder})"
            )
        target = confined(manifest.folder, rel, what=f"adapter {name!r}")
        if target.is_symlink():
            raise ShiraInputError(f"{target}: is a symlink; refusing to write through it")
        if name in manifest.adapters and not overwrite:
            raise ShiraInputError(
                f"{target}: adapter {name!r} exists (pass overwrite=True / --overwrite to replace it)"
            )
        adapters.mkdir(exist_ok=True)
        for stale, kind in stale_siblings(target):  # a run killed before its manifest write
            if kind == "old":  # the file the manifest still describes: put it back
                os.replace(stale, target)
            else:
                stale.unlink(missing_ok=True)
        # A file the manifest does not list is debris of a run killed before its manifest
        # write; replacing it loses nothing. A listed one is kept (hard link) until we succeed.
        backup = None
        if target.exists() and name in manifest.adapters:
            backup = run_owned_name(target, "old")
            os.link(target, backup)
        try:
            write_adapter_file(target, arrays)
            manifest.adapters[name] = adapter_entry(manifest.folder, rel, source, arrays.nnz)
            manifest.write()
        except BaseException:
            if backup is not None:
                os.replace(backup, target)
            else:
                target.unlink(missing_ok=True)
            raise
        if backup is not None:
            backup.unlink()
    return target


def _read_params(path: Path) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    fmt = ort.AdapterFormat.read_adapter(str(path))
    return {k: np.array(v.numpy()) for k, v in fmt.get_parameters().items()}


def read_adapter_file(
    path: Union[str, os.PathLike],
    sites: Sequence[TargetSite],
    *,
    fingerprint: str,
    sha256: Optional[str] = None,
    nnz: Optional[int] = None,
) -> AdapterArrays:
    """Read and validate a .onnx_adapter against a graph's sites and fingerprint. With
    `sha256` (the manifest's record) a file that changed since it was written is refused;
    a file larger than a valid one of `nnz` nonzeros (default: every site full) is refused
    before it is read."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ShiraInputError(f"{path}: adapter file {describe_path(path, want='file')}")
    bound = max_file_bytes(
        nnz if nnz is not None else sum(s.out_features * s.in_features for s in sites), 4 * len(sites)
    )
    size = path.stat().st_size
    if size > bound:
        raise ShiraInputError(
            f"{path}: {size} bytes, more than a valid adapter file of "
            f"{'its ' + str(nnz) if nnz is not None else 'at most this graph'}'s nonzeros can "
            f"take ({bound} bytes); refused without reading it"
        )
    if sha256 is not None:
        found = sha256_file(path)
        if found != sha256:
            raise ShiraInputError(
                f"{path}: sha256 {found} differs from the manifest's {sha256} (the file changed "
                f"or is damaged since it was written); re-create it with `shira-export adapter "
                f"--overwrite`"
            )
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        params = {k: np.array(v.numpy()) for k, v in fmt.get_parameters().items()}
        version, model_version = fmt.get_adapter_version(), fmt.get_model_version()
    except Exception as exc:  # onnxruntime raises a bare RuntimeError on a bad flatbuffer
        raise ShiraInputError(
            f"{path}: not a readable .onnx_adapter file ({exc}); re-create it with `shira-export adapter`"
        ) from None
    expected = short_fingerprint(fingerprint)
    if model_version != expected:
        raise ShiraInputError(
            f"{path}: made for another graph (model_version {model_version}, this graph's "
            f"fingerprint gives {expected}); convert the adapter for this graph with `shira-export adapter`"
        )
    if version not in _READABLE_SCHEMAS:
        older = " (1-D arrays from a release before the mixed-batch graph)" if version == 1 else ""
        raise ShiraInputError(
            f"{path}: adapter schema {version}{older}, expected one of {list(_READABLE_SCHEMAS)}; re-export it "
            f"(`shira-export sparse` again, or `shira-export adapter --graph <folder> --adapter "
            f"<adapter dir> --overwrite` with a graph of this release)"
        )
    parts: dict[str, SiteArrays] = {}
    problems: list[str] = []
    by_module = {s.module: s for s in sites}
    for module, site in by_module.items():
        names = adapter_input_names(module)
        if not any(n in params for n in names):
            continue
        given = [params.pop(n, None) for n in names]
        part = checked_part(module, site.out_features, site.in_features, names, given, problems, schema=version)
        if part is not None:
            parts[module] = part
    problems += [f"unexpected parameter {k!r} (not an input of this graph)" for k in sorted(params)]
    if problems:
        raise ShiraInputError(f"{path}: invalid adapter:\n  " + "\n  ".join(problems))
    return AdapterArrays(parts, {m: by_module[m].in_features for m in parts}, model_version)
