"""Measured int4 bit plan: which MatMuls can take 4 bits, decided from each layer's error.

4-bit rounding error differs a lot between layers (a BERT's outlier channels, the last
layers, attention projections of a random-weight decoder), so a fixed "last two thirds at
8 bits" both wastes bits and misses the sensitive ones. Here the fp32 graph is run once per
candidate with that MatMul's weight replaced by its 4-bit round-trip (the RTN blocks ORT's
MatMulNBits writes, `fake_quant`), on calibration inputs (quantize.calib, never the
verification set); the outputs' worst per-token cosine against fp32 is the layer's
sensitivity. Layers are then taken at 4 bits from the least sensitive (per weight) while the
whole set, all at once, keeps the worst cosine at or above the target; the rest stay 8 bit.

The weights become graph inputs of one ORT session, so each trial is one run, not a new
graph. The score per output: worst per-position cosine over real tokens (hidden states, LM
logits; also the mean-pooled sentence cosine for 3-D states) and, for [batch, labels]
classifier logits, the worst cosine of the probabilities (verify's metric for labels) and
the label agreement over every calibration row: with the default target (0.99) no row may
flip. On the MiniLM classifier, exempting near-ties (reference top-2 probabilities < 0.05
apart) let the plan take 86 % of the body to 4 bits and cost 8 of 48 labels on verify's
sentences; out-of-domain rows have margins down to 0.002, so any flip allowed on
calibration rows comes back as flips on other sentences.

"No calibration row flips" alone is luck on near-ties (a 0.005 logit margin flips or not
by the sign of the error), so classifiers are also judged by a predicted agreement on
unseen rows (`labels_predicted`): an unseen row with logit margin m flips
when the error moves its top-1 lead by more than m the wrong way. The calibration rows give
both distributions: their reference margins m_i and the trial's lead changes |d_j|; with the
error's sign even, the flip rate is 1/2 * P(m_i <= |d_j|) over all pairs (i, j). On the
MiniLM classifier this predicted 2.7 % flips at 14 % of the weights at 4 bits (1 of 90
unseen sentences flipped) and 4.2 % at 26 % (2 of 90); the plan keeps it within
`1 - plan_min_agreement` (0.97, the int4 label target).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from shira_export.artifacts.ir_edits import edited

__all__ = ["fake_quant", "label_scores", "WeightProbe", "Measured", "measure_plan"]

PREDICTED = "labels_predicted"  # a score judged against `agreement`, not the cosine target


def fake_quant(w: np.ndarray, *, bits: int, block_size: int, symmetric: bool) -> np.ndarray:
    """`w` [K, N] through MatMulNBits' blockwise RTN (blocks of `block_size` along K per
    column, as MLAS quantizes them) and back to float32."""
    k, n = w.shape
    pad = (-k) % block_size
    x = np.pad(w.astype(np.float32), ((0, pad), (0, 0))).reshape(-1, block_size, n)
    top = float(2**bits - 1)
    if symmetric:
        # the signed value of largest magnitude maps to -2^(bits-1)
        idx = np.abs(x).argmax(1)[:, None, :]
        big = np.take_along_axis(x, idx, 1)
        scale = big / -(2 ** (bits - 1))
        safe = np.where(scale == 0, 1.0, scale)
        q = np.clip(np.round(x / safe) + 2 ** (bits - 1), 0, top)
        out = (q - 2 ** (bits - 1)) * scale
    else:
        lo = np.minimum(x.min(1, keepdims=True), 0.0)
        hi = np.maximum(x.max(1, keepdims=True), 0.0)
        scale = (hi - lo) / top
        safe = np.where(scale == 0, 1.0, scale)
        zp = np.clip(np.round(-lo / safe), 0, top)
        q = np.clip(np.round(x / safe) + zp, 0, top)
        out = (q - zp) * scale
    return out.reshape(-1, n)[:k].astype(np.float32)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(den == 0, 1.0, num / np.maximum(den, 1e-300))


def _lead(logits: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Per row: logit of label `top` minus the best other label's."""
    rows = np.arange(len(logits))
    others = logits.astype(np.float64).copy()
    others[rows, top] = -np.inf
    return logits[rows, top].astype(np.float64) - others.max(-1)


def label_scores(ref: np.ndarray, cand: np.ndarray, *, predict: bool = True) -> dict[str, float]:
    """Classifier logits [rows, labels]: worst probability cosine, label agreement and (`predict`,
    given every calibration row at once) the predicted agreement on unseen rows (module doc)."""
    p, q = _softmax(ref), _softmax(cand)
    out = {"cosine": float(_cosine(p, q).min()), "labels": float((p.argmax(-1) == q.argmax(-1)).mean())}
    if predict and ref.shape[-1] >= 2:
        top = ref.argmax(-1)
        margin = _lead(ref, top)
        change = np.abs(_lead(cand, top) - margin)
        out["labels_predicted"] = 1.0 - 0.5 * float((margin[:, None] <= change[None, :]).mean())
    return out


def _score(ref: np.ndarray, cand: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Worst cosines of one output (see the module doc)."""
    if ref.ndim == 2:  # [batch, labels]: classifier logits
        return label_scores(ref, cand, predict=False)
    if ref.ndim == 3 and ref.shape[:2] == mask.shape:
        valid = mask.astype(bool)
        out = {"cosine": float(_cosine(ref[valid], cand[valid]).min())}
        w = mask[..., None].astype(np.float64)
        out["pooled"] = float(_cosine((ref * w).sum(1) / w.sum(1), (cand * w).sum(1) / w.sum(1)).min())
        return out
    return {"cosine": float(_cosine(ref.reshape(-1, ref.shape[-1]), cand.reshape(-1, cand.shape[-1])).min())}


class WeightProbe:
    """One fp32 session whose MatMul weights are inputs: `score({weight: array})` runs the
    calibration feeds with those weights replaced and returns the worst cosine over outputs."""

    def __init__(self, model: onnx.ModelProto, matmuls: Sequence[str], feeds: list[tuple[dict, np.ndarray]]):
        import onnxruntime as ort

        by_name = {n.name: n for n in model.graph.node}
        self.weight_of = {m: by_name[m].input[1] for m in matmuls}
        wanted = set(self.weight_of.values())
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        self.weights = {}
        with edited(probe) as view:  # each probed weight: an fp32 input instead of an initializer
            for name in sorted(wanted):
                value = view.graph.initializers.pop(name)
                self.weights[name] = np.asarray(value.const_value.numpy(), np.float32)  # type: ignore[union-attr]
                value.const_value = None
                value.type = ir.TensorType(ir.DataType.FLOAT)
                value.metadata_props.clear()
                view.graph.inputs.append(value)
        self.outputs = [o.name for o in probe.graph.output if not o.name.startswith("present")]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.feeds = feeds
        self.reference = [self.session.run(self.outputs, {**f, **self.weights}) for f, _ in feeds]

    def score(self, replaced: dict[str, np.ndarray]) -> dict[str, float]:
        """Worst 'cosine' (and 'pooled' where there are token states) over outputs and batches."""
        weights = {**self.weights, **replaced}
        worst: dict[str, float] = {}
        labels: dict[int, tuple[list, list]] = {}  # classifier outputs: judged over all rows at once
        for (feeds, mask), ref in zip(self.feeds, self.reference):
            for i, (r, c) in enumerate(zip(ref, self.session.run(self.outputs, {**feeds, **weights}))):
                if r.ndim == 2:
                    labels.setdefault(i, ([], []))[0].append(r)
                    labels[i][1].append(c)
                    continue
                for key, value in _score(r, c, mask).items():
                    worst[key] = min(worst.get(key, 1.0), value)
        for refs, cands in labels.values():
            for key, value in label_scores(np.concatenate(refs), np.concatenate(cands)).items():
                worst[key] = min(worst.get(key, 1.0), value)
        return worst


@dataclass
class Measured:
    """What the measured plan found (into the manifest via the plan_bits pass)."""

    four: tuple[str, ...]
    target: float
    score: dict  # the chosen set's worst cosines on the calibration inputs
    all_four_score: dict  # every candidate at 4 bits
    sensitivity: dict  # MatMul -> worst cosine with it alone at 4 bits
    coverage: float  # fraction of the candidates' weight elements at 4 bits
    trials: int
    reason: str = ""
    calibration: dict = field(default_factory=dict)
    agreement: Optional[float] = None  # classifiers: predicted agreement kept on unseen rows

    def to_json(self) -> dict:
        return {
            "target_cosine": self.target,
            "target_agreement": self.agreement,
            "chosen_4bit": list(self.four),
            "chosen_score": self.score,
            "all_4bit_score": self.all_four_score,
            "weight_fraction_4bit": round(self.coverage, 4),
            "trials": self.trials,
            "reason": self.reason,
            "calibration": self.calibration,
            "sensitivity": {k: round(v, 5) for k, v in self.sensitivity.items()},
        }


def measure_plan(
    probe: WeightProbe,
    candidates: Sequence[str],
    *,
    target: float,
    block_size: int,
    symmetric: bool,
    eight_bit: Sequence[str] = (),
    eight_block: Optional[int] = None,
    refine: int = 8,
    agreement: float = 0.0,
) -> Measured:
    """The largest set of `candidates` at 4 bits (least sensitive per weight first) whose
    joint worst cosine stays >= `target` and, for classifier outputs, whose predicted label
    agreement on unseen rows stays >= `agreement`; the MatMuls in `eight_bit` are at 8 bits throughout.
    Trials: one per candidate, one for all, a binary search over the sorted prefix, then up to
    `refine` single additions after the prefix (sensitivity is not exactly additive)."""
    w = probe.weights
    q4 = {m: fake_quant(w[probe.weight_of[m]], bits=4, block_size=block_size, symmetric=symmetric) for m in candidates}
    base = {
        probe.weight_of[m]: fake_quant(
            w[probe.weight_of[m]], bits=8, block_size=eight_block or block_size, symmetric=symmetric
        )
        for m in list(candidates) + list(eight_bit)
    }

    def run(four: Sequence[str]) -> dict[str, float]:
        return probe.score({**base, **{probe.weight_of[m]: q4[m] for m in four}})

    def worst(s: dict[str, float]) -> float:
        values = [v for k, v in s.items() if k != PREDICTED]
        return min(values) if values else 1.0

    def meets(s: dict[str, float]) -> bool:
        return worst(s) >= target and s.get(PREDICTED, 1.0) >= agreement

    trials = 0
    sensitivity = {}
    for m in candidates:
        sensitivity[m] = worst(run([m]))
        trials += 1
    size = {m: w[probe.weight_of[m]].size for m in candidates}
    # least error per weight element first: the most 4-bit weights for the error spent
    order = sorted(candidates, key=lambda m: (1.0 - sensitivity[m]) / size[m])
    all_four = run(order)
    trials += 1
    if meets(all_four):
        chosen, score = list(order), all_four
    else:
        lo, hi, score = 0, len(order), run([])  # largest prefix that meets the target (binary search)
        trials += 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            s = run(order[:mid])
            trials += 1
            if meets(s):
                lo, score = mid, s
            else:
                hi = mid
        chosen = order[:lo]
        for m in order[lo + 1 : lo + 1 + refine]:  # a later, cheaper layer may still fit
            s = run(chosen + [m])
            trials += 1
            if meets(s):
                chosen.append(m)
                score = s
    total = sum(size.values())
    coverage = sum(size[m] for m in chosen) / total if total else 0.0
    keep = set(chosen)
    return Measured(
        tuple(m for m in candidates if m in keep),
        target,
        {k: round(v, 5) for k, v in score.items()},
        {k: round(v, 5) for k, v in all_four.items()},
        sensitivity,
        coverage,
        trials,
        agreement=agreement if PREDICTED in all_four else None,
    )
