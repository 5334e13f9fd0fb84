"""The runtime's dense variant of a sparse graph (`Mode.DENSE`, opt-in): each site is its
base op again, reading its weight from an input `shira.<m>.weight` that the runtime feeds
with the merged weight of the call's adapter. Runtime-only, so it lives here and reads the
graph through the contract's names (`shira_export.artifacts.naming`). The edit runs on
onnx-ir (`artifacts.ir_edits.edited`) on one copy of the model, as every graph edit does:
the weights it keeps are not serialized again."""

from __future__ import annotations

import json
from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from shira_export.artifacts.ir_edits import constant, detach, edited, graph_values, replace
from shira_export.artifacts.naming import (
    GENAI_GROUPS_KEY,
    PREFIX,
    TargetSite,
    adapter_input_names,
    site_base_node,
    weight_name,
)
from shira_export.artifacts.onnx_nodes import Nodes, Op
from shira_export.errors import ShiraInputError

__all__ = ["to_dense_variant"]


def _site_nodes(graph: ir.Graph, keys: Sequence[str]) -> dict[str, list[ir.Node]]:
    """The nodes named `shira/<key>/...` of each key, in graph order."""
    found: dict[str, list[ir.Node]] = {key: [] for key in keys}
    for node in graph:
        name = node.name or ""
        if name.startswith(PREFIX + "/"):
            nodes = found.get(name[len(PREFIX) + 1 :].rsplit("/", 1)[0])
            if nodes is not None:
                nodes.append(node)
    return found


def _swap(graph: ir.Graph, site: list[ir.Node], ifs: dict[ir.Node, list[ir.Node]]) -> None:
    """The nodes `ifs[n]` take the place of each If `n` of the site (its output keeps its
    name: the last new node writes it); the site's other nodes, branches included, go."""
    detach(site)  # the branches stop reading outer values (the base weight, adapter inputs)
    for if_node, new in ifs.items():
        replace(graph, [if_node], new, [if_node.outputs[0]], [new[-1].outputs[0]])
    graph.remove([n for n in site if n not in ifs])


def _drop_inputs(graph: ir.Graph, names: set[str]) -> None:
    """The adapter inputs go: graph inputs and their (empty) default initializers."""
    for value in [v for v in graph.inputs if v.name in names]:
        graph.inputs.remove(value)
    for name in names:
        graph.initializers.pop(name, None)


def to_dense_variant(
    model: onnx.ModelProto, sites: Sequence[TargetSite], *, defaults: bool = True
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The runtime's variant of a sparse graph: each site is its base op again, reading the
    weight from an input `shira.<m>.weight`. With `defaults` the base weight stays as its
    initializer (overridable); without, it is returned instead ({module: array}) and the
    input is required. `model` is not changed."""
    if any(p.key == GENAI_GROUPS_KEY for p in model.metadata_props):  # genai builder graph: q|k|v packed
        return _builder_dense_variant(model, sites, defaults=defaults)
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    arrays: dict[str, np.ndarray] = {}
    with edited(dense) as view:
        graph = view.graph
        nodes = _site_nodes(graph, [s.module for s in sites])
        b = Nodes(graph_values(graph))
        weights = []
        for site in sites:
            weight = graph.initializers[site.initializer]
            weight.name = weight_name(site.module)  # the base weight, renamed: the input the runtime feeds
            weights.append(b.define(weight))
            ifs = {}
            for node in (n for n in nodes[site.module] if n.op_type == "If"):
                b.copy(Op.of(site_base_node(node)), site.node, {1: weight.name}, node.outputs[0].name or "")
                ifs[node] = [b.nodes[-1]]
            _swap(graph, nodes[site.module], ifs)
        _drop_inputs(graph, {name for s in sites for name in adapter_input_names(s.module)})
        for site, weight in zip(sites, weights):
            weight.metadata_props.clear()  # the new input's proto: name, type, shape (the kept initializer's stays)
            graph.inputs.append(weight)
            if not defaults:
                tensor = graph.initializers.pop(weight.name or "").const_value
                arrays[site.module] = numpy_helper.to_array(tensor.raw)  # type: ignore[union-attr]
    return dense, arrays


def _builder_dense_variant(
    model: onnx.ModelProto, sites: Sequence[TargetSite], *, defaults: bool = True
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """`to_dense_variant` for genai builder graphs: each delta node is its base MatMul
    again, reading `Concat` of its column blocks, where a targeted module's block is (a
    slice of) its weight input `shira.<m>.weight` ([in, out_m], the module's own layout),
    so the runtime merges adapters per module exactly as on other graphs. Costs one copy
    of a packed weight per call (dense mode feeds weights anyway; no prepacking)."""
    groups = json.loads(next(p.value for p in model.metadata_props if p.key == GENAI_GROUPS_KEY))
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    out_features = {s.module: s.out_features for s in sites}
    blocks: dict[str, dict[int, np.ndarray]] = {}
    with edited(dense) as view:
        graph = view.graph
        b = Nodes(graph_values(graph))
        inputs: dict[str, ir.Value] = {}  # shira.<m>.weight, typed once every block is known

        def module_weight(module: str) -> str:
            if module not in inputs:
                inputs[module] = b.define(ir.Value(name=weight_name(module)))
            return weight_name(module)

        replaced: list[ir.Value] = []  # packed weights now read through the module inputs
        nodes = _site_nodes(graph, list(groups))
        heads = {f"{PREFIX}/{key}/If": key for key in groups}
        for if_node in [n for n in graph if n.op_type == "If" and n.name in heads]:  # graph order: names, order
            key = heads.pop(if_node.name or "")
            new = _dense_group(graph, b, if_node, key, groups[key], out_features, blocks, module_weight, replaced)
            _swap(graph, nodes[key], {if_node: new})  # the group's index prelude and branch selectors go too
        for key in heads.values():
            _swap(graph, nodes[key], {})
        arrays = {
            m: np.ascontiguousarray(np.concatenate([bs[k] for k in sorted(bs)], axis=1)) for m, bs in blocks.items()
        }
        _drop_inputs(graph, {name for s in sites for name in adapter_input_names(s.module)})
        for value in replaced:
            if not value.uses() and value.name in graph.initializers:
                graph.initializers.pop(value.name or "")
        for module, array in sorted(arrays.items()):
            value = inputs[module]
            value.type = ir.TensorType(ir.DataType.FLOAT if array.dtype == np.float32 else ir.DataType.FLOAT16)
            value.shape = ir.Shape(array.shape)
            graph.inputs.append(value)
            if defaults:
                value.const_value = ir.tensor(array, name=value.name)
                graph.register_initializer(value)
    return dense, ({} if defaults else arrays)


def _dense_group(
    graph: ir.Graph,
    b: Nodes,
    if_node: ir.Node,
    key: str,
    group: dict,
    out_features: dict[str, int],
    blocks: dict[str, dict[int, np.ndarray]],
    module_weight: Callable[[str], str],
    replaced: list[ir.Value],
) -> list[ir.Node]:
    """The nodes that replace one group's If: its base MatMul reading the Concat of the
    group's column blocks (module inputs or slices of them, constant columns between)."""
    base = site_base_node(if_node)
    packed = base.inputs[1]
    if base.op_type != "MatMul" or packed is None or packed.name not in graph.initializers:
        raise ShiraInputError(
            f"node {base.name}: the dense variant needs a float MatMul weight "
            f"(quantized builder graphs run with mode='portable')"
        )
    w = numpy_helper.to_array(packed.const_value.raw)  # type: ignore[union-attr]
    replaced.append(packed)
    start_node = len(b.nodes)
    p = f"{PREFIX}/{key}/dense/"

    def init(name: str, array: np.ndarray) -> str:  # a new initializer, readable by name
        return b.define(constant(graph, name, array)).name or ""

    parts: list[str] = []
    col = 0
    for i, piece in enumerate(sorted(group["pieces"], key=lambda g: g["offset"])):
        if piece["offset"] > col:  # columns no targeted module owns stay constant
            parts.append(init(f"{p}cols{col}", np.ascontiguousarray(w[:, col : piece["offset"]])))
        module, start, rows, offset = piece["module"], piece["row_start"], piece["rows"], piece["offset"]
        blocks.setdefault(module, {})[start] = w[:, offset : offset + rows]
        if start == 0 and rows == out_features[module]:
            parts.append(module_weight(module))
        else:
            bounds = [
                init(f"{p}{tag}{i}", np.array([v], np.int64))
                for tag, v in (("s", start), ("e", start + rows), ("a", 1))
            ]
            parts.append(b.op("Slice", [module_weight(module), *bounds], f"{p}part{i}"))
        col = offset + rows
    if col < w.shape[1]:
        parts.append(init(f"{p}cols{col}", np.ascontiguousarray(w[:, col:])))
    weight = parts[0]
    if len(parts) > 1:
        weight = b.op("Concat", parts, f"{p}w", axis=1)
    b.copy(Op.of(base), f"{p}op", {1: weight}, if_node.outputs[0].name or "")
    return b.nodes[start_node:]
