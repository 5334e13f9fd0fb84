"""export.site_layout: one module's delta in two parts (ELL slots per output row + scattered
entries). Round trips, the byte bound, the choice of K on uniform and skewed masks."""

from __future__ import annotations

import numpy as np
import pytest

from shira_export.export.site_layout import MAX_BYTES_PER_NONZERO, join, split


def _dense(flat: np.ndarray, vals: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size, np.float64)
    np.add.at(out, flat.astype(np.int64), vals.astype(np.float64))
    return out


@pytest.mark.parametrize("in_f,out_f,r", [(768, 768, 8), (768, 768, 32), (768, 3072, 4), (3072, 768, 8), (64, 16, 1)])
def test_random_masks_round_trip_within_the_byte_bound(in_f, out_f, r):
    rng = np.random.default_rng(r)
    nnz = r * (in_f + out_f)
    flat = rng.choice(in_f * out_f, nnz, replace=False).astype(np.int32)
    vals = rng.standard_normal(nnz).astype(np.float32)
    site = split(flat, vals, in_f, out_f)
    assert site.ell_indices.shape[1] == out_f and site.ell_indices.dtype == np.int32
    assert site.nbytes <= MAX_BYTES_PER_NONZERO * nnz
    back_idx, back_vals = join(site, in_f)
    assert back_idx.size == nnz  # padding is dropped again
    assert np.array_equal(_dense(back_idx, back_vals, in_f * out_f), _dense(flat, vals, in_f * out_f))
    if r >= 8:  # rows of >= 10 entries on average: most of the delta is in the scatter-free part
        assert site.ell_indices.shape[0] > 0 and site.indices.size < 0.1 * nnz


def test_skewed_mask_stays_scattered_and_duplicates_add():
    in_f, out_f = 256, 128
    rows = np.repeat([3, 70], in_f)  # two dense rows: ELL padding would be 64x the entries
    flat = (rows * in_f + np.tile(np.arange(in_f), 2)).astype(np.int32)
    flat = np.concatenate([flat, flat[:5]])  # repeated positions add up
    vals = np.arange(flat.size, dtype=np.float32)
    site = split(flat, vals, in_f, out_f)
    assert site.ell_indices.shape == (0, out_f) and site.indices.size == flat.size
    for k in (1, 3, in_f + 1):  # any K is exact, duplicates included
        forced = split(flat, vals, in_f, out_f, k=k)
        assert np.array_equal(_dense(*join(forced, in_f), in_f * out_f), _dense(flat, vals, in_f * out_f))


def test_empty_and_explicit_slots():
    empty = split(np.zeros(0, np.int32), np.zeros(0, np.float32), 8, 4)
    assert empty.ell_indices.shape == (0, 4) and empty.indices.size == 0 and empty.nbytes == 0
    site = split(
        np.array([1 * 8 + 5, 1 * 8 + 2, 3 * 8 + 7], np.int32), np.array([1.0, 2.0, 3.0], np.float32), 8, 4, k=1
    )
    # slot 0 of row 1 is its first entry (input 5), row 3 holds input 7; row 1's second goes scattered
    assert site.ell_indices.tolist() == [[0, 5, 0, 7]] and site.ell_values.tolist() == [[0.0, 1.0, 0.0, 3.0]]
    assert site.indices.tolist() == [1 * 8 + 2] and site.values.tolist() == [2.0]
