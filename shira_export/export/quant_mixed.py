"""Mixed 4/8-bit weights for the int4 mode: the MatMuls nearest the output at 8 bits.

4-bit rounding error compounds through the layers, so the last layers cost the most: on
MiniLM (block 32, RTN) quantizing one layer's MatMuls alone gives a worst sentence-embedding
cosine of 0.998 for layer 0 and 0.988 for layer 5, and the FFN MatMuls cost more than the
attention ones. Keeping the last third of the MatMuls at 8 bits (`MatMulNBits` bits=8, same
block size) lifts the worst cosine from 0.971 to 0.987 for 0.183x instead of 0.168x fp32.
A MatMul that writes a graph output (an LM head, which does not feed later layers and is
often the largest matrix) stays at 4 bits.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import onnx

from shira_export.errors import ShiraInputError
from shira_export.export import quant_graph

__all__ = ["check_int8_tail", "tail_matmuls", "run_8bit_blocks", "tail_accuracy_level"]


def tail_accuracy_level(requested: Optional[int]) -> int:
    """8-bit MatMulNBits without an accuracy level runs a dequantize-then-sgemm fallback in
    ORT 1.32: 3.1 ms vs 0.05 ms for 1 x 768 @ 768 x 3072 here (26x slower, decode 2.4x fp32).
    Level 4 (int8 activations per block) runs the int8 kernel at 4-bit speed with a relative
    error of 0.0065 vs 0.0049, so it is the default for the tail."""
    return 4 if requested is None else requested


def check_int8_tail(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ShiraInputError(f"int8_tail: expected a fraction in [0, 1] of the MatMuls kept at 8 bits, found {value!r}")
    return float(value)


def tail_matmuls(model: onnx.ModelProto, fraction: float, *, exclude: Sequence[str] = ()) -> list[str]:
    """The last ceil(fraction * n) of the n constant-weight MatMuls in graph order (the
    exported graphs are topologically sorted, so order follows depth), heads excluded."""
    names, _ = quant_graph.count_quantizable(model, gemm=False)
    outputs = {o.name for o in model.graph.output}
    by_name = {n.name: n for n in model.graph.node}
    body = [n for n in names if n not in exclude and not any(o in outputs for o in by_name[n].output)]
    count = math.ceil(fraction * len(body)) if fraction > 0 else 0
    return body[len(body) - count:] if count else []


def run_8bit_blocks(model: onnx.ModelProto, names: Sequence[str], *, block_size: int, symmetric: bool,
                    accuracy_level: Optional[int]) -> onnx.ModelProto:
    """`names` (MatMuls) as 8-bit `MatMulNBits`; every other node untouched."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    matmuls, _ = quant_graph.count_quantizable(model, gemm=False)
    wanted = set(names)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # the quantizer edits its input in place
    # nodes_to_include does not narrow the selection in ORT 1.32; excluding the rest does
    with quant_graph._quiet():
        quantizer = MatMulNBitsQuantizer(copy, bits=8, block_size=block_size, is_symmetric=symmetric,
                                         accuracy_level=accuracy_level,
                                         nodes_to_exclude=[m for m in matmuls if m not in wanted],
                                         op_types_to_quantize=("MatMul",), quant_axes=(("MatMul", 0),))
        quantizer.process()
    result = quantizer.model.model
    left = set(quant_graph.count_quantizable(result, gemm=False)[0]) & wanted
    if left:
        raise ShiraInputError(f"the 8-bit MatMulNBits quantizer left {len(left)} of {len(wanted)} MatMuls in fp32 "
                              f"({sorted(left)[:3]}); expected all of them")
    return result
