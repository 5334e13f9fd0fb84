"""Sparse deltas over a quantized base graph.

A quantized weight is packed (MatMulNBits blocks, int8 MatMulInteger), so the fp32
graph's weight branch, W + scatter, cannot run on it; and quantizing a graph whose W is
computed in-graph leaves that layer fp32 (ANCHORS 6). So the order is:

1. `strip_sparse_deltas`: the sparse export's graph back to its base graph (each
   `shira/<m>/If` becomes its base MatMul/Gemm again; the adapter inputs go away), and
   where each targeted layer reads its input `x` and writes its output `y`;
2. quantize that base graph (export.quantize);
3. `attach_quantized_deltas`: per targeted layer, `y = y_base + delta(x)`, W untouched,
   with the same site as the fp32 graph (export.delta_sites, `y_base` form):

       y = If(n > threshold and nnz > 0,
              then: y_base + MatMul(x3, scatter(zeros[R, in, out], values))   # long inputs
              else: scatter(y_base, row, x3[..., col] * values))              # decode

The adapter inputs keep their names and the [R, nnz] contract (`shira.<m>.indices`
int32, `shira.<m>.values` fp32, [1, 0] defaults), so the fp32 export's `.onnx_adapter`
files and mixed batches work unchanged, the delta in full precision.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import onnx
from onnx import helper

from shira_export.errors import ShiraInputError
from shira_export.export.delta_sites import site_nodes
from shira_export.export.packed_weight import PACKED_WORK_THRESHOLD, dequantized_nodes, packed_int4
from shira_export.export.graph_delta import (
    PREFIX,
    TargetSite,
    adapter_input_names,
    add_adapter_inputs,
    site_base_node,
)

__all__ = ["QPREFIX", "strip_sparse_deltas", "site_io", "attach_quantized_deltas"]

QPREFIX = "shira_q"  # node-name prefix of the delta branches on a quantized graph


def site_io(model: onnx.ModelProto, sites: Sequence[TargetSite]) -> dict[str, tuple[str, str]]:
    """{module: (input x, output y)} of each site's base node in an unmodified base graph."""
    nodes = {n.name: n for n in model.graph.node}
    missing = [s.node for s in sites if s.node not in nodes]
    if missing:
        raise ShiraInputError(
            f"base graph: target nodes {missing} not found (expected the graph the sites were located in)"
        )
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
        if node.op_type == "If" and node.name == f"{PREFIX}/{site.module}/If":
            base = onnx.NodeProto()
            base.CopyFrom(site_base_node(node))
            base.name = site.node
            base.output[0] = node.output[0]
            new_nodes.append(base)
            io[site.module] = (base.input[0], base.output[0])
    missing = sorted(set(s.module for s in sites) - set(io))
    if missing:
        raise ShiraInputError(
            f"sparse graph: no delta branch for targets {missing} (expected a graph written by `shira-export sparse`)"
        )
    adapter_inputs = {name for s in sites for name in adapter_input_names(s.module)}
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop(graph.input, adapter_inputs)
    _drop(graph.initializer, adapter_inputs)
    return io


def _drop(container, names: set) -> None:
    kept = [x for x in container if x.name not in names]
    del container[:]
    container.extend(kept)


def _delta_nodes(site: TargetSite, x: str, y_base: str, y: str, threshold: int) -> list[onnx.NodeProto]:
    """One site over a quantized base op that reads `x` and now writes `y_base`."""
    return site_nodes(
        f"{QPREFIX}/{site.module}/",
        x,
        y,
        *adapter_input_names(site.module),
        site.in_features,
        site.out_features,
        threshold=threshold,
        y_base=y_base,
    )


def quantized_site(
    site: TargetSite,
    producer: onnx.NodeProto,
    x: str,
    y: str,
    threshold: int,
    initializers: Mapping[str, onnx.TensorProto],
) -> tuple[bool, list[onnx.NodeProto]]:
    """(keep the producer in the graph, the site's nodes) for the quantized op `producer`
    writing `y`. A 4-bit MatMulNBits moves into the site (export.packed_weight: it decodes, its
    dequantized weight prefills); any other quantized op stays and its output gets the
    delta on the activations."""
    info = packed_int4(producer, initializers)
    p = f"{QPREFIX}/{site.module}/"
    if info is None or info["N"] != site.out_features or info["K"] != site.in_features:
        y_base = p + "y_base"
        producer.output[list(producer.output).index(y)] = y_base
        return True, _delta_nodes(site, x, y_base, y, threshold)
    prelude, wt = dequantized_nodes(p + "deq/", producer, info, p + "R")
    return False, site_nodes(
        p,
        x,
        y,
        *adapter_input_names(site.module),
        site.in_features,
        site.out_features,
        threshold=threshold,
        work_threshold=PACKED_WORK_THRESHOLD,
        base=helper.make_node("MatMul", [x, wt], [y], name=p + "fp32"),
        decode_base=producer,
        weight_prelude=prelude,
    )


def attach_quantized_deltas(
    model: onnx.ModelProto, sites: Sequence[TargetSite], io: Mapping[str, tuple[str, str]], *, threshold: int
) -> None:
    """Add an activation-side delta after each site's (quantized) base op, in place.

    `io` is {module: (x, y)} from before quantization; the quantizers keep both tensor
    names (the new op reads x and writes y). Adds the adapter inputs with empty defaults."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    fp32_nodes = [
        s.node
        for s in sites
        if producers.get(io[s.module][1]) is not None
        and producers[io[s.module][1]].op_type in ("MatMul", "Gemm")
        and producers[io[s.module][1]].name == s.node
    ]
    if fp32_nodes:
        raise ShiraInputError(
            f"quantized graph: target nodes {fp32_nodes} are still fp32 (expected the quantizer to "
            f"have replaced every targeted MatMul)"
        )
    position = {id(node): i for i, node in enumerate(graph.node)}
    initializers = {i.name: i for i in graph.initializer}
    inserted: dict[int, list[onnx.NodeProto]] = {}
    moved: set[int] = set()
    for site in sites:
        x, y = io[site.module]
        producer = producers.get(y)
        if producer is None:
            raise ShiraInputError(f"quantized graph: no node writes {y!r}, the output of target {site.module!r}")
        keep, nodes = quantized_site(site, producer, x, y, threshold, initializers)
        if not keep:
            moved.add(position[id(producer)])
        inserted.setdefault(position[id(producer)], []).extend(nodes)
    new_nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(graph.node):
        if i not in moved:
            new_nodes.append(node)
        new_nodes.extend(inserted.get(i, []))
    del graph.node[:]
    graph.node.extend(new_nodes)
    if model.ir_version < 4:
        model.ir_version = 4  # overridable initializers
    add_adapter_inputs(graph, [s.module for s in sites], {s.module: s.out_features for s in sites})
