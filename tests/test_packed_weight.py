"""export.packed_weight: a MatMulNBits weight dequantized in-graph by GatherBlockQuantized equals
what MatMulNBits itself computes with (4 and 8 bits, with and without zero points, K not a
whole number of blocks); ops it cannot read are left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

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


@pytest.mark.parametrize("bits,symmetric,k", [(4, True, 96), (4, False, 96), (4, False, 80), (8, False, 64)])
def test_dequantized_weight_equals_matmulnbits(bits, symmetric, k):
    model = _quantized(k, 24, bits, symmetric)
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    inits = {i.name: i for i in model.graph.initializer}
    info = packed_int4(node, inits)
    assert info is not None and info["bits"] == bits and info["zero_points"] == (not symmetric)
    nodes, wt = dequantized_nodes("d/", node, info, "r")
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["r"], start=0, end=1), *nodes],
        "deq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info(wt, TensorProto.FLOAT, None)],
        list(model.graph.initializer),
    )
    deq_model = helper.make_model(graph, opset_imports=list(model.opset_import))
    deq_model.ir_version = 9
    eye = np.eye(k, dtype=np.float32)
    got = ort.InferenceSession(deq_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": eye})[
        0
    ]
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": eye})[0]
    assert got.shape == (k, 24) and np.abs(got - want).max() <= 1e-6
    assert np.abs(got).max() > 0.01  # a real weight came out, not zeros


def test_other_quantized_ops_are_not_taken():
    model = _quantized(64, 8, 4, True)
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    inits = {i.name: i for i in model.graph.initializer}
    level4 = onnx.NodeProto()
    level4.CopyFrom(node)
    level4.attribute.append(helper.make_attribute("accuracy_level", 4))  # int8 activations: prefill would differ
    assert packed_int4(level4, inits) is None
    assert packed_int4(helper.make_node("MatMul", ["x", "w"], ["y"]), inits) is None
    no_init = onnx.NodeProto()
    no_init.CopyFrom(node)
    no_init.input[1] = "computed"
    assert packed_int4(no_init, inits) is None
