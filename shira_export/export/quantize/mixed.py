"""Which MatMul gets how many bits: the bit plan of one graph.

int8: every constant-weight MatMul at 8 bits. int4 (default, `plan="measured"`): the MatMuls
writing a graph output at `head_bits` (8), and of the body the largest set whose 4-bit
error, measured on calibration inputs, keeps the outputs' worst cosine at or above the
target (`plan_min_cosine`, else by output kind: `plan_target`) and a classifier's
predicted label agreement at or above `plan_min_agreement` (quantize.measure); the rest at 8 bits. When the graph's inputs cannot be
fed (quantize.calib) the fixed plan below is used and the reason recorded.

int4 with `plan="fixed"`: 4 bits, except
- the MatMuls that write a graph output (an LM head, a classifier): `head_bits` (8). They
  feed no later layer but decide the argmax directly, and a tied head shares its blocks
  with the embedding table (quantize.tied), so its width is the table's too; on the demo
  OPT the 4-bit tied head alone dropped the logits' worst cosine to 0.93;
- the last `int8_tail` of the body MatMuls in graph order (the exported graphs are
  topologically sorted, so order follows depth): 4-bit rounding error compounds through
  the layers, so the last layers cost the most. On MiniLM (block 32, RTN) one layer's
  MatMuls alone at 4 bits give a worst sentence-embedding cosine of 0.998 for layer 0 and
  0.988 for layer 5. On the built-in multilingual sentences (verify.sentences; short and
  non-Latin ones are the hardest) the worst mean-pooled cosine with 8-bit tables was 0.956
  for the last third at 8 bits, 0.975 for half, 0.981 for two thirds (the default; 0.274x
  fp32 vs 0.291x for int8), so two thirds is the smallest tail that meets 0.98.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import onnx

from shira_export.export.quantize import graph as qgraph
from shira_export.export.quantize.options import (
    DEFAULT_PLAN_COSINE,
    EMBEDDING_PLAN_COSINE,
    PlanMethod,
    QuantizeOptions,
    QuantMode,
)

__all__ = ["BitPlan", "plan_bits", "plan_target", "label_outputs"]


@dataclass(frozen=True)
class BitPlan:
    """MatMul node names per width, in graph order."""

    four: tuple[str, ...] = ()
    eight: tuple[str, ...] = ()
    heads: tuple[str, ...] = field(default=())  # graph-output MatMuls (in `four` or `eight`)
    tail: tuple[str, ...] = field(default=())  # body MatMuls moved to 8 bits by int8_tail
    first: tuple[str, ...] = field(default=())  # body MatMuls moved to 8 bits by int8_first
    method: str = "fixed"  # "measured" | "fixed" (int8: every MatMul at 8 bits)
    measured: Optional[dict] = None  # quantize.measure.Measured.to_json(), or why it fell back
    weight_fraction_4bit: float = 0.0  # of the body's (non-head) MatMul weight elements

    def to_json(self) -> dict:
        out = {
            "method": self.method,
            "matmuls_4bit": len(self.four),
            "matmuls_8bit": len(self.eight),
            "heads": list(self.heads),
            "weight_fraction_4bit": round(self.weight_fraction_4bit, 4),
        }
        if self.method == "fixed":
            out.update(tail_8bit=len(self.tail), first_8bit=len(self.first))
        if self.measured is not None:
            out["measured"] = self.measured
        return out

    def summary(self) -> str:
        """One line for the export's output."""
        body = len(self.four) + len(self.eight) - len(self.heads)
        four_body = len([n for n in self.four if n not in self.heads])
        line = (
            f"int4 plan ({self.method}): {four_body} of {body} body MatMuls at 4 bits "
            f"({self.weight_fraction_4bit:.0%} of their weights), the rest and {len(self.heads)} output "
            f"MatMul(s) at {'4' if self.heads and self.heads[0] in self.four else '8'} bits"
        )
        m = self.measured or {}
        if "target_cosine" in m:
            line += (
                f"; calibration worst cosine {_worst(m['chosen_score']):.4f} >= {m['target_cosine']} "
                f"(all 4-bit: {_worst(m['all_4bit_score']):.4f})"
            )
        predicted = m.get("chosen_score", {}).get("labels_predicted")
        if predicted is not None:  # classifiers: what the calibration rows predict for unseen ones
            line += (
                f"; predicted label agreement on unseen rows {predicted:.3f} >= {m['target_agreement']} "
                f"(from the calibration margins; near-ties can still flip, docs/quantize.md)"
            )
        if m.get("reason"):
            line += f"; {m['reason']}"
        return line


def _worst(score: dict) -> float:
    """Worst cosine / agreement of a plan score (the predicted agreement has its own target)."""
    return min((v for k, v in score.items() if k != "labels_predicted"), default=1.0)


def _sizes(model: onnx.ModelProto, names: list[str]) -> dict[str, int]:
    inits = {i.name: i for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    return {n: math.prod(inits[by_name[n].input[1]].dims) for n in names}


def label_outputs(model: onnx.ModelProto) -> list[str]:
    """Graph outputs of shape [batch, labels]: a classifier's logits."""
    return [
        o.name
        for o in model.graph.output
        if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and len(o.type.tensor_type.shape.dim) == 2
    ]


def plan_target(model: onnx.ModelProto, heads: tuple[str, ...], options: QuantizeOptions) -> tuple[float, str]:
    """The measured plan's worst-cosine target and why: the option when given, else by output kind.
    Token states that no head MatMul writes (feature extraction: every token judged, and mean-pooled)
    get EMBEDDING_PLAN_COSINE; logits (LM heads, classifiers) DEFAULT_PLAN_COSINE."""
    if options.plan_min_cosine is not None:
        return options.plan_min_cosine, "plan_min_cosine given"
    by_name = {n.name: n for n in model.graph.node}
    from_heads = {o for h in heads for o in by_name[h].output}
    states = [
        o.name
        for o in model.graph.output
        if not o.name.startswith("present") and o.name not in from_heads and len(o.type.tensor_type.shape.dim) == 3
    ]
    if states:
        return EMBEDDING_PLAN_COSINE, f"token states {states[:2]} not written by a head: embedding target"
    return DEFAULT_PLAN_COSINE, "logits: default target"


def plan_bits(model: onnx.ModelProto, options: QuantizeOptions, folder: Optional[Path] = None) -> BitPlan:
    """The bit plan; `folder` (the export folder) gives the measured plan its tokenizer."""
    fixed = _fixed_plan(model, options)
    if options.mode is QuantMode.INT8 or options.plan is PlanMethod.FIXED:
        return fixed
    from shira_export.export.quantize.calib import UnsupportedInputs, calibration_feeds
    from shira_export.export.quantize.measure import WeightProbe, measure_plan

    body = [n for n in fixed.four + fixed.eight if n not in fixed.heads]
    body = [n for n in qgraph.count_quantizable(model, gemm=False)[0] if n in set(body)]  # graph order
    if not body:
        return fixed
    try:
        feeds = calibration_feeds(model, folder)
    except UnsupportedInputs as exc:
        return _with(fixed, model, measured={"reason": f"fixed plan used: {exc}"})
    heads8 = [h for h in fixed.heads if h in fixed.eight]
    target, why = plan_target(model, fixed.heads, options)
    probe = WeightProbe(model, body + list(fixed.heads), feeds)
    found = measure_plan(
        probe,
        body,
        target=target,
        block_size=options.block_size,
        symmetric=options.symmetric,
        eight_bit=heads8,
        agreement=options.plan_min_agreement,
    )
    found.calibration = {
        "batches": len(feeds),
        "rows": int(sum(m.shape[0] for _, m in feeds)),
        "tokens": int(sum(m.sum() for _, m in feeds)),
        "texts": bool(folder is not None and len(feeds) > 1),
    }
    found.reason = (
        "each layer's RTN 4-bit weights simulated in fp32 on calibration inputs (weights only, so "
        f"the same plan on every CPU); target {target} ({why})"
    )
    if not found.four:
        found.reason += f"; no body MatMul meets worst cosine {target} at 4 bits: all at 8 bits"
    four = set(found.four) | {h for h in fixed.heads if h in fixed.four}
    names = list(fixed.four + fixed.eight)
    order = qgraph.count_quantizable(model, gemm=False)[0]
    names = [n for n in order if n in set(names)]
    plan = BitPlan(
        four=tuple(n for n in names if n in four),
        eight=tuple(n for n in names if n not in four),
        heads=fixed.heads,
        method="measured",
        measured=found.to_json(),
    )
    return _with(plan, model)


def _with(plan: BitPlan, model: onnx.ModelProto, **changes: object) -> BitPlan:
    from dataclasses import replace

    body = [n for n in plan.four + plan.eight if n not in plan.heads]
    sizes = _sizes(model, body)
    total = sum(sizes.values())
    fraction = sum(sizes[n] for n in plan.four if n in sizes) / total if total else 0.0
    return replace(plan, weight_fraction_4bit=fraction, **changes)  # type: ignore[arg-type]


def _fixed_plan(model: onnx.ModelProto, options: QuantizeOptions) -> BitPlan:
    names, _ = qgraph.count_quantizable(model, gemm=False)
    names = [n for n in names if n not in options.nodes_to_exclude]
    outputs = {o.name for o in model.graph.output}
    by_name = {n.name: n for n in model.graph.node}
    heads = [n for n in names if any(o in outputs for o in by_name[n].output)]
    if options.mode is QuantMode.INT8:
        return BitPlan(eight=tuple(names), heads=tuple(heads), method="int8")
    body = [n for n in names if n not in heads]
    count = math.ceil(options.int8_tail * len(body)) if options.int8_tail > 0 else 0
    tail = set(body[len(body) - count :]) if count else set()
    first = set(body[: math.ceil(options.int8_first * len(body))]) if options.int8_first > 0 else set()
    eight = tail | first | (set(heads) if options.head_bits == 8 else set())
    plan = BitPlan(
        four=tuple(n for n in names if n not in eight),
        eight=tuple(n for n in names if n in eight),
        heads=tuple(heads),
        tail=tuple(n for n in body if n in tail),
        first=tuple(n for n in body if n in first),
    )
    return _with(plan, model)
