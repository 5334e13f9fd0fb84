"""Graph surgery for the sparse export: find each targeted weight by content, add a
sparse-delta site fed by overridable inputs, and derive the runtime's dense variant.

Per targeted module `m`, the base node `Y = MatMul(X, W)` (or `Gemm(X, W, C)`) becomes one
site (export.delta_sites):

    D = sum_k(X[..., ell_indices] * ell_values) + scatter(row, X[..., col] * values)  # in the graph
    Y = If(tokens > threshold,
           then: MatMul(X, W + both parts scattered) per adapter row  # long inputs (prefill)
           else: base op(X, W) + D)                                   # decode; no adapter: adds 0

`shira.<m>.ell_indices` / `.ell_values` (int32 / fp32 [R, 1, K * out], defaults [1, 1, out]
zeros: K = 1 of padding) and `shira.<m>.indices` / `.values` (int32 / fp32 [R, 1, nnz],
defaults [1, 1, 0]) are graph inputs with initializers of the same name (export.site_layout:
the two parts of one adapter), so with no adapter the graph is the base model. R = 1: one
adapter for the whole batch (an `.onnx_adapter` file, LoraAdapter, genai); R = batch: row b
of the batch uses row b of the arrays (a mixed batch, padded with index 0 / value 0.0).
Short inputs never copy W, whose copy would dominate a decode step (ANCHORS 4b), and keep
its prepacked constant; long inputs pay one copy per adapter row.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from shira_export.errors import ShiraInputError
from shira_export.export.delta_sites import site_nodes
from shira_export.artifacts.ir_edits import edited, graph_values, infer_shapes, replace
from shira_export.artifacts.onnx_nodes import Nodes, Op

__all__ = [
    "TargetSite",
    "indices_name",
    "values_name",
    "ell_indices_name",
    "ell_values_name",
    "adapter_input_names",
    "weight_name",
    "locate_targets",
    "graph_fingerprint",
    "insert_sparse_deltas",
    "DEFAULT_TOKEN_THRESHOLD",
    "site_base_node",
    "add_adapter_inputs",
    "check_graph_contract",
]

PREFIX = "shira"
# Above this many tokens per sequence (x [B, S, in]: S; a flattened x: rows per adapter row) the
# weight branch runs.
# Chosen on the graph before schema 4 (tools/bench_site.py, one 768x768 site, 12,288 nonzeros):
# the activation branch was cheaper at 1 row, even at 2, and dearer from 4 rows on.
DEFAULT_TOKEN_THRESHOLD = 2


def indices_name(module: str) -> str:
    return f"{PREFIX}.{module}.indices"


def values_name(module: str) -> str:
    return f"{PREFIX}.{module}.values"


def ell_indices_name(module: str) -> str:
    return f"{PREFIX}.{module}.ell_indices"


def ell_values_name(module: str) -> str:
    return f"{PREFIX}.{module}.ell_values"


def adapter_input_names(module: str) -> tuple[str, str, str, str]:
    """Every graph input one module's delta takes (export.delta_sites: the scattered part, then the ELL part)."""
    return indices_name(module), values_name(module), ell_indices_name(module), ell_values_name(module)


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
            "module": self.module,
            "node": self.node,
            "initializer": self.initializer,
            "out_features": self.out_features,
            "in_features": self.in_features,
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
            what = (
                "no MatMul/Gemm reads it" if not found else f"{len(found)} nodes read it ({[f[1].name for f in found]})"
            )
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


def _delta_nodes(b: Nodes, site: TargetSite, base: Op, y: str, threshold: int, value_type: int) -> str:
    """One site's nodes (delta_sites.site_nodes) appended to `b`, replacing `base`, which writes `y`."""
    return site_nodes(
        b,
        f"{PREFIX}/{site.module}/",
        base.inputs[0],
        y,
        *adapter_input_names(site.module),
        site.in_features,
        site.out_features,
        threshold=threshold,
        value_type=value_type,
        base=base,
        transposed=site.transposed,
    )


def site_base_node(if_node: ir.Node) -> ir.Node:
    """The base MatMul/Gemm of a site's `shira/<m>/If` node (named `shira/<m>/base`)."""
    prefix = (if_node.name or "").rsplit("/", 1)[0] + "/"
    branches = [a.as_graph() for a in if_node.attributes.values() if a.type == ir.AttributeType.GRAPH]
    for nodes in branches:
        for node in nodes:
            if node.name == prefix + "base":
                return node
    raise ShiraInputError(
        f"node {if_node.name!r}: no base op {prefix + 'base'!r} in its branches (expected a graph "
        f"written by this release's `shira-export sparse`; re-export)"
    )


def insert_sparse_deltas(
    model: onnx.ModelProto, sites: Sequence[TargetSite], *, threshold: int = DEFAULT_TOKEN_THRESHOLD
) -> None:
    """Rewrite `model` in place: one delta branch per site, adapter inputs with empty defaults."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 16:
        raise ShiraInputError(
            f"the sparse export needs opset >= 16 (ScatterND reduction='add'); the graph has opset {opset}"
        )
    if model.ir_version < 4:
        model.ir_version = 4  # overridable initializers
    by_node = {s.node: s for s in sites}
    with edited(model) as view:
        graph = view.graph
        infer_shapes(view, [(n.inputs[0].name or "") for n in graph if n.name in by_node and n.inputs[0] is not None])
        add_adapter_inputs(graph, [s.module for s in sites], {s.module: s.out_features for s in sites})
        values = graph_values(graph)
        for node in list(graph):
            site = by_node.get(node.name or "")
            if site is None:
                continue
            b = Nodes(values)
            y = node.outputs[0]
            dtype = graph.initializers[site.initializer].const_value.dtype  # type: ignore[union-attr]
            _delta_nodes(b, site, Op.of(node), y.name or "", threshold, int(dtype))
            replace(graph, [node], b.nodes, [y], [b[y.name or ""]])


def check_graph_contract(model_path: object, sites: Sequence[TargetSite], graph_inputs: set) -> None:
    """Refuse a sparse graph of an earlier release, whose sites lack this release's inputs
    (the two-part layout of export.site_layout): re-exporting is the fix."""
    missing = [s.module for s in sites if not set(adapter_input_names(s.module)) <= graph_inputs]
    if missing:
        raise ShiraInputError(
            f"{model_path}: sparse graph of an earlier release (module {missing[0]!r} lacks the inputs "
            f"{list(adapter_input_names(missing[0]))}); re-export it with `shira-export sparse`"
        )


def _dim_key(module: str) -> str:
    return module.replace(".", "_")


def add_adapter_inputs(graph: ir.Graph, modules: Sequence[str], out_features: Mapping[str, int]) -> None:
    """Per module, `shira.<m>.indices` int32 / `.values` fp32 [R, 1, nnz] inputs with [1, 1, 0]
    defaults and `.ell_indices` int32 / `.ell_values` fp32 [R, 1, K * out] with [1, 1, out]
    zeros (K = 1, all padding: the decode reads K from the part's size): no delta."""
    for module in modules:
        key, out_f = _dim_key(module), int(out_features[module])
        idx, vals, ell_idx, ell_vals = adapter_input_names(module)
        flat_dims: list[str | int] = [f"rows_{key}", 1, f"nnz_{key}"]
        ell_dims: list[str | int] = [f"rows_{key}", 1, f"slots_{key}"]
        for name, dtype, dims, default in (
            (idx, TensorProto.INT32, flat_dims, [1, 1, 0]),
            (vals, TensorProto.FLOAT, flat_dims, [1, 1, 0]),
            (ell_idx, TensorProto.INT32, ell_dims, [1, 1, out_f]),
            (ell_vals, TensorProto.FLOAT, ell_dims, [1, 1, out_f]),
        ):
            value = ir.Value(
                name=name,
                type=ir.TensorType(ir.DataType(dtype)),
                shape=ir.Shape(dims),
                const_value=ir.tensor(np.zeros(default, helper.tensor_dtype_to_np_dtype(dtype)), name=name),
            )
            graph.inputs.append(value)
            graph.register_initializer(value)
