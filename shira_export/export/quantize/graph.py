"""Graph checks and the quantizer calls behind `export.quantize`, on in-memory ONNX models.

- `check_not_quantized`: a graph that already holds quantized ops or integer weights.
- `computed_weight_matmuls`: MatMul/Gemm nodes whose weight is computed in the graph
  (e.g. ScatterND into W). ORT's quantizers skip those silently (ANCHORS 6), so callers
  raise instead of shipping an fp32 layer inside an "int8" model.
- `fold_transposed_weights`, `gemms_to_matmuls`: make every constant weight a MatMul's B.
- `run_int8_dynamic` / `run_nbits`: onnxruntime's dynamic int8 and MatMulNBits (4 or 8
  bits) quantizers, muted, each returning the counts of quantized vs asked-for ops.
- `drop_unused_initializers`: the fp32 originals the quantizers leave behind.
Nodes are found by op type and constant weights, never by exporter-specific names. The
rewrites run on onnx-ir, one conversion per pass (artifacts.ir_edits); the checks and counts
read the protobuf directly.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import onnx
import onnx_ir as ir
from onnx import TensorProto

from shira_export._quiet import quiet_loggers
from shira_export.errors import ShiraInputError
from shira_export.artifacts.ir_edits import constant, edited, is_unused, op, replace

__all__ = [
    "QUANTIZED_OPS",
    "OpCounts",
    "check_not_quantized",
    "computed_weight_matmuls",
    "count_quantizable",
    "fold_transposed_weights",
    "gemms_to_matmuls",
    "weight_initializers",
    "run_int8_dynamic",
    "run_nbits",
    "drop_unused_initializers",
    "quiet",
]

# ORT's quantizers log one INFO line per node (some on the root logger)
_QUANT_LOGGERS = ("", "onnxruntime", "onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer")


def quiet() -> quiet_loggers:
    return quiet_loggers(*_QUANT_LOGGERS)


# Ops a quantizer leaves behind; one of them in the input means "already quantized".
QUANTIZED_OPS = frozenset(
    {
        "MatMulNBits",
        "MatMulInteger",
        "DynamicQuantizeLinear",
        "DynamicQuantizeMatMul",
        "QLinearMatMul",
        "MatMulIntegerToFloat",
        "GatherBlockQuantized",
        "QuantizeLinear",
        "DequantizeLinear",
        "QGemm",
        "ConvInteger",
        "QLinearConv",
        "DynamicQuantizeLSTM",
        "QAttention",
    }
)
_INT_WEIGHTS = (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4)
_FLOAT = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
_IR_FLOAT = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_MIN_WEIGHT = 256  # elements; smaller 2-D initializers are shapes/biases, not weights


@dataclass(frozen=True)
class OpCounts:
    """Quantizable ops before and quantized ops after one quantizer run."""

    matmuls_expected: int  # MatMul (and Gemm for int8) nodes with a constant 2-D float weight
    matmuls_quantized: int
    gathers_expected: int  # Gather nodes over a constant 2-D float table (embeddings)
    gathers_quantized: int
    missed: tuple[str, ...]  # quantizable nodes still in fp32 after the run


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


def check_not_quantized(model: onnx.ModelProto, where: str) -> None:
    """Raise ShiraInputError when `model` already holds quantized ops or integer weights."""
    ops = sorted({n.op_type for n in _all_nodes(model.graph)} & QUANTIZED_OPS)
    ints = [
        i.name
        for i in model.graph.initializer
        if i.data_type in _INT_WEIGHTS and len(i.dims) >= 2 and _numel(i) >= _MIN_WEIGHT
    ]
    if ops or ints:
        found = f"ops {ops}" if ops else f"integer weights {ints[:3]}{' ...' if len(ints) > 3 else ''}"
        raise ShiraInputError(
            f"{where}: graph is already quantized ({found}); expected an fp32/fp16 graph "
            f"(quantize the original export, not its quantized copy)"
        )


def _numel(init: TensorProto) -> int:
    n = 1
    for d in init.dims:
        n *= d
    return n


def weight_initializers(model: onnx.ModelProto) -> dict[str, TensorProto]:
    """2-D float initializers of at least _MIN_WEIGHT elements: weights and tables."""
    return {
        i.name: i
        for i in model.graph.initializer
        if i.data_type in _FLOAT and len(i.dims) == 2 and _numel(i) >= _MIN_WEIGHT
    }


def computed_weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm nodes (subgraphs included) whose B is computed from a weight initializer
    by other nodes (no activation involved): quantizers skip these without a word."""
    weights = weight_initializers(model)
    overridable = {i.name for i in model.graph.input} & {i.name for i in model.graph.initializer}
    consts = {i.name for i in model.graph.initializer} - ({i.name for i in model.graph.input} - overridable)
    derived: dict[str, bool] = {}  # tensor -> reads a weight; present only for constant-only tensors
    for name in consts:
        derived[name] = name in weights
    found: list[str] = []

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            subgraphs = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
            for g in subgraphs:
                visit(g)
            if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
                b = node.input[1]
                if b not in weights and derived.get(b):
                    found.append(node.name or f"<{node.op_type} -> {node.output[0]}>")
            inputs = [i for i in node.input if i]
            if node.op_type == "Constant" or (inputs and all(i in derived for i in inputs) and not subgraphs):
                flag = any(derived[i] for i in inputs)
                for out in node.output:
                    derived[out] = flag

    visit(model.graph)
    return found


def _weights(graph: ir.Graph) -> dict[str, ir.Value]:
    """`weight_initializers` on onnx-ir: the main graph's 2-D float initializers of at least
    _MIN_WEIGHT elements."""
    out = {}
    for name, value in graph.initializers.items():
        t = value.const_value
        if t is not None and t.dtype in _IR_FLOAT and len(t.shape) == 2 and t.size >= _MIN_WEIGHT:
            out[name] = value
    return out


def _weight(value: Optional[ir.Value], weights: dict[str, ir.Value]) -> Optional[ir.Value]:
    return value if value is not None and weights.get(value.name or "") is value else None


def _transposed(graph: ir.Graph, weight: ir.Value) -> ir.Value:
    """`{weight}_transposed`: the weight's transposed copy, made once per weight."""
    tensor = weight.const_value
    assert tensor is not None  # _weights holds initializers with values only
    return constant(graph, f"{weight.name}_transposed", lambda: tensor.numpy().T.copy())


def fold_transposed_weights(model: onnx.ModelProto) -> list[str]:
    """Give MatMuls that read `Transpose(weight)` (tied LM heads, e.g. OPT's lm_head) their
    own transposed initializer, in place, so the quantizer sees a constant B. Returns the nodes."""
    folded: list[str] = []
    with edited(model) as view:
        graph = view.graph
        weights = _weights(graph)
        for node in graph:
            b = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) > 1 else None
            src = b.producer() if b is not None else None
            if src is None or src.op_type != "Transpose" or _weight(src.inputs[0], weights) is None:
                continue
            if list(src.attributes.get_ints("perm", [1, 0])) != [1, 0]:
                continue
            node.replace_input_with(1, _transposed(graph, src.inputs[0]))  # type: ignore[arg-type]
            folded.append(node.name or "")
        for node in list(graph):  # else the fp32 table stays in the file through the unused Transpose
            if node.op_type == "Transpose" and is_unused(node.outputs[0]):
                graph.remove(node, safe=True)
    return folded


def gemms_to_matmuls(model: onnx.ModelProto) -> list[str]:
    """Rewrite `Gemm(A, W, C)` with a constant W (alpha = beta = 1, no transA) as
    `MatMul(A, W') + C`, in place, keeping the output name. MatMulNBits quantizes MatMul
    only: without this, the Gemm layers (e.g. OPT's fc1/fc2) would stay fp32."""
    rewritten: list[str] = []
    with edited(model) as view:
        graph = view.graph
        weights = _weights(graph)
        for node in list(graph):
            a = node.attributes
            if (
                node.op_type != "Gemm"
                or len(node.inputs) < 2
                or _weight(node.inputs[1], weights) is None
                or a.get_float("alpha", 1.0) != 1.0
                or a.get_float("beta", 1.0) != 1.0
                or a.get_int("transA", 0) != 0
            ):
                continue
            w = node.inputs[1]
            if a.get_int("transB", 0):
                w = _transposed(graph, w)  # type: ignore[arg-type]
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            out, base = node.outputs[0].name or "", node.name or ""
            new = [op("MatMul", [node.inputs[0], w], f"{out}_matmul" if bias else out, name=f"{base}_matmul")]
            if bias is not None:
                new.append(op("Add", [new[0].outputs[0], bias], out, name=f"{base}_bias"))
            replace(graph, [node], new, [node.outputs[0]], [new[-1].outputs[0]])
            rewritten.append(node.name or "")
    return rewritten


def count_quantizable(model: onnx.ModelProto, *, gemm: bool) -> tuple[list[str], list[str]]:
    """(MatMul[/Gemm] nodes, Gather nodes) of the main graph reading a constant 2-D float weight."""
    weights = weight_initializers(model)
    ops = ("MatMul", "Gemm") if gemm else ("MatMul",)
    matmuls = [n.name for n in model.graph.node if n.op_type in ops and len(n.input) > 1 and n.input[1] in weights]
    gathers = [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in weights]
    return matmuls, gathers


def _missed(model: onnx.ModelProto, expected: Sequence[str]) -> tuple[str, ...]:
    """Expected nodes whose weight is still a float initializer (int8 keeps a quantized
    Gather's name, so the name alone does not tell)."""
    weights = weight_initializers(model)
    slot = {"MatMul": 1, "Gemm": 1, "Gather": 0}
    left = {
        n.name
        for n in model.graph.node
        if n.op_type in slot and len(n.input) > slot[n.op_type] and n.input[slot[n.op_type]] in weights
    }
    return tuple(name for name in expected if name in left)


def run_int8_dynamic(
    model: onnx.ModelProto,
    *,
    per_channel: bool,
    reduce_range: bool,
    embeddings: bool,
    exclude: Sequence[str] = (),
    external: bool = False,
) -> tuple[onnx.ModelProto, OpCounts]:
    """Dynamic int8 (weights int8 offline, activations uint8 per call) of MatMul/Gemm, and of
    embedding Gathers when `embeddings`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    matmuls, gathers = count_quantizable(model, gemm=True)
    ops = ["MatMul", "Gemm"] + (["Gather"] if embeddings else [])
    with tempfile.TemporaryDirectory(prefix="shira_q8_") as tmp, quiet():
        out = Path(tmp) / "q.onnx"
        quantize_dynamic(
            model,
            out,
            op_types_to_quantize=ops,
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude),
            use_external_data_format=external,
            extra_options={"MatMulConstBOnly": True},
        )
        result = onnx.load(str(out), load_external_data=True)
    counts = Counter(n.op_type for n in result.graph.node)
    expected = [m for m in matmuls if m not in exclude]
    gathers = [g for g in gathers if g not in exclude] if embeddings else []
    missed = _missed(result, expected + gathers)
    return result, OpCounts(
        len(expected),
        counts["MatMulInteger"] + counts["DynamicQuantizeMatMul"],
        len(gathers),
        len(gathers) - sum(1 for m in missed if m in gathers),
        missed,
    )


def run_nbits(
    model: onnx.ModelProto,
    names: Sequence[str],
    *,
    bits: int,
    block_size: int,
    symmetric: bool,
    accuracy_level: Optional[int],
) -> tuple[onnx.ModelProto, OpCounts]:
    """The MatMuls `names` as `bits`-bit `MatMulNBits` blocks (weight-only); every other node
    untouched. Counts: MatMuls asked for vs quantized (Gathers: see quantize.tables)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    matmuls, _ = count_quantizable(model, gemm=False)
    wanted = set(names)
    if not wanted:
        return model, OpCounts(0, 0, 0, 0, ())
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # the quantizer edits its input in place
    # an earlier MatMulNBits run re-ties an excluded tied head to Transpose(table): fold it again
    fold_transposed_weights(copy)
    # nodes_to_include does not narrow the selection in ORT 1.32; excluding the rest does
    with quiet(), _ignore_invalid():  # all-zero blocks: the quantizer's np.where picks its fallback
        quantizer = MatMulNBitsQuantizer(
            copy,
            bits=bits,
            block_size=block_size,
            is_symmetric=symmetric,
            accuracy_level=accuracy_level,
            nodes_to_exclude=[m for m in matmuls if m not in wanted],
            op_types_to_quantize=("MatMul",),
            quant_axes=(("MatMul", 0),),
        )
        quantizer.process()
    result = quantizer.model.model
    left = {n.name for n in result.graph.node if n.op_type == "MatMul"}  # by name: a computed B is missed too
    missed = tuple(m for m in names if m in left)
    return result, OpCounts(len(wanted), len(wanted) - len(missed), 0, 0, missed)


def _ignore_invalid():
    import numpy as np

    return np.errstate(invalid="ignore", divide="ignore")


def drop_unused_initializers(model: onnx.ModelProto) -> int:
    """Remove nodes whose outputs nothing reads, then initializers no node reads: the
    quantizers leave the fp32 originals (and e.g. a tied head's Transpose of the
    embedding table) behind, which would keep the file near fp32 size. ONNX ops have no
    side effects, so a node with unread outputs is dead. A reader inside an If/Loop body
    counts. Returns how many initializers went."""
    with edited(model) as view:
        graph = view.graph
        removed = True
        while removed:  # last node first: one sweep clears a chain; repeat for unsorted graphs
            removed = False
            for node in reversed(list(graph)):
                if all(is_unused(o) for o in node.outputs):
                    graph.remove(node, safe=True)
                    removed = True
        unused = [name for name, value in graph.initializers.items() if is_unused(value)]
        for name in unused:
            del graph.initializers[name]
    return len(unused)
