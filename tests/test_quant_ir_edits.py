"""The quantizer's graph edits on onnx-ir (artifacts.ir_edits): results unchanged under ORT,
readers inside If branches count as readers, untouched initializers are not re-serialized,
and a pass that raises leaves the ModelProto as it was."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from shira_export.export.quantize import graph as quant_graph
from shira_export.artifacts import ir_edits
from shira_export.export.quantize.tied import _sole_consumers

D = 16  # 16 x 16 = 256 elements: the smallest weight the passes treat as one


def _model() -> onnx.ModelProto:
    """y = If(cond, then: MatMul(m + S, t), else: m) with m = MatMul(Gemm(x, W, C, transB), t),
    t = Transpose(W2); S is read only inside the then-branch; Relu -> Neg and U are dead."""
    rng = np.random.default_rng(0)
    arrays = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in [("W", (D, D)), ("W2", (D, D))]}
    arrays |= {"C": rng.standard_normal(D).astype(np.float32), "S": rng.standard_normal(D).astype(np.float32)}
    arrays["U"] = np.ones((D, D), np.float32)
    vi = lambda n, shape: helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)  # noqa: E731
    then = helper.make_graph(
        [
            helper.make_node("Add", ["m", "S"], ["a"], name="then_add"),
            helper.make_node("MatMul", ["a", "t"], ["y_then"], name="then_matmul"),
        ],
        "then",
        [],
        [vi("y_then", [2, D])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["m"], ["y_else"], name="else_id")], "else", [], [vi("y_else", [2, D])]
    )
    nodes = [
        helper.make_node("Gemm", ["x", "W", "C"], ["g"], name="gemm", transB=1),
        helper.make_node("Transpose", ["W2"], ["t"], name="transpose"),
        helper.make_node("MatMul", ["g", "t"], ["m"], name="mm"),
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=other),
        helper.make_node("Relu", ["x"], ["r1"], name="dead_relu"),
        helper.make_node("Neg", ["r1"], ["r2"], name="dead_neg"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [vi("x", [2, D]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [vi("y", [2, D])],
        [numpy_helper.from_array(v, k) for k, v in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((2, D)).astype(np.float32)
    return [session.run(["y"], {"x": x, "cond": np.array(c)})[0] for c in (True, False)]


def _names(model: onnx.ModelProto) -> list[str]:
    return [i.name for i in model.graph.initializer]


def test_fold_keeps_a_transpose_an_if_branch_still_reads():
    model = _model()
    before = _run(model)
    assert quant_graph.fold_transposed_weights(model) == ["mm"]
    mm = next(n for n in model.graph.node if n.name == "mm")
    assert list(mm.input) == ["g", "W2_transposed"]
    # the then-branch reads t by name: the Transpose stays (a map of main-graph readers would drop it)
    assert [n.name for n in model.graph.node if n.op_type == "Transpose"] == ["transpose"]
    assert _names(model) == ["W", "W2", "C", "S", "U", "W2_transposed"]
    onnx.checker.check_model(model)
    for got, want in zip(_run(model), before):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_gemm_becomes_matmul_plus_bias_with_its_output_name():
    model = _model()
    before = _run(model)
    assert quant_graph.gemms_to_matmuls(model) == ["gemm"]
    ops = [(n.op_type, n.name, list(n.input), list(n.output)) for n in model.graph.node[:2]]
    assert ops == [
        ("MatMul", "gemm_matmul", ["x", "W_transposed"], ["g_matmul"]),
        ("Add", "gemm_bias", ["g_matmul", "C"], ["g"]),
    ]
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "W"))
    wt = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "W_transposed"))
    np.testing.assert_array_equal(wt, w.T)
    onnx.checker.check_model(model)
    for got, want in zip(_run(model), before):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dead_code_pass_keeps_what_only_a_branch_reads():
    model = _model()
    before = _run(model)
    assert quant_graph.drop_unused_initializers(model) == 1  # U; S is read inside the then-branch
    assert _names(model) == ["W", "W2", "C", "S"]
    assert [n.name for n in model.graph.node] == ["gemm", "transpose", "mm", "if"]  # the Relu -> Neg chain went
    for got, want in zip(_run(model), before):
        np.testing.assert_array_equal(got, want)
    # after the rewrite W is read by nobody: it goes, W_transposed stays
    quant_graph.gemms_to_matmuls(model)
    assert quant_graph.drop_unused_initializers(model) == 1
    assert _names(model) == ["W2", "C", "S", "W_transposed"]


def test_a_reader_inside_a_branch_makes_a_tensor_shared():
    view = ir_edits.ir.serde.deserialize_model(_model())
    values = {v.name: v for n in view.graph for v in n.outputs}
    assert ir_edits.sole_consumer(values["t"]) is None  # mm and the then-branch's MatMul
    assert ir_edits.sole_consumer(values["g"]).name == "mm"  # type: ignore[union-attr]
    assert ir_edits.sole_consumer(values["y"]) is None  # a graph output
    sole = {name: node.name for name, node in _sole_consumers(_model().graph).items()}
    # x: the Gemm and the dead Relu; m: read by both branches, by no main-graph node
    assert sole == {"W": "gemm", "C": "gemm", "W2": "transpose", "g": "mm", "cond": "if", "r1": "dead_neg"}


def test_untouched_initializers_are_not_serialized_again(monkeypatch):
    written: list[str] = []
    serialize = ir_edits.ir.serde.serialize_tensor_into

    def counting(proto, tensor):
        written.append(tensor.name)
        serialize(proto, tensor)

    monkeypatch.setattr(ir_edits.ir.serde, "serialize_tensor_into", counting)
    model = _model()
    kept = {i.name: i.SerializeToString() for i in model.graph.initializer}
    quant_graph.fold_transposed_weights(model)
    quant_graph.gemms_to_matmuls(model)
    assert written == ["W2_transposed", "W_transposed"]  # the five originals stay as they were
    assert {i.name: i.SerializeToString() for i in model.graph.initializer if i.name in kept} == kept


def test_a_pass_that_raises_leaves_the_model_alone():
    model = _model()
    before = model.SerializeToString()
    with pytest.raises(RuntimeError, match="midway"):
        with ir_edits.edited(model) as view:
            view.graph.remove(next(n for n in view.graph if n.name == "dead_neg"), safe=True)
            ir_edits.constant(view.graph, "extra", np.zeros(3, np.float32))
            raise RuntimeError("midway")
    assert model.SerializeToString() == before


def test_constant_is_made_once():
    view = ir_edits.ir.serde.deserialize_model(_model())
    first = ir_edits.constant(view.graph, "k", np.array([3]))
    again = ir_edits.constant(view.graph, "k", lambda: pytest.fail("computed twice"))
    assert again is first and first.const_value.numpy().tolist() == [3]  # type: ignore[union-attr]
    assert ir_edits.constant(view.graph, "W", np.zeros(1)) is view.graph.initializers["W"]  # an existing one wins
