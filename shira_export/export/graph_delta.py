"""Graph surgery for the sparse export: find each targeted weight by content, add a
sparse-delta branch fed by overridable inputs, and derive the runtime's dense variant.

Per targeted module `m`, the base node `Y = MatMul(X, B)` (or `Gemm(X, B, C)`) becomes

    Y = If(Size(values) > 0,
           then: row = idx / in; col = idx - row * in            # flat = out * in_features + in
                 If(tokens > threshold,
                    then: base op(X, ScatterND(B, (row, col), values, reduction=add))  # long inputs
                    else: ScatterElements(base op(X, B), row, X[:, col] * values, add)),  # short inputs
           else: base op(X, B))                                  # no adapter, or not in this adapter

`shira.<m>.indices` (int32 [nnz]) and `shira.<m>.values` (fp32 [nnz]) are graph inputs
with zero-size initializers of the same name, so with no adapter the graph is the base
model. Long inputs pay one copy of B (cheap next to their MatMul); short inputs never copy
B, whose copy would dominate a decode step (ANCHORS 4b).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from shira_export.errors import ShiraInputError

__all__ = [
    "TargetSite",
    "indices_name",
    "values_name",
    "weight_name",
    "locate_targets",
    "graph_fingerprint",
    "insert_sparse_deltas",
    "to_dense_variant",
    "DEFAULT_TOKEN_THRESHOLD",
    "site_base_node",
]

PREFIX = "shira"
# Above this many rows (batch x tokens) per call the weight-scatter branch runs. Measured on
# one 768x768 site with 12,288 nonzeros (ORT 1.32, CPU): short/long branch 148/215 us at 1 row,
# 282/284 us at 2, 481/313 us at 4, 1420/451 us at 16; the short branch grows with rows x nnz.
DEFAULT_TOKEN_THRESHOLD = 2


def indices_name(module: str) -> str:
    return f"{PREFIX}.{module}.indices"


def values_name(module: str) -> str:
    return f"{PREFIX}.{module}.values"


def weight_name(module: str) -> str:
    """Name of the targeted weight as an input of the runtime's dense variant."""
    return f"{PREFIX}.{module}.weight"


@dataclass(frozen=True)
class TargetSite:
    """Where one targeted module lives in the exported graph."""

    module: str
    node: str  # name of the MatMul / Gemm node in the base graph
    initializer: str  # the weight initializer that node reads
    out_features: int
    in_features: int
    transposed: bool  # True: the graph weight is [out, in] (Gemm transB=1); False: [in, out]
    digest: str  # sha1 of the weight bytes, for the fingerprint

    def to_json(self) -> dict:
        return {
            "module": self.module, "node": self.node, "initializer": self.initializer,
            "out_features": self.out_features, "in_features": self.in_features,
            "weight_layout": "out_in" if self.transposed else "in_out",
        }


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def locate_targets(model: onnx.ModelProto, weights: Mapping[str, np.ndarray]) -> tuple[list[TargetSite], list[str]]:
    """Match each module's weight ([out, in], float) to the initializer feeding its node.

    Matching is by content (an exporter's names are not stable): the graph holds either
    W^T ([in, out], MatMul) or W ([out, in], Gemm transB=1). Returns (sites, unused):
    `unused` are modules whose weight is nowhere in the graph because the exported outputs
    do not depend on them (e.g. BERT's pooler in a feature-extraction export)."""
    graph = model.graph
    by_key: dict[tuple, list[str]] = {}
    for init in graph.initializer:
        if init.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16) or len(init.dims) != 2:
            continue
        arr = numpy_helper.to_array(init)
        by_key.setdefault((tuple(arr.shape), _digest(arr.astype(np.float32))), []).append(init.name)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    sites: list[TargetSite] = []
    unused: list[str] = []
    problems: list[str] = []
    for module in sorted(weights):
        w = np.asarray(weights[module], dtype=np.float32)
        out_f, in_f = w.shape
        found: list[tuple[str, onnx.NodeProto, bool]] = []
        present = False
        for transposed, arr in ((False, w.T), (True, w)):
            for name in by_key.get((tuple(arr.shape), _digest(arr)), []):
                present = True
                for node in consumers.get(name, []):
                    if _weight_slot_ok(node, name, transposed):
                        found.append((name, node, transposed))
        if not present:
            unused.append(module)
            continue
        if len(found) != 1:
            what = "no MatMul/Gemm reads it" if not found else f"{len(found)} nodes read it ({[f[1].name for f in found]})"
            problems.append(f"module {module!r} (weight {out_f}x{in_f}): {what}")
            continue
        name, node, transposed = found[0]
        if len(consumers[name]) != 1:
            problems.append(f"module {module!r}: its weight {name!r} is shared by {len(consumers[name])} nodes")
            continue
        sites.append(TargetSite(module, node.name, name, out_f, in_f, transposed, _digest(w)))
    if problems:
        raise ShiraInputError(
            "cannot place the sparse delta in the exported graph (expected each targeted weight, as W^T or W, "
            "in exactly one MatMul/Gemm):\n  " + "\n  ".join(problems)
        )
    return sites, unused


def _weight_slot_ok(node: onnx.NodeProto, name: str, transposed: bool) -> bool:
    if len(node.input) < 2 or node.input[1] != name:
        return False
    if node.op_type == "MatMul":
        return not transposed
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return False
        return bool(attrs.get("transB", 0)) == transposed
    return False


def graph_fingerprint(sites: Sequence[TargetSite]) -> str:
    """sha256 over every targeted module's name, shape, layout and weight bytes."""
    h = hashlib.sha256()
    for s in sorted(sites, key=lambda s: s.module):
        h.update(f"{s.module}|{s.out_features}x{s.in_features}|{int(s.transposed)}|{s.digest}\n".encode())
    return h.hexdigest()


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(value, name))


def _delta_nodes(site: TargetSite, base: onnx.NodeProto, threshold: int, value_type: int) -> list[onnx.NodeProto]:
    # Op count, not arithmetic, is what a decode step pays here (each ORT kernel launch costs
    # microseconds), so the short branch is 6 ops and an empty adapter tensor skips it all.
    p = f"{PREFIX}/{site.module}/"
    x, w = base.input[0], base.input[1]
    y = base.output[0]
    vals = values_name(site.module)
    info = lambda n: helper.make_tensor_value_info(n, value_type, None)  # noqa: E731
    cast_vals = []
    if value_type != TensorProto.FLOAT:
        cast_vals = [helper.make_node("Cast", [vals], [p + "vals"], name=p + "cast_vals", to=value_type)]
        vals = p + "vals"
    # long inputs: scatter into a copy of the weight, then the base op
    a, b = (p + "row", p + "col") if site.transposed else (p + "col", p + "row")
    long_nodes = [
        _const(p + "axis1", np.array([1], np.int64)),
        helper.make_node("Unsqueeze", [a, p + "axis1"], [p + "a2"], name=p + "a2"),
        helper.make_node("Unsqueeze", [b, p + "axis1"], [p + "b2"], name=p + "b2"),
        helper.make_node("Concat", [p + "a2", p + "b2"], [p + "pairs32"], name=p + "pairs32", axis=1),
        helper.make_node("Cast", [p + "pairs32"], [p + "pairs"], name=p + "pairs", to=TensorProto.INT64),
        helper.make_node("ScatterND", [w, p + "pairs", vals], [p + "w_eff"], name=p + "w_eff", reduction="add"),
        _copy_node(base, p + "long_op", {1: p + "w_eff"}, p + "y_long"),
    ]
    # short inputs: base op, then y[n, row] += x[n, col] * value over the N = batch x tokens rows.
    # GatherElements/ScatterElements: ORT's Gather copies index by index, ~6x slower here.
    short_nodes = [
        _copy_node(base, p + "short_op", {}, p + "y0"),
        _const(p + "x2_shape", np.array([-1, site.in_features], np.int64)),
        helper.make_node("Reshape", [x, p + "x2_shape"], [p + "x2"], name=p + "x2"),  # [N, in]
        helper.make_node("Shape", [p + "x2"], [p + "n"], name=p + "n", start=0, end=1),
        _const(p + "one", np.array([1], np.int64)),
        helper.make_node("Concat", [p + "n", p + "one"], [p + "n1"], name=p + "n1", axis=0),
        helper.make_node("Expand", [p + "col", p + "n1"], [p + "cols"], name=p + "cols"),  # [N, nnz]
        helper.make_node("GatherElements", [p + "x2", p + "cols"], [p + "g"], name=p + "g", axis=1),
        helper.make_node("Mul", [p + "g", vals], [p + "u"], name=p + "u"),
        helper.make_node("Expand", [p + "row", p + "n1"], [p + "rows"], name=p + "rows"),
        _const(p + "y2_shape", np.array([-1, site.out_features], np.int64)),
        helper.make_node("Reshape", [p + "y0", p + "y2_shape"], [p + "y2"], name=p + "y2"),  # [N, out]
        helper.make_node("ScatterElements", [p + "y2", p + "rows", p + "u"], [p + "ys"], name=p + "ys",
                         axis=1, reduction="add"),
        helper.make_node("Shape", [p + "y0"], [p + "y_shape"], name=p + "y_shape"),
        helper.make_node("Reshape", [p + "ys", p + "y_shape"], [p + "y_short"], name=p + "y_short"),
    ]
    delta_nodes = cast_vals + [
        _const(p + "in_f", np.array(site.in_features, np.int32)),
        helper.make_node("Div", [indices_name(site.module), p + "in_f"], [p + "row"], name=p + "row"),  # output index
        helper.make_node("Mul", [p + "row", p + "in_f"], [p + "row_start"], name=p + "row_start"),
        helper.make_node("Sub", [indices_name(site.module), p + "row_start"], [p + "col"], name=p + "col"),  # input index
        helper.make_node("Size", [x], [p + "x_size"], name=p + "x_size"),
        _const(p + "limit", np.array(threshold * site.in_features, np.int64)),
        helper.make_node("Greater", [p + "x_size", p + "limit"], [p + "long"], name=p + "long"),
        helper.make_node("If", [p + "long"], [p + "y_delta"], name=p + "If_long",
                         then_branch=helper.make_graph(long_nodes, p + "long_g", [], [info(p + "y_long")]),
                         else_branch=helper.make_graph(short_nodes, p + "short_g", [], [info(p + "y_short")])),
    ]
    base_nodes = [_copy_node(base, p + "base", {}, p + "y_base")]
    # else_branch.node[0] is the base op: other stages (to_dense_variant, quantize) rely on it
    return [
        helper.make_node("Size", [values_name(site.module)], [p + "nnz"], name=p + "nnz"),
        _const(p + "zero", np.array(0, np.int64)),
        helper.make_node("Greater", [p + "nnz", p + "zero"], [p + "active"], name=p + "active"),
        helper.make_node("If", [p + "active"], [y], name=p + "If",
                         then_branch=helper.make_graph(delta_nodes, p + "delta_g", [], [info(p + "y_delta")]),
                         else_branch=helper.make_graph(base_nodes, p + "base_g", [], [info(p + "y_base")])),
    ]


def site_base_node(if_node: onnx.NodeProto) -> onnx.NodeProto:
    """The base MatMul/Gemm inside a site's `shira/<m>/If` node (its else branch, first node)."""
    return next(a for a in if_node.attribute if a.name == "else_branch").g.node[0]


def _copy_node(node: onnx.NodeProto, name: str, replace: Mapping[int, str], output: str) -> onnx.NodeProto:
    new = onnx.NodeProto()
    new.CopyFrom(node)
    new.name = name
    for slot, value in replace.items():
        new.input[slot] = value
    del new.output[:]
    new.output.append(output)
    return new


def insert_sparse_deltas(model: onnx.ModelProto, sites: Sequence[TargetSite], *,
                         threshold: int = DEFAULT_TOKEN_THRESHOLD) -> None:
    """Rewrite `model` in place: one delta branch per site, adapter inputs with empty defaults."""
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 16:
        raise ShiraInputError(f"the sparse export needs opset >= 16 (ScatterND reduction='add'); the graph has opset {opset}")
    if model.ir_version < 4:
        model.ir_version = 4  # overridable initializers
    by_node = {s.node: s for s in sites}
    dtypes = {i.name: i.data_type for i in graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        site = by_node.get(node.name)
        if site is None:
            new_nodes.append(node)
            continue
        new_nodes.extend(_delta_nodes(site, node, threshold, dtypes[site.initializer]))
    del graph.node[:]
    graph.node.extend(new_nodes)
    for site in sites:
        for name, dtype in ((indices_name(site.module), TensorProto.INT32), (values_name(site.module), TensorProto.FLOAT)):
            graph.input.append(helper.make_tensor_value_info(name, dtype, [f"nnz_{_dim_key(site.module)}"]))
            graph.initializer.append(helper.make_tensor(name, dtype, [0], []))


def _dim_key(module: str) -> str:
    return module.replace(".", "_")


def to_dense_variant(model: onnx.ModelProto, sites: Sequence[TargetSite], *,
                     defaults: bool = True) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The runtime's variant of a sparse graph: each site is its base op again, reading the
    weight from an input `shira.<m>.weight`. With `defaults` the base weight stays as its
    initializer (overridable); without, it is returned instead ({module: array}) and the
    input is required."""
    if any(p.key == "shira.genai_groups" for p in model.metadata_props):  # genai builder graph: q|k|v packed
        from shira_export.export.genai_sites import builder_dense_variant

        return builder_dense_variant(model, sites, defaults=defaults)
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    graph = dense.graph
    prefixes = {f"{PREFIX}/{s.module}/": s for s in sites}
    drop_inputs = {indices_name(s.module) for s in sites} | {values_name(s.module) for s in sites}
    renames = {s.initializer: weight_name(s.module) for s in sites}
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        prefix = node.name.rsplit("/", 1)[0] + "/" if node.name.startswith(PREFIX + "/") else None
        site = prefixes.get(prefix) if prefix else None
        if site is None:
            new_nodes.append(node)
        elif node.op_type == "If":
            base = site_base_node(node)
            new_nodes.append(_copy_node(base, site.node, {1: weight_name(site.module)}, node.output[0]))
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [i for i in graph.initializer if i.name not in drop_inputs]
    for init in kept:
        if init.name in renames:
            init.name = renames[init.name]
    by_name = {i.name: i for i in kept}
    weights = {s.module: by_name[weight_name(s.module)] for s in sites}
    if not defaults:
        kept = [i for i in kept if i.name not in {weight_name(s.module) for s in sites}]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [i for i in graph.input if i.name not in drop_inputs]
    del graph.input[:]
    graph.input.extend(inputs)
    for init in weights.values():
        graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    arrays = {} if defaults else {m: numpy_helper.to_array(i) for m, i in weights.items()}
    return dense, arrays
