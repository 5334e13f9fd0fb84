"""The runtime's dense variant of a sparse graph (`Mode.DENSE`, opt-in): each site is its
base op again, reading its weight from an input `shira.<m>.weight` that the runtime feeds
with the merged weight of the call's adapter. Runtime-only, so it lives here and reads the
graph through the contract's names (`shira_export.artifacts.naming`)."""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from shira_export.artifacts.naming import (
    GENAI_GROUPS_KEY,
    PREFIX,
    TargetSite,
    adapter_input_names,
    site_base_node,
    weight_name,
)
from shira_export.errors import ShiraInputError

__all__ = ["to_dense_variant"]


def _base_op(base: onnx.NodeProto, name: str, weight: str, output: str) -> onnx.NodeProto:
    """A copy of the site's base MatMul/Gemm named `name`, reading `weight`, writing `output`."""
    op = onnx.NodeProto()
    op.CopyFrom(base)
    op.name, op.input[1] = name, weight
    del op.output[:]
    op.output.append(output)
    return op


def to_dense_variant(
    model: onnx.ModelProto, sites: Sequence[TargetSite], *, defaults: bool = True
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The runtime's variant of a sparse graph: each site is its base op again, reading the
    weight from an input `shira.<m>.weight`. With `defaults` the base weight stays as its
    initializer (overridable); without, it is returned instead ({module: array}) and the
    input is required."""
    if any(p.key == GENAI_GROUPS_KEY for p in model.metadata_props):  # genai builder graph: q|k|v packed
        return _builder_dense_variant(model, sites, defaults=defaults)
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    graph = dense.graph
    prefixes = {f"{PREFIX}/{s.module}/": s for s in sites}
    drop_inputs = {name for s in sites for name in adapter_input_names(s.module)}
    renames = {s.initializer: weight_name(s.module) for s in sites}
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        prefix = node.name.rsplit("/", 1)[0] + "/" if node.name.startswith(PREFIX + "/") else None
        site = prefixes.get(prefix) if prefix else None
        if site is None:
            new_nodes.append(node)
        elif node.op_type == "If":
            base = site_base_node(node)
            new_nodes.append(_base_op(base, site.node, weight_name(site.module), node.output[0]))
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
    graph = dense.graph
    inits = {i.name: i for i in graph.initializer}
    blocks: dict[str, dict[int, np.ndarray]] = {}
    extra_inits: list[onnx.TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []
    prefixes = {f"{PREFIX}/{key}/": key for key in groups}
    out_features = {s.module: s.out_features for s in sites}
    replaced: set[str] = set()  # packed weights now read through the module inputs
    for node in graph.node:
        key = prefixes.get(node.name.rsplit("/", 1)[0] + "/") if node.name.startswith(PREFIX + "/") else None
        if key is None:
            new_nodes.append(node)
            continue
        if node.op_type != "If" or node.name != f"{PREFIX}/{key}/If":
            continue  # the group's index prelude and branch selectors go with the branch
        base = site_base_node(node)
        if base.op_type != "MatMul" or base.input[1] not in inits:
            raise ShiraInputError(
                f"node {base.name}: the dense variant needs a float MatMul weight "
                f"(quantized builder graphs run with mode='portable')"
            )
        w = numpy_helper.to_array(inits[base.input[1]])
        replaced.add(base.input[1])
        p = f"{PREFIX}/{key}/dense/"
        parts, col = [], 0
        for i, piece in enumerate(sorted(groups[key]["pieces"], key=lambda g: g["offset"])):
            if piece["offset"] > col:  # columns no targeted module owns stay constant
                extra_inits.append(
                    numpy_helper.from_array(np.ascontiguousarray(w[:, col : piece["offset"]]), f"{p}cols{col}")
                )
                parts.append(f"{p}cols{col}")
            module, start, rows, offset = piece["module"], piece["row_start"], piece["rows"], piece["offset"]
            blocks.setdefault(module, {})[start] = w[:, offset : offset + rows]
            if start == 0 and rows == out_features[module]:
                parts.append(weight_name(module))
            else:
                extra_inits += [
                    numpy_helper.from_array(np.array([start], np.int64), f"{p}s{i}"),
                    numpy_helper.from_array(np.array([start + rows], np.int64), f"{p}e{i}"),
                    numpy_helper.from_array(np.array([1], np.int64), f"{p}a{i}"),
                ]
                new_nodes += [
                    helper.make_node(
                        "Slice",
                        [weight_name(module), f"{p}s{i}", f"{p}e{i}", f"{p}a{i}"],
                        [f"{p}part{i}"],
                        name=f"{p}part{i}",
                    ),
                ]
                parts.append(f"{p}part{i}")
            col = offset + rows
        if col < w.shape[1]:
            extra_inits.append(numpy_helper.from_array(np.ascontiguousarray(w[:, col:]), f"{p}cols{col}"))
            parts.append(f"{p}cols{col}")
        weight = parts[0]
        if len(parts) > 1:
            weight = f"{p}w"
            new_nodes.append(helper.make_node("Concat", parts, [weight], name=f"{p}w", axis=1))
        new_nodes.append(_base_op(base, f"{p}op", weight, node.output[0]))
    del graph.node[:]
    graph.node.extend(new_nodes)
    arrays = {m: np.ascontiguousarray(np.concatenate([b[k] for k in sorted(b)], axis=1)) for m, b in blocks.items()}
    drop = {name for s in sites for name in adapter_input_names(s.module)}
    used = {name for n in graph.node for name in n.input}
    kept = [i for i in graph.initializer if i.name not in drop and (i.name in used or i.name not in replaced)]
    del graph.initializer[:]
    graph.initializer.extend(kept + extra_inits)
    inputs = [i for i in graph.input if i.name not in drop]
    del graph.input[:]
    graph.input.extend(inputs)
    for module, array in sorted(arrays.items()):
        graph.input.append(
            helper.make_tensor_value_info(
                weight_name(module),
                TensorProto.FLOAT if array.dtype == np.float32 else TensorProto.FLOAT16,
                list(array.shape),
            )
        )
        if defaults:
            graph.initializer.append(numpy_helper.from_array(array, weight_name(module)))
    return dense, ({} if defaults else arrays)
