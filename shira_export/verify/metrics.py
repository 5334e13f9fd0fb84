"""Difference metrics between a reference output and a candidate output.

An `OutputDiff` accumulates one output (e.g. "logits") over several input batches and
then reports every metric at once, with where the worst difference was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from shira_export.artifacts.tasks import Compare

__all__ = ["ArgmaxKind", "OutputDiff", "greedy_prefix_lengths", "FLOAT_METRICS"]

_REL_FLOOR = 1e-6  # |ref| below this counts as this, so max_rel stays finite near zero
_SAMPLE_CAP = 1_000_000  # abs diffs kept for the histogram

FLOAT_METRICS = (
    "max_abs",
    "max_rel",
    "mean_abs",
    "p50_abs",
    "p90_abs",
    "p99_abs",
    "cosine",
    "nan_count",
    "inf_count",
    "pooled_cosine",
)


# what agreement of an output's last-axis argmax means: the task table's Compare
ArgmaxKind = Compare


@dataclass
class _Worst:
    value: float = -1.0
    input: str = ""
    index: tuple = ()
    ref: float = 0.0
    cand: float = 0.0


@dataclass
class OutputDiff:
    """Accumulated comparison of one output across input batches."""

    output: str
    argmax: ArgmaxKind = ArgmaxKind.NONE
    pooled: bool = (
        False  # [batch, tokens, features] states: also the worst mean-pooled row cosine (sentence embeddings)
    )
    _abs: list = field(default_factory=list)
    _pooled_cos: list = field(default_factory=list)
    _cos: list = field(default_factory=list)
    _max_rel: float = 0.0
    _nan: int = 0
    _inf: int = 0
    _agree: int = 0
    _positions: int = 0
    _per_input: dict = field(default_factory=dict)
    _worst: _Worst = field(default_factory=_Worst)

    def add(self, input_name: str, ref: np.ndarray, cand: np.ndarray, mask: Optional[np.ndarray] = None) -> None:
        """Compare `cand` with `ref` (same shape, last axis = features); `mask` picks positions."""
        if ref.shape != cand.shape:
            raise ValueError(f"{self.output}: shape {list(cand.shape)} != reference {list(ref.shape)}")
        ref = np.asarray(ref, dtype=np.float64)
        cand = np.asarray(cand, dtype=np.float64)
        if self.pooled and ref.ndim == 3:
            weights = (np.ones(ref.shape[:2]) if mask is None else mask.astype(np.float64))[..., None]
            a, b = (ref * weights).sum(1) / weights.sum(1), (cand * weights).sum(1) / weights.sum(1)
            self._pooled_cos.append(
                (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-300)
            )
        if mask is not None:
            ref, cand = ref[mask.astype(bool)], cand[mask.astype(bool)]
            index_of = np.argwhere(mask.astype(bool))
        else:
            index_of = None
        ref2 = ref.reshape(-1, ref.shape[-1]) if ref.ndim else ref.reshape(1, 1)
        cand2 = cand.reshape(-1, cand.shape[-1]) if cand.ndim else cand.reshape(1, 1)
        self._nan += int(np.isnan(cand2).sum())
        self._inf += int(np.isinf(cand2).sum())
        finite = np.isfinite(cand2) & np.isfinite(ref2)
        diff = np.abs(cand2 - ref2)
        diff_finite = diff[finite]
        self._abs.append(diff_finite.astype(np.float32))
        if diff_finite.size:
            rel = diff_finite / np.maximum(np.abs(ref2[finite]), _REL_FLOOR)
            self._max_rel = max(self._max_rel, float(rel.max()))
            masked = np.where(finite, diff, -1.0)
            flat = int(np.argmax(masked))
            row, col = divmod(flat, diff.shape[1])
            self._per_input[input_name] = float(diff_finite.max())
            if masked.flat[flat] > self._worst.value:
                index = (
                    tuple(int(i) for i in index_of[row])
                    if index_of is not None
                    else np.unravel_index(row, ref.shape[:-1])
                )
                self._worst = _Worst(
                    float(masked.flat[flat]),
                    input_name,
                    tuple(int(i) for i in index) + (int(col),),
                    float(ref2[row, col]),
                    float(cand2[row, col]),
                )
        else:
            self._per_input[input_name] = float("nan")
        # cosine per position: a global cosine hides one bad row among many good ones
        ref_c, cand_c = np.where(finite, ref2, 0.0), np.where(finite, cand2, 0.0)
        if self.argmax is ArgmaxKind.LABEL:
            # a classifier's logits are defined up to a constant per row (softmax ignores it), so
            # their raw cosine is not a property of the classifier (and blows up near zero logits,
            # e.g. 0.98 for a 0.03 error on a row of norm 0.11): compare its probabilities
            ref_c, cand_c = _softmax(ref_c), _softmax(cand_c)
        dot = (ref_c * cand_c).sum(-1)
        norms = np.linalg.norm(ref_c, axis=-1) * np.linalg.norm(cand_c, axis=-1)
        both_zero = (np.linalg.norm(ref_c, axis=-1) == 0) & (np.linalg.norm(cand_c, axis=-1) == 0)
        cos = np.where(both_zero, 1.0, dot / np.maximum(norms, 1e-300))
        cos = np.where(finite.all(-1), cos, np.nan)  # a row with NaN/Inf has no cosine
        self._cos.append(cos)
        if self.argmax is not ArgmaxKind.NONE:
            agree = np.argmax(np.where(np.isnan(ref2), -np.inf, ref2), -1) == np.argmax(
                np.where(np.isnan(cand2), -np.inf, cand2), -1
            )
            self._agree += int(agree.sum())
            self._positions += int(agree.size)

    def metrics(self) -> dict[str, float]:
        diffs = np.concatenate(self._abs) if self._abs else np.zeros(0, np.float32)
        cos = np.concatenate(self._cos) if self._cos else np.zeros(0)
        if diffs.size:
            p50, p90, p99 = (float(v) for v in np.percentile(diffs, [50, 90, 99]))
            out = {
                "max_abs": float(diffs.max()),
                "max_rel": self._max_rel,
                "mean_abs": float(diffs.mean()),
                "p50_abs": p50,
                "p90_abs": p90,
                "p99_abs": p99,
            }
        else:
            out = dict.fromkeys(("max_abs", "max_rel", "mean_abs", "p50_abs", "p90_abs", "p99_abs"), float("nan"))
        out["cosine"] = float(cos.min()) if cos.size and not np.isnan(cos).any() else float("nan")
        out["nan_count"] = float(self._nan)
        out["inf_count"] = float(self._inf)
        if self.argmax is not ArgmaxKind.NONE:
            out[self.argmax.value] = self._agree / self._positions if self._positions else float("nan")
        if self._pooled_cos:
            pooled = np.concatenate(self._pooled_cos)
            out["pooled_cosine"] = float(pooled.min()) if not np.isnan(pooled).any() else float("nan")
        return out

    def details(self) -> dict:
        w = self._worst
        worst = {"input": w.input, "index": list(w.index), "reference": w.ref, "candidate": w.cand} if w.input else None
        return {
            "worst": worst,
            "max_abs_per_input": dict(self._per_input),
            "positions": int(sum(c.size for c in self._cos)),
        }

    def abs_sample(self) -> np.ndarray:
        """Finite abs differences (subsampled past a million values) for histograms."""
        diffs = np.concatenate(self._abs) if self._abs else np.zeros(0, np.float32)
        if diffs.size > _SAMPLE_CAP:
            diffs = np.random.default_rng(0).choice(diffs, _SAMPLE_CAP, replace=False)
        return diffs


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def greedy_prefix_lengths(ref_tokens: np.ndarray, cand_tokens: np.ndarray) -> list[int]:
    """Per row, how many leading generated tokens are identical."""
    lengths = []
    for ref_row, cand_row in zip(np.asarray(ref_tokens), np.asarray(cand_tokens)):
        n = min(len(ref_row), len(cand_row))
        mismatch = np.nonzero(ref_row[:n] != cand_row[:n])[0]
        lengths.append(int(mismatch[0]) if mismatch.size else n)
    return lengths
