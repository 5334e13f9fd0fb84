"""Sparse deltas over a quantized base graph.

A quantized weight is packed (MatMulNBits blocks, int8 MatMulInteger), so the fp32
sparse graph's long-input branch, ScatterND into W, cannot run on it; and quantizing a
graph whose W is computed in-graph leaves that layer fp32 (ANCHORS 6). So the order is:

1. `strip_sparse_deltas`: the sparse export's graph back to its base graph (each
   `shira/<m>/If` becomes its base MatMul/Gemm again; the adapter inputs go away), and
   where each targeted layer reads its input `x` and writes its output `y`;
2. quantize that base graph (export.quantize);
3. `attach_quantized_deltas`: per targeted layer, `y = y_base + delta(x)` on the
   activation side, W untouched:

       delta(x) = If(tokens > threshold and nnz > 0,
                     then: x @ ScatterND(zeros[in, out], (col, row), values, add)   # long inputs
                     else: scatter_add(gather(x^T, col) * values, row)^T)          # short inputs

The adapter inputs keep their names (`shira.<m>.indices` int32, `shira.<m>.values` fp32,
empty defaults), so the fp32 export's `.onnx_adapter` files work unchanged, in full precision.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from shira_export.errors import ShiraInputError
from shira_export.export.graph_delta import PREFIX, TargetSite, indices_name, values_name

__all__ = ["QPREFIX", "strip_sparse_deltas", "site_io", "attach_quantized_deltas"]

QPREFIX = "shira_q"  # node-name prefix of the delta branches on a quantized graph


def site_io(model: onnx.ModelProto, sites: Sequence[TargetSite]) -> dict[str, tuple[str, str]]:
    """{module: (input x, output y)} of each site's base node in an unmodified base graph."""
    nodes = {n.name: n for n in model.graph.node}
    missing = [s.node for s in sites if s.node not in nodes]
    if missing:
        raise ShiraInputError(f"base graph: target nodes {missing} not found (expected the graph the sites were located in)")
    return {s.module: (nodes[s.node].input[0], nodes[s.node].output[0]) for s in sites}


def strip_sparse_deltas(model: onnx.ModelProto, sites: Sequence[TargetSite]) -> dict[str, tuple[str, str]]:
    """Rewrite a sparse export's graph (in place) into its base graph; returns site_io."""
    graph = model.graph
    by_prefix = {f"{PREFIX}/{s.module}/": s for s in sites}
    io: dict[str, tuple[str, str]] = {}
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if not node.name.startswith(PREFIX + "/"):
            new_nodes.append(node)
            continue
        site = by_prefix.get(node.name.rsplit("/", 1)[0] + "/")
        if site is None:
            raise ShiraInputError(f"sparse graph: node {node.name!r} belongs to no target in the manifest")
        if node.op_type == "If":
            base = onnx.NodeProto()
            base.CopyFrom(next(a for a in node.attribute if a.name == "else_branch").g.node[0])
            base.name = site.node
            base.output[0] = node.output[0]
            new_nodes.append(base)
            io[site.module] = (base.input[0], base.output[0])
    missing = sorted(set(s.module for s in sites) - set(io))
    if missing:
        raise ShiraInputError(f"sparse graph: no delta branch for targets {missing} (expected a graph written by "
                              f"`shira-export sparse`)")
    adapter_inputs = {indices_name(s.module) for s in sites} | {values_name(s.module) for s in sites}
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop(graph.input, adapter_inputs)
    _drop(graph.initializer, adapter_inputs)
    return io


def _drop(container, names: set) -> None:
    kept = [x for x in container if x.name not in names]
    del container[:]
    container.extend(kept)


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(value, name))


def _delta_nodes(site: TargetSite, x: str, y_base: str, y: str, threshold: int) -> list[onnx.NodeProto]:
    p = f"{QPREFIX}/{site.module}/"
    idx, vals = indices_name(site.module), values_name(site.module)
    in_f, out_f = site.in_features, site.out_features
    nodes = [
        helper.make_node("Cast", [idx], [p + "idx64"], name=p + "idx64", to=TensorProto.INT64),
        _const(p + "in_f", np.array(in_f, np.int64)),
        helper.make_node("Div", [p + "idx64", p + "in_f"], [p + "row"], name=p + "row"),  # output index
        helper.make_node("Mod", [p + "idx64", p + "in_f"], [p + "col"], name=p + "col"),  # input index
        _const(p + "axis1", np.array([1], np.int64)),
        _const(p + "x2_shape", np.array([-1, in_f], np.int64)),
        helper.make_node("Reshape", [x, p + "x2_shape"], [p + "x2"], name=p + "x2"),  # [N, in]
        helper.make_node("Size", [x], [p + "x_size"], name=p + "x_size"),
        _const(p + "limit", np.array(threshold * in_f, np.int64)),
        helper.make_node("Greater", [p + "x_size", p + "limit"], [p + "long"], name=p + "long"),
        helper.make_node("Size", [vals], [p + "nnz"], name=p + "nnz"),
        _const(p + "zero", np.array(0, np.int64)),
        helper.make_node("Greater", [p + "nnz", p + "zero"], [p + "any"], name=p + "any"),
        helper.make_node("And", [p + "long", p + "any"], [p + "dense"], name=p + "dense"),
    ]
    # long inputs: one dense [in, out] delta per call, one fp32 MatMul
    then_nodes = [
        helper.make_node("Unsqueeze", [p + "col", p + "axis1"], [p + "c2"], name=p + "c2"),
        helper.make_node("Unsqueeze", [p + "row", p + "axis1"], [p + "r2l"], name=p + "r2l"),
        helper.make_node("Concat", [p + "c2", p + "r2l"], [p + "pairs"], name=p + "pairs", axis=1),
        _const(p + "w_shape", np.array([in_f, out_f], np.int64)),
        helper.make_node("ConstantOfShape", [p + "w_shape"], [p + "w0"], name=p + "w0",
                         value=numpy_helper.from_array(np.zeros(1, np.float32))),
        helper.make_node("ScatterND", [p + "w0", p + "pairs", vals], [p + "dw"], name=p + "dw", reduction="add"),
        helper.make_node("MatMul", [p + "x2", p + "dw"], [p + "d_long"], name=p + "d_long"),
    ]
    # short inputs (and no adapter): gather the touched input columns only
    else_nodes = [
        helper.make_node("Transpose", [p + "x2"], [p + "xt"], name=p + "xt", perm=[1, 0]),  # [in, N]
        helper.make_node("Gather", [p + "xt", p + "col"], [p + "g"], name=p + "g", axis=0),  # [nnz, N]
        helper.make_node("Unsqueeze", [vals, p + "axis1"], [p + "v2"], name=p + "v2"),
        helper.make_node("Mul", [p + "g", p + "v2"], [p + "u"], name=p + "u"),
        helper.make_node("Shape", [p + "xt"], [p + "n"], name=p + "n", start=1, end=2),
        _const(p + "out_f", np.array([out_f], np.int64)),
        helper.make_node("Concat", [p + "out_f", p + "n"], [p + "z_shape"], name=p + "z_shape", axis=0),
        helper.make_node("ConstantOfShape", [p + "z_shape"], [p + "z"], name=p + "z",
                         value=numpy_helper.from_array(np.zeros(1, np.float32))),
        helper.make_node("Unsqueeze", [p + "row", p + "axis1"], [p + "r2"], name=p + "r2"),
        helper.make_node("ScatterND", [p + "z", p + "r2", p + "u"], [p + "d"], name=p + "d", reduction="add"),
        helper.make_node("Transpose", [p + "d"], [p + "d_short"], name=p + "d_short", perm=[1, 0]),  # [N, out]
    ]
    out_info = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, None)  # noqa: E731
    nodes += [
        helper.make_node("If", [p + "dense"], [p + "delta2"], name=p + "If",
                         then_branch=helper.make_graph(then_nodes, p + "then", [], [out_info(p + "d_long")]),
                         else_branch=helper.make_graph(else_nodes, p + "else", [], [out_info(p + "d_short")])),
        helper.make_node("Shape", [y_base], [p + "y_shape"], name=p + "y_shape"),
        helper.make_node("Reshape", [p + "delta2", p + "y_shape"], [p + "delta"], name=p + "delta"),
        helper.make_node("Add", [y_base, p + "delta"], [y], name=p + "add"),
    ]
    return nodes


def attach_quantized_deltas(model: onnx.ModelProto, sites: Sequence[TargetSite], io: Mapping[str, tuple[str, str]],
                            *, threshold: int) -> None:
    """Add an activation-side delta after each site's (quantized) base op, in place.

    `io` is {module: (x, y)} from before quantization; the quantizers keep both tensor
    names (the new op reads x and writes y). Adds the adapter inputs with empty defaults."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    fp32_nodes = [s.node for s in sites if producers.get(io[s.module][1]) is not None
                  and producers[io[s.module][1]].op_type in ("MatMul", "Gemm")
                  and producers[io[s.module][1]].name == s.node]
    if fp32_nodes:
        raise ShiraInputError(f"quantized graph: target nodes {fp32_nodes} are still fp32 (expected the quantizer to "
                              f"have replaced every targeted MatMul)")
    inserted: dict[int, list[onnx.NodeProto]] = {}
    for site in sites:
        x, y = io[site.module]
        producer = producers.get(y)
        if producer is None:
            raise ShiraInputError(f"quantized graph: no node writes {y!r}, the output of target {site.module!r}")
        y_base = f"{QPREFIX}/{site.module}/y_base"
        producer.output[list(producer.output).index(y)] = y_base
        position = list(graph.node).index(producer)
        inserted[position] = _delta_nodes(site, x, y_base, y, threshold)
    new_nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(graph.node):
        new_nodes.append(node)
        new_nodes.extend(inserted.get(i, []))
    del graph.node[:]
    graph.node.extend(new_nodes)
    if model.ir_version < 4:
        model.ir_version = 4  # overridable initializers
    for site in sites:
        dim = f"nnz_{site.module.replace('.', '_')}"
        for name, dtype in ((indices_name(site.module), TensorProto.INT32), (values_name(site.module), TensorProto.FLOAT)):
            graph.input.append(helper.make_tensor_value_info(name, dtype, [dim]))
            graph.initializer.append(helper.make_tensor(name, dtype, [0], []))
