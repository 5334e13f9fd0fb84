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

       d = delta(x) on the activations                           # in the graph
       y = If(n > threshold, then: y_base + MatMul(x, scatter(zeros, both parts)),   # long inputs
                             else: y_base + d)                                        # decode

The adapter inputs keep their names and shapes (`shira.<m>.indices` int32 / `.values` fp32
[R, 1, nnz], `.ell_indices` / `.ell_values` [R, 1, K * out]), so the fp32 export's
`.onnx_adapter` files and mixed batches work unchanged, the delta in full precision.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Mapping, MutableMapping, Sequence

import onnx
import onnx_ir as ir

from shira_export.errors import ShiraInputError
from shira_export.export.delta_sites import site_nodes
from shira_export.export.graph_delta import (
    PREFIX,
    TargetSite,
    adapter_input_names,
    add_adapter_inputs,
    site_base_node,
)
from shira_export.artifacts.ir_edits import infer_shapes, detach, edited, graph_values, redirect, replace
from shira_export.artifacts.onnx_nodes import Nodes, Op
from shira_export.export.packed_weight import PACKED_TOKEN_THRESHOLD, dequantized_nodes, packed_int4

__all__ = ["QPREFIX", "strip_sparse_deltas", "site_io", "attach_quantized_deltas", "quantized_site", "place_site"]

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
    by_prefix = {f"{PREFIX}/{s.module}/": s for s in sites}
    io: dict[str, tuple[str, str]] = {}
    with edited(model) as view:
        graph = view.graph
        b = Nodes(graph_values(graph))
        drop: list[ir.Node] = []
        for node in list(graph):
            if not (node.name or "").startswith(PREFIX + "/"):
                continue
            site = by_prefix.get((node.name or "").rsplit("/", 1)[0] + "/")
            if site is None:
                raise ShiraInputError(f"sparse graph: node {node.name!r} belongs to no target in the manifest")
            drop.append(node)
            if node.op_type == "If" and node.name == f"{PREFIX}/{site.module}/If":
                y = node.outputs[0]  # the base op comes back in the If's place, writing its output
                base = Op.of(site_base_node(node))
                b.copy(base, site.node, {}, y.name or "")
                graph.insert_before(node, b.nodes[-1])
                redirect(graph, y, b[y.name or ""], list(y.uses()))
                io[site.module] = (base.inputs[0], y.name or "")
        missing = sorted(set(s.module for s in sites) - set(io))
        if missing:
            raise ShiraInputError(
                f"sparse graph: no delta branch for targets {missing} (expected a graph written by `shira-export sparse`)"
            )
        detach(drop)
        graph.remove(drop, safe=True)
        adapter_inputs = {name for s in sites for name in adapter_input_names(s.module)}
        for value in [v for v in graph.inputs if v.name in adapter_inputs]:
            graph.inputs.remove(value)
        for name in adapter_inputs:
            graph.initializers.pop(name, None)
    return io


def quantized_site(
    b: Nodes,
    site: TargetSite,
    producer: ir.Node,
    x: str,
    y: str,
    threshold: int,
) -> bool:
    """Append to `b` the site for the quantized op `producer` writing `y` (the If's output is
    named `y`); returns whether the producer stays in the graph. A 4-bit MatMulNBits moves
    into the site (export.packed_weight: it decodes, its dequantized weight prefills); any
    other quantized op stays and its output, renamed `y_base`, gets the delta on the
    activations."""
    info = packed_int4(producer)
    p = f"{QPREFIX}/{site.module}/"
    names = adapter_input_names(site.module)
    if info is None or info["N"] != site.out_features or info["K"] != site.in_features:
        y_base = p + "y_base"
        output = next(v for v in producer.outputs if v.name == y)
        output.name = y_base
        b.define(output)
        site_nodes(b, p, x, y, *names, site.in_features, site.out_features, threshold=threshold, y_base=y_base)
        return True
    decode = Op.of(producer)
    w_nk = p + "deq/w_nk"
    # [out, in] read with transB: a Transpose of the dequantized weight would copy it per call
    prefill = Op("FusedMatMul", (x, w_nk), "com.microsoft", (ir.Attr("transB", ir.AttributeType.INT, 1),))

    def prelude(branch: Nodes, tag: str) -> str:  # the dequantized weight of one branch
        return dequantized_nodes(branch, p + "deq/" + tag, decode.inputs, info, p + "R")

    site_nodes(
        b,
        p,
        x,
        y,
        *names,
        site.in_features,
        site.out_features,
        threshold=max(threshold, PACKED_TOKEN_THRESHOLD),
        base=prefill,
        transposed=True,
        decode_base=decode,
        weight_prelude=prelude,
    )
    return False


def place_site(
    graph: ir.Graph,
    producer: ir.Node,
    y: str,
    values: MutableMapping[str, ir.Value],
    build: Callable[[Nodes], bool],
) -> None:
    """Put the nodes `build(b)` appends (a site writing `y`, see quantized_site; True: the
    producer stays) into `graph` after `producer`, or in its place; `y`'s readers and graph
    output move to the site's If."""
    old = next(v for v in producer.outputs if v.name == y)
    uses = list(old.uses())
    b = Nodes(values)
    keep = build(b)
    new = b[y]
    if keep:
        graph.insert_after(producer, b.nodes)
        redirect(graph, old, new, uses)
    else:
        replace(graph, [producer], b.nodes, [old], [new])


def attach_quantized_deltas(
    model: onnx.ModelProto, sites: Sequence[TargetSite], io: Mapping[str, tuple[str, str]], *, threshold: int
) -> None:
    """Add an activation-side delta after each site's (quantized) base op, in place.

    `io` is {module: (x, y)} from before quantization; the quantizers keep both tensor
    names (the new op reads x and writes y). Adds the adapter inputs with empty defaults."""
    with edited(model) as view:
        graph = view.graph
        producers = {value.name: node for node in graph for value in node.outputs}
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
        missing = [(s.module, io[s.module][1]) for s in sites if io[s.module][1] not in producers]
        if missing:
            module, y = missing[0]
            raise ShiraInputError(f"quantized graph: no node writes {y!r}, the output of target {module!r}")
        infer_shapes(view, [io[s.module][0] for s in sites])
        add_adapter_inputs(graph, [s.module for s in sites], {s.module: s.out_features for s in sites})
        values = graph_values(graph)
        for site in sites:
            x, y = io[site.module]
            build = partial(quantized_site, site=site, producer=producers[y], x=x, y=y, threshold=threshold)
            place_site(graph, producers[y], y, values, build)
    if model.ir_version < 4:
        model.ir_version = 4  # overridable initializers
