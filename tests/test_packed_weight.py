"""export.packed_weight: a MatMulNBits weight dequantized in-graph by GatherBlockQuantized equals
what MatMulNBits itself computes with (4 and 8 bits, with and without zero points, K not a
whole number of blocks); ops it cannot read are left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from shira_export.artifacts.ir_edits import graph_values
from shira_export.artifacts.onnx_nodes import Nodes, Op
from shira_export.export.packed_weight import dequantized_nodes, packed_int4


def _quantized(k: int, n: int, bits: int, symmetric: bool) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    w = (np.random.default_rng(bits + k).standard_normal((k, n)) * 0.05).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    quant = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=symmetric)
    quant.process()
    return quant.model.model


def _nbits(model: onnx.ModelProto, edit=None) -> tuple[ir.Graph, ir.Node]:
    """The MatMulNBits node of `model` in onnx-ir (its proto changed by `edit` first)."""
    if edit is not None:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        edit(next(n for n in copy.graph.node if n.op_type == "MatMulNBits"))
        model = copy
    graph = ir.serde.deserialize_model(model).graph
    return graph, next(n for n in graph if n.op_type == "MatMulNBits")


@pytest.mark.parametrize("bits,symmetric,k", [(4, True, 96), (4, False, 96), (4, False, 80), (8, False, 64)])
def test_dequantized_weight_equals_matmulnbits(bits, symmetric, k):
    model = _quantized(k, 24, bits, symmetric)
    view, node = _nbits(model)
    info = packed_int4(node)
    assert info is not None and info["bits"] == bits and info["zero_points"] == (not symmetric)
    b = Nodes(graph_values(view))
    b.op("Shape", ["x"], "r", start=0, end=1)
    w_nk = dequantized_nodes(b, "d/", Op.of(node).inputs, info, "r")
    graph = helper.make_graph(
        [ir.serde.serialize_node(n) for n in b.nodes],
        "deq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info(w_nk, TensorProto.FLOAT, None)],
        list(model.graph.initializer),
    )
    deq_model = helper.make_model(graph, opset_imports=list(model.opset_import))
    deq_model.ir_version = 9
    eye = np.eye(k, dtype=np.float32)
    got = ort.InferenceSession(deq_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": eye})[
        0
    ]
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": eye})[0]
    assert got.shape == (24, k) and np.abs(got.T - want).max() <= 1e-6  # [out, in], as MatMulNBits packs it
    assert np.abs(got).max() > 0.01  # a real weight came out, not zeros


def test_other_quantized_ops_are_not_taken():
    model = _quantized(64, 8, 4, True)
    assert packed_int4(_nbits(model)[1]) is not None
    # int8 activations: prefill would differ
    level4 = _nbits(model, lambda n: n.attribute.append(helper.make_attribute("accuracy_level", 4)))[1]
    assert packed_int4(level4) is None
    assert packed_int4(ir.node("MatMul", [None, None])) is None
    no_init = _nbits(model, lambda n: n.input.__setitem__(1, "computed"))[1]
    assert packed_int4(no_init) is None
