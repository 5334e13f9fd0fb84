"""The quantizer's graph edits on onnx-ir, written back into the ModelProto in place.

`edited(model)` gives one pass the model as an `ir.Model` (converted once per pass) and, when
the pass returns without raising, writes the nodes and the initializers back into the same
ModelProto. It does not go through `ir.to_proto`: that copies every initializer, and the
quantizer runs on models of several GB. onnx-ir wraps each initializer's TensorProto without
copying its data, so an initializer the pass did not replace stays where it is, untouched;
only removed ones are deleted and new ones serialized. Graph inputs, outputs, value_info,
opsets and metadata are not edited by these passes and stay as they were.

Subgraphs (If / Loop bodies) are graph attributes in onnx-ir and read outer values directly,
so `Value.uses()` counts a reader inside a subgraph as a reader.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["edited", "constant", "op", "replace", "sole_consumer", "is_unused"]


@contextmanager
def edited(model: onnx.ModelProto) -> Iterator[ir.Model]:
    """`model` as onnx-ir for one pass; written back into `model` on a normal exit (on an
    exception `model` is left as it was). The view is spent after the block: the arrays of
    new initializers are handed to the proto and released."""
    view = ir.serde.deserialize_model(model)
    original = {name: value.const_value for name, value in view.graph.initializers.items()}
    yield view
    _write_back(model, view, original)


def _write_back(model: onnx.ModelProto, view: ir.Model, original: dict) -> None:
    graph = model.graph
    del graph.node[:]
    for node in view.graph:
        ir.serde.serialize_node_into(graph.node.add(), node)
    kept: set[str] = set()
    new: list[ir.Value] = []
    for name, value in view.graph.initializers.items():
        tensor = value.const_value
        if tensor is None:
            continue
        if original.get(name) is tensor:
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


def replace(
    graph: ir.Graph,
    old: Sequence[ir.Node],
    new: Sequence[ir.Node],
    old_values: Sequence[ir.Value],
    new_values: Sequence[ir.Value],
) -> None:
    """Put `new` where the first of `old` (given in graph order) was; each of `old_values` is
    replaced by the matching `new_values` (its name, graph outputs included), then `old` goes."""
    graph.insert_before(old[0], new)
    for before, after in zip(old_values, new_values):
        before.replace_all_uses_with(after, replace_graph_outputs=True)
        name = before.name
        before.name = None
        after.name = name
    graph.remove(old, safe=True)


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
