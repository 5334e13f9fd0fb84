"""onnx-ir node builders, called by name: the sparse-delta sites (export) and the dense
variant (runtime) build their nodes with it.

`Nodes` collects the nodes of one graph, the model's (an edit) or an If branch, in the order
they are made: `b.op("Gather", [p + "x3", idx], p + "g", axis=2)` appends a node named after
its output `p + "g"` that reads the values named `p + "x3"` and `idx`. A name is looked up in
the builder's own scope, then in the scopes of the graphs it is nested in (an If branch
reads outer values directly), so it must be made before it is read; `b.branch()` starts a
nested builder and `branch.graph(...)` closes it into the `ir.Graph` of an If attribute.
Attributes are written in name order, as onnx.helper writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, MutableMapping, Optional, Sequence

import numpy as np
import onnx_ir as ir
from onnx import helper

from shira_export.artifacts import ir_edits

__all__ = ["Nodes", "Op"]


@dataclass(frozen=True)
class Op:
    """An op a site is built around (its base MatMul / Gemm / MatMulNBits): copied into the
    site's branches, reading the values named `inputs` ("" for an absent optional input)."""

    op_type: str
    inputs: tuple[str, ...]
    domain: str = ""
    attributes: tuple[ir.Attr, ...] = ()
    doc_string: Optional[str] = None
    metadata: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, node: ir.Node) -> "Op":
        return cls(
            node.op_type,
            tuple((v.name or "") if v is not None else "" for v in node.inputs),
            node.domain,
            tuple(node.attributes.values()),
            node.doc_string,
            tuple(node.metadata_props.items()),
        )


class Nodes:
    """The nodes of one graph, made by name (see the module docstring)."""

    def __init__(self, values: Optional[MutableMapping[str, ir.Value]] = None, parent: Optional["Nodes"] = None):
        self.nodes: list[ir.Node] = []
        self._values: MutableMapping[str, ir.Value] = values if values is not None else {}
        self._parent = parent

    def __getitem__(self, name: str) -> ir.Value:
        scope: Optional[Nodes] = self
        while scope is not None:
            value = scope._values.get(name)
            if value is not None:
                return value
            scope = scope._parent
        raise KeyError(f"site builder: no value named {name!r} in scope (read before it was made)")

    def define(self, value: ir.Value) -> ir.Value:
        """Make an existing value (a graph input, a renamed output) readable by its name."""
        self._values[value.name or ""] = value
        return value

    def _add(self, node: ir.Node) -> str:
        self.nodes.append(node)
        for value in node.outputs:
            self.define(value)
        return node.outputs[0].name or ""

    def op(
        self, op_type: str, inputs: Sequence[str], output: str, *, name: str = "", domain: str = "", **attrs: object
    ) -> str:
        """One node writing `output`, named after it unless `name` is given; returns `output`."""
        inputs_ = [self[i] if i else None for i in inputs]
        return self._add(
            ir_edits.op(op_type, inputs_, output, name=name or output, domain=domain, **dict(sorted(attrs.items())))
        )

    def const(self, name: str, value: object) -> str:
        """A Constant node whose output has the node's name."""
        return self.op("Constant", [], name, value=ir.tensor(np.asarray(value), name=name))

    def filled(self, output: str, shape: str, value_type: int, value: float) -> str:
        """ConstantOfShape: a tensor of run-time `shape` (an int64 tensor's name) filled with `value`."""
        fill = ir.serde.TensorProtoTensor(helper.make_tensor("fill", value_type, [1], [value]))
        return self.op("ConstantOfShape", [shape], output, value=fill)

    def copy(self, op: Op, name: str, replace: Mapping[int, str], output: str) -> str:
        """`op` named `name`, writing `output`, its input slots in `replace` reading other names."""
        inputs = [replace.get(slot, value) for slot, value in enumerate(op.inputs)]
        return self._add(
            ir.Node(
                op.domain,
                op.op_type,
                [self[i] if i else None for i in inputs],
                attributes=[ir.Attr(a.name, a.type, a.value, doc_string=a.doc_string) for a in op.attributes],
                outputs=[ir.Value(name=output)],
                name=name,
                doc_string=op.doc_string,
                metadata_props=dict(op.metadata) if op.metadata else None,
            )
        )

    def branch(self) -> "Nodes":
        """A builder for an If branch: it reads this builder's names, its own stay inside."""
        return Nodes(parent=self)

    def graph(self, name: str, output: str, value_type: int) -> ir.Graph:
        """This branch as a graph named `name` with the one output `output` (elem type `value_type`)."""
        result = self[output]
        result.type = ir.TensorType(ir.DataType(value_type))
        return ir.Graph([], [result], nodes=self.nodes, name=name)

    def if_(self, cond: str, output: str, name: str, then: ir.Graph, otherwise: ir.Graph) -> str:
        return self.op("If", [cond], output, name=name, then_branch=then, else_branch=otherwise)
