"""Graph edits on onnx-ir (the sparse-delta sites, the quantizer's passes, the runtime's dense
variant), written back into the ModelProto in place. Stage-neutral, so it lives in the
contract package: export and runtime both edit graphs with it.

`edited(model)` gives one pass the model as an `ir.Model` (converted once per pass) and, when
the pass returns without raising, writes the nodes, the initializers and (when the pass
changed them) the graph inputs back into the same ModelProto. It does not go through `ir.to_proto`: that copies every initializer, and the
quantizer runs on models of several GB. onnx-ir wraps each initializer's TensorProto without
copying its data, so an initializer the pass did not replace stays where it is, untouched;
only removed ones are deleted and new ones serialized. Graph inputs that stay keep their
proto as it was; outputs, value_info, opsets and metadata are not written back (a pass that
renames a graph output keeps its name on the new producer: `replace`).

Subgraphs (If / Loop bodies) are graph attributes in onnx-ir and read outer values directly,
so `Value.uses()` counts a reader inside a subgraph as a reader.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import onnx
import onnx_ir as ir

__all__ = [
    "edited",
    "infer_shapes",
    "constant",
    "op",
    "replace",
    "redirect",
    "detach",
    "graph_values",
    "sole_consumer",
    "is_unused",
]


@contextmanager
def edited(model: onnx.ModelProto) -> Iterator[ir.Model]:
    """`model` as onnx-ir for one pass; written back into `model` on a normal exit (on an
    exception `model` is left as it was). The view is spent after the block: the arrays of
    new initializers are handed to the proto and released."""
    view = ir.serde.deserialize_model(model)
    original = {name: value.const_value for name, value in view.graph.initializers.items()}
    inputs = [value.name for value in view.graph.inputs]
    yield view
    _write_back(model, view, original)
    if [value.name for value in view.graph.inputs] != inputs:
        _write_inputs(model.graph, view.graph)


def infer_shapes(view: ir.Model, values: Iterable[str]) -> None:
    """ONNX shape inference on `view` (in place, initializers left out of the call) when a
    value named in `values` has no shape: the sites read their input's rank (delta_sites).
    A graph it cannot infer is left as it is (its sites take the general path)."""
    known = {v.name: v for node in view.graph for v in node.outputs}
    known.update({v.name: v for v in view.graph.inputs})
    if all(known.get(name) is None or known[name].shape is not None for name in values):
        return
    import logging

    from onnx_ir.passes.common import ShapeInferencePass

    log = logging.getLogger("onnx_ir.passes.common.shape_inference")
    level, log.level = log.level, logging.ERROR  # a graph it cannot infer is not the user's problem
    try:
        ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(view)
    finally:
        log.setLevel(level)


def _write_inputs(graph: onnx.GraphProto, view: ir.Graph) -> None:
    """The view's graph inputs: the protos of those that stay as they were, new ones serialized."""
    old = {proto.name: proto for proto in graph.input}
    protos = []
    for value in view.inputs:
        proto = onnx.ValueInfoProto()
        if value.name in old:
            proto.CopyFrom(old[value.name])
        else:
            ir.serde.serialize_value_into(proto, value)
        protos.append(proto)
    del graph.input[:]
    graph.input.extend(protos)


def _write_back(model: onnx.ModelProto, view: ir.Model, original: dict) -> None:
    graph = model.graph
    del graph.node[:]
    for node in view.graph:
        ir.serde.serialize_node_into(graph.node.add(), node)
    kept: set[str] = set()
    new: list[ir.Value] = []
    originals = {id(tensor) for tensor in original.values() if tensor is not None}
    for name, value in view.graph.initializers.items():
        tensor = value.const_value
        if tensor is None:
            continue
        if id(tensor) in originals:  # renamed or not: onnx-ir renames the wrapped proto itself
            kept.add(name)
        else:
            new.append(value)
    for i in reversed(range(len(graph.initializer))):  # by index: no copy of the kept ones
        if graph.initializer[i].name not in kept:
            del graph.initializer[i]
    for value in new:
        proto = graph.initializer.add()
        ir.serde.serialize_tensor_into(proto, value.const_value)  # type: ignore[arg-type]
        proto.name = value.name or ""
        value.const_value = None  # the view ends here: its array goes as soon as the proto has the bytes


def constant(graph: ir.Graph, name: str, value: Union[np.ndarray, Callable[[], np.ndarray]]) -> ir.Value:
    """The initializer `name`, added from `value` (an array, or a function computing it, called
    only when `name` is new) unless the graph has it already."""
    existing = graph.initializers.get(name)
    if existing is not None:
        return existing
    tensor = ir.tensor(value() if callable(value) else value, name=name)
    result = ir.Value(
        name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape.numpy()), const_value=tensor
    )
    graph.register_initializer(result)
    return result


def op(
    op_type: str,
    inputs: Sequence[Optional[ir.Value]],
    output: str,
    *,
    name: str,
    domain: str = "",
    **attributes: object,
) -> ir.Node:
    """A one-output node whose output is named `output` (names are the file's contract)."""
    return ir.node(
        op_type,
        list(inputs),
        attributes,  # type: ignore[arg-type]
        domain=domain,
        outputs=[ir.Value(name=output)],
        name=name,
    )


def _inherit(before: ir.Value, after: ir.Value) -> None:
    """What the graph knew of a value's type and shape, kept by its replacement."""
    if after.type is None:
        after.type = before.type
    if after.shape is None and before.shape is not None:
        after.shape = before.shape


def replace(
    graph: ir.Graph,
    old: Sequence[ir.Node],
    new: Sequence[ir.Node],
    old_values: Sequence[ir.Value],
    new_values: Sequence[ir.Value],
) -> None:
    """Put `new` where the first of `old` (given in graph order) was; each of `old_values` is
    replaced by the matching `new_values` (its name, type and shape where the new one has
    none, graph outputs included), then `old` goes."""
    graph.insert_before(old[0], new)
    for before, after in zip(old_values, new_values):
        _inherit(before, after)
        before.replace_all_uses_with(after, replace_graph_outputs=True)
        name = before.name
        before.name = None
        after.name = name
    graph.remove(old, safe=True)


def redirect(graph: ir.Graph, old: ir.Value, new: ir.Value, uses: Iterable[tuple[ir.Node, int]]) -> None:
    """The readers `uses` of `old` (taken before the nodes that write `new` read `old`) and,
    where `old` is a graph output, that output now read `new`; names are the caller's (type
    and shape move to `new` where it has none)."""
    _inherit(old, new)
    for node, slot in uses:  # Value.uses(): (node, input index)
        node.replace_input_with(slot, new)
    for i, output in enumerate(graph.outputs):
        if output is old:
            graph.outputs[i] = new


def detach(nodes: Iterable[ir.Node]) -> None:
    """Each node, and each node of its subgraphs, stops reading its inputs: before a removal,
    a removed If's branches would otherwise still count as readers of outer values."""
    for node in nodes:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                detach(attr.as_graph())
            elif attr.type == ir.AttributeType.GRAPHS:
                for graph in attr.as_graphs():
                    detach(graph)
        for i in range(len(node.inputs)):
            node.replace_input_with(i, None)


def graph_values(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value of `graph` (inputs, initializers, node outputs; not subgraphs')."""
    values = {value.name: value for value in graph.inputs if value.name}
    values.update((name, value) for name, value in graph.initializers.items())
    values.update((value.name, value) for node in graph for value in node.outputs if value.name)
    return values


def is_unused(value: ir.Value) -> bool:
    """No node reads `value` (subgraphs included) and it is not a graph output."""
    return not value.uses() and not value.is_graph_output()


def sole_consumer(value: Optional[ir.Value]) -> Optional[ir.Node]:
    """The node reading `value` when it is its only reader (one input slot, subgraphs
    included) and `value` is no graph output: a pattern may rewire or remove that node."""
    if value is None or value.is_graph_output():
        return None
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 else None
