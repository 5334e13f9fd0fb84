"""How one module's sparse delta is laid out for its graph site (export.delta_sites).

A delta of nnz entries (flat index out * in_features + in, value) goes in two parts:

    ELL        int32 / fp32 [K, out]: slot k of output feature j holds one entry of row j
               (its input feature and value); rows with fewer than K entries are padded
               with index 0 / value 0.0 (adds 0: a no-op)
    scattered  int32 / fp32 [nnz']: the entries beyond the K-th of their row, as flat indices

At decode the ELL part costs a gather, a product and a sum over K (about 2 ns per slot on
onnxruntime's CPU kernels), the scattered part a gather and a ScatterElements (about 9 ns
per entry): docs/sparse_format.md. `split` picks K per module from the row counts: the K
minimizing that cost, among those whose file stays within `max_bytes_per_nonzero` (8 bytes
per slot or entry; the default allows 25 % padding). K = 0 (every entry scattered) is the
fallback a skewed mask gets, e.g. a few dense rows. Any arrangement the graph is fed is
valid: every slot names its row by its position and its column by its value. The graph
reads both parts flat, with an adapter-row and a token axis in front (`graph_arrays`:
[1, 1, K * out] and [1, 1, nnz'], schema 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = ["SiteArrays", "split", "join", "checked_part", "graph_arrays", "MAX_BYTES_PER_NONZERO"]

MAX_BYTES_PER_NONZERO = 10.0
# Decode cost per ELL slot and per scattered entry, ns, onnxruntime 1.32 CPU (tools/bench_site.py
# --only new: GatherElements + Mul + ReduceSum + Expand against GatherElements + Mul + ScatterElements).
_NS_PER_SLOT, _NS_PER_SCATTERED = 2.0, 8.0


@dataclass(frozen=True)
class SiteArrays:
    """One module's delta as its site's inputs, without the leading adapter-row axis."""

    ell_indices: np.ndarray  # int32 [K, out]
    ell_values: np.ndarray  # fp32 [K, out]
    indices: np.ndarray  # int32 [nnz'] flat
    values: np.ndarray  # fp32 [nnz']

    @property
    def nbytes(self) -> int:
        return int(self.ell_indices.nbytes + self.ell_values.nbytes + self.indices.nbytes + self.values.nbytes)


def _choose_k(counts: np.ndarray, nnz: int, max_bytes_per_nonzero: float) -> int:
    """The K of least modelled decode time whose slots + scattered entries fit the byte budget."""
    out_f = counts.size
    if nnz == 0:
        return 0
    ks = np.arange(int(counts.max()) + 1)
    # entries beyond a row's K-th, for every K at once: nnz - sum over t < K of #rows with more than t
    hist = np.bincount(counts, minlength=ks.size)
    more_than = out_f - np.cumsum(hist)  # [t]: rows with c > t
    beyond = nnz - np.concatenate([[0], np.cumsum(more_than)[:-1]])
    slots = ks * out_f
    fits = 8 * (slots + beyond) <= max_bytes_per_nonzero * nnz
    cost = np.where(fits, _NS_PER_SLOT * slots + _NS_PER_SCATTERED * beyond, np.inf)
    return int(np.argmin(cost))  # K = 0 always fits: 8 bytes per entry


def split(
    flat: np.ndarray,
    values: np.ndarray,
    in_features: int,
    out_features: int,
    *,
    max_bytes_per_nonzero: float = MAX_BYTES_PER_NONZERO,
    k: int | None = None,
) -> SiteArrays:
    """Lay out one module's delta (flat int indices, fp32 values) for its site. Entries keep
    their order within a row (a row's first K go to the ELL part); repeated positions stay
    repeated (both parts add)."""
    flat = np.asarray(flat).reshape(-1).astype(np.int64)
    values = np.asarray(values, np.float32).reshape(-1)
    rows = flat // in_features
    counts = np.bincount(rows, minlength=out_features) if flat.size else np.zeros(out_features, np.int64)
    if k is None:
        k = _choose_k(counts, int(flat.size), max_bytes_per_nonzero)
    order = np.argsort(rows, kind="stable")
    rows_sorted = rows[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    slot = np.arange(flat.size) - starts[rows_sorted]
    in_ell = slot < k
    ell_indices = np.zeros((k, out_features), np.int32)
    ell_values = np.zeros((k, out_features), np.float32)
    picked = order[in_ell]
    ell_indices[slot[in_ell], rows_sorted[in_ell]] = (flat[picked] - rows_sorted[in_ell] * in_features).astype(np.int32)
    ell_values[slot[in_ell], rows_sorted[in_ell]] = values[picked]
    rest = np.sort(order[~in_ell])  # the scattered part keeps the input's order
    return SiteArrays(ell_indices, ell_values, flat[rest].astype(np.int32), values[rest].copy())


def join(site: SiteArrays, in_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Both parts as one flat list (int32 indices, fp32 values): ELL slots row by row, then
    the scattered entries. Padding slots (index 0, value 0.0) are left out; a real entry
    of value 0.0 at index 0 adds nothing either."""
    k, out_f = site.ell_indices.shape
    keep = (site.ell_indices != 0) | (site.ell_values != 0)
    keep_t = keep.T  # row-major over (row, slot)
    rows = np.broadcast_to(np.arange(out_f)[:, None], (out_f, k))[keep_t]
    cols = site.ell_indices.T[keep_t].astype(np.int64)
    flat = np.concatenate([rows.astype(np.int64) * in_features + cols, site.indices.astype(np.int64)])
    vals = np.concatenate([site.ell_values.T[keep_t], site.values]).astype(np.float32)
    return flat.astype(np.int32), vals


def graph_arrays(part: SiteArrays) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The site's four inputs for one adapter (R = 1), as the graph reads them (schema 4):
    indices / values [1, 1, nnz], ell_indices / ell_values [1, 1, K * out] (slot k of output
    feature j at k * out + j): views, no copies."""
    return (
        part.indices.reshape(1, 1, -1),
        part.values.reshape(1, 1, -1),
        part.ell_indices.reshape(1, 1, -1),
        part.ell_values.reshape(1, 1, -1),
    )


def _as_schema3(
    module: str, out_f: int, found: Sequence[Optional[np.ndarray]], problems: list[str]
) -> list[Optional[np.ndarray]]:
    """Schema 4's [1, 1, nnz] / [1, 1, K * out] arrays as schema 3's [1, nnz] / [1, K, out]
    (views), so one set of checks reads both."""
    idx, vals, ell_idx, ell_vals = found
    out: list[Optional[np.ndarray]] = []
    for a, ell in ((idx, False), (vals, False), (ell_idx, True), (ell_vals, True)):
        if a is None:
            out.append(None)
        elif a.ndim != 3 or a.shape[:2] != (1, 1) or (ell and (a.size == 0 or a.size % out_f)):
            want = f"[1, 1, K * {out_f}] with K >= 1" if ell else "[1, 1, nnz]"
            problems.append(f"{module}: expected {want} arrays, found {a.dtype}{list(a.shape)}")
            return [None] * 4
        else:
            out.append(a.reshape(1, -1, out_f) if ell else a.reshape(1, -1))
    return out


def checked_part(
    module: str,
    out_f: int,
    in_f: int,
    names: Sequence[str],
    found: Sequence[Optional[np.ndarray]],
    problems: list[str],
    schema: int = 4,
) -> Optional[SiteArrays]:
    """One module's four parameters as read from a file ([1, ...] arrays, None where absent;
    `schema` 4: graph_arrays' shapes, 2-3: [1, nnz] and [1, K, out]) as a SiteArrays, or None
    with what is wrong appended to `problems`."""
    before = len(problems)
    if schema >= 4:
        found = _as_schema3(module, out_f, found, problems)
        if len(problems) > before:
            return None
    idx, vals, ell_idx, ell_vals = found
    for (a, b), (na, nb) in (((idx, vals), names[:2]), ((ell_idx, ell_vals), names[2:])):
        if (a is None) != (b is None):
            problems.append(f"{na if a is None else nb}: missing (its pair is present)")
    if len(problems) > before:
        return None
    if idx is None:
        idx, vals = np.zeros((1, 0), np.int32), np.zeros((1, 0), np.float32)
    if ell_idx is None:
        ell_idx, ell_vals = np.zeros((1, 0, out_f), np.int32), np.zeros((1, 0, out_f), np.float32)
    assert vals is not None and ell_vals is not None
    if (
        idx.dtype != np.int32
        or vals.dtype != np.float32
        or idx.ndim != 2
        or idx.shape[0] != 1
        or idx.shape != vals.shape
    ):
        problems.append(
            f"{module}: expected int32 [1, nnz] indices and fp32 [1, nnz] values, found "
            f"{idx.dtype}{list(idx.shape)} and {vals.dtype}{list(vals.shape)}"
        )
    elif (
        ell_idx.dtype != np.int32
        or ell_vals.dtype != np.float32
        or ell_idx.ndim != 3
        or ell_idx.shape[0] != 1
        or ell_idx.shape[2] != out_f
        or ell_idx.shape != ell_vals.shape
    ):
        problems.append(
            f"{module}: expected int32 [1, K, {out_f}] ell_indices and fp32 [1, K, {out_f}] ell_values, found "
            f"{ell_idx.dtype}{list(ell_idx.shape)} and {ell_vals.dtype}{list(ell_vals.shape)}"
        )
    elif idx.size and (idx.min() < 0 or int(idx.max()) >= out_f * in_f):
        problems.append(
            f"{names[0]}: index {int(idx.max()) if idx.min() >= 0 else int(idx.min())} out of range [0, {out_f * in_f})"
        )
    elif ell_idx.size and (ell_idx.min() < 0 or int(ell_idx.max()) >= in_f):
        problems.append(
            f"{names[2]}: input feature {int(ell_idx.max()) if ell_idx.min() >= 0 else int(ell_idx.min())} "
            f"out of range [0, {in_f})"
        )
    elif not (np.isfinite(vals).all() and np.isfinite(ell_vals).all()):
        problems.append(f"{names[1] if not np.isfinite(vals).all() else names[3]}: NaN/Inf values")
    else:  # Python callers get the parts without the adapter-row axis
        return SiteArrays(ell_idx[0], ell_vals[0], idx.reshape(-1), vals.reshape(-1))
    return None
