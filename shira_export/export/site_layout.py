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
valid: every slot names its row by its position and its column by its value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SiteArrays", "split", "join", "MAX_BYTES_PER_NONZERO"]

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
