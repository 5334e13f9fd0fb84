"""Small builders of ONNX nodes shared by the sparse-delta site modules."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["const", "op", "copy_node", "filled"]


def const(name: str, value: object) -> onnx.NodeProto:
    """A Constant node whose output has the node's name."""
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(np.asarray(value), name))


def op(op_type: str, inputs: Sequence[str], output: str, **attrs: Any) -> onnx.NodeProto:
    """One node named after its output (every name under the site's prefix)."""
    return helper.make_node(op_type, list(inputs), [output], name=output, **attrs)


def copy_node(node: onnx.NodeProto, name: str, replace: Mapping[int, str], output: str) -> onnx.NodeProto:
    new = onnx.NodeProto()
    new.CopyFrom(node)
    new.name = name
    for slot, value in replace.items():
        new.input[slot] = value
    del new.output[:]
    new.output.append(output)
    return new


def filled(output: str, shape: str, value_type: int, value: float) -> onnx.NodeProto:
    """ConstantOfShape: a tensor of run-time `shape` (an int64 tensor's name) filled with `value`."""
    return helper.make_node(
        "ConstantOfShape", [shape], [output], name=output, value=helper.make_tensor("fill", value_type, [1], [value])
    )
