"""The site insertion on onnx-ir (artifacts.onnx_nodes, artifacts.ir_edits): a sparse graph
stripped of its sites is the base graph again, proto for proto; graph inputs the edit keeps
stay as they were; a site builder refuses a name read before it is made; an If branch
built with it reads outer values and runs in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from test_graph_delta import _synthetic

from shira_export.export.graph_delta import adapter_input_names, insert_sparse_deltas, locate_targets
from shira_export.artifacts.ir_edits import edited
from shira_export.artifacts.onnx_nodes import Nodes
from shira_export.export.quant_delta import strip_sparse_deltas


def _bytes(messages) -> list[bytes]:
    return [m.SerializeToString(deterministic=True) for m in messages]


def test_strip_gives_back_the_base_graph_exactly():
    base, weights, _ = _synthetic()
    model = onnx.ModelProto()
    model.CopyFrom(base)
    sites, _ = locate_targets(model, weights)
    insert_sparse_deltas(model, sites)
    names = {n for s in sites for n in adapter_input_names(s.module)}
    assert names <= {i.name for i in model.graph.input} and names <= {i.name for i in model.graph.initializer}
    assert {n.name for n in model.graph.node if n.op_type == "If"} == {"shira/m/If", "shira/g/If"}
    io = strip_sparse_deltas(model, sites)
    assert io == {"m": ("x", "h"), "g": ("h2", "z2")}
    for field in ("node", "input", "output", "initializer", "value_info"):
        assert _bytes(getattr(model.graph, field)) == _bytes(getattr(base.graph, field)), field


def test_edited_keeps_the_protos_of_inputs_it_keeps():
    model, _, _ = _synthetic()
    model.graph.input[0].doc_string = "kept as it was"
    with edited(model) as view:
        extra = ir.Value(name="extra", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["n"]))
        view.graph.inputs.append(extra)
    assert [i.name for i in model.graph.input] == ["x", "extra"]
    assert model.graph.input[0].doc_string == "kept as it was"
    assert model.graph.input[1] == helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["n"])


def test_builder_refuses_a_name_before_it_is_made():
    b = Nodes()
    with pytest.raises(KeyError, match="'later'"):
        b.op("Relu", ["later"], "y")
    inner = b.branch()
    b.const("c", np.array([1.0], np.float32))
    inner.op("Neg", ["c"], "n")  # outer names are visible in a branch
    b.op("Relu", ["c"], "r")
    with pytest.raises(KeyError, match="'n'"):
        b.op("Relu", ["n"], "y")  # a branch's names are not visible outside


def test_if_branches_read_outer_values():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([3]))
    b = Nodes({"x": x})
    b.const("zero", np.array(0.0, np.float32))
    b.op("ReduceSum", ["x"], "s", keepdims=0)
    b.op("Greater", ["s", "zero"], "pos")
    then, other = b.branch(), b.branch()
    then.op("Neg", ["x"], "t")
    other.op("Shape", ["x"], "x_shape")
    other.filled("o", "x_shape", TensorProto.FLOAT, 7.0)
    other.op("Add", ["x", "o"], "e")
    b.if_("pos", "y", "if", then.graph("then_g", "t", TensorProto.FLOAT), other.graph("else_g", "e", TensorProto.FLOAT))
    b["y"].type, b["y"].shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([3])
    graph = ir.Graph([x], [b["y"]], nodes=b.nodes, opset_imports={"": 18}, name="g")
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=9))
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for value, want in (([1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]), ([-1.0, 0.0, -3.0], [6.0, 7.0, 4.0])):
        np.testing.assert_array_equal(session.run(None, {"x": np.array(value, np.float32)})[0], want)
