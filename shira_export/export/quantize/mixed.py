"""Which MatMul gets how many bits: the bit plan of one graph.

int8: every constant-weight MatMul at 8 bits. int4: 4 bits, except
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

import onnx

from shira_export.export.quantize import graph as qgraph
from shira_export.export.quantize.options import QuantizeOptions, QuantMode

__all__ = ["BitPlan", "plan_bits"]


@dataclass(frozen=True)
class BitPlan:
    """MatMul node names per width, in graph order."""

    four: tuple[str, ...] = ()
    eight: tuple[str, ...] = ()
    heads: tuple[str, ...] = field(default=())  # graph-output MatMuls (in `four` or `eight`)
    tail: tuple[str, ...] = field(default=())  # body MatMuls moved to 8 bits by int8_tail
    first: tuple[str, ...] = field(default=())  # body MatMuls moved to 8 bits by int8_first

    def to_json(self) -> dict:
        return {"matmuls_4bit": len(self.four), "matmuls_8bit": len(self.eight), "heads": list(self.heads),
                "tail_8bit": len(self.tail), "first_8bit": len(self.first)}


def plan_bits(model: onnx.ModelProto, options: QuantizeOptions) -> BitPlan:
    names, _ = qgraph.count_quantizable(model, gemm=False)
    names = [n for n in names if n not in options.nodes_to_exclude]
    outputs = {o.name for o in model.graph.output}
    by_name = {n.name: n for n in model.graph.node}
    heads = [n for n in names if any(o in outputs for o in by_name[n].output)]
    if options.mode is QuantMode.INT8:
        return BitPlan(eight=tuple(names), heads=tuple(heads))
    body = [n for n in names if n not in heads]
    count = math.ceil(options.int8_tail * len(body)) if options.int8_tail > 0 else 0
    tail = set(body[len(body) - count:]) if count else set()
    first = set(body[:math.ceil(options.int8_first * len(body))]) if options.int8_first > 0 else set()
    eight = tail | first | (set(heads) if options.head_bits == 8 else set())
    return BitPlan(four=tuple(n for n in names if n not in eight), eight=tuple(n for n in names if n in eight),
                   heads=tuple(heads), tail=tuple(n for n in body if n in tail), first=tuple(n for n in body if n in first))
