"""When an ONNX model must keep its tensors outside the .onnx file: protobuf cannot
serialize a message past 2 GiB, so larger models store them in one external data file
beside the graph (optimum's rule). One limit for every writer in this package."""

from __future__ import annotations

import onnx

__all__ = ["EXTERNAL_DATA_BYTES", "needs_external_data", "tensor_bytes"]

# protobuf's 2 GiB, less 64 MiB of headroom for the graph itself
EXTERNAL_DATA_BYTES = 2**31 - 2**26


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers' data."""
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)


def needs_external_data(model: onnx.ModelProto) -> bool:
    return tensor_bytes(model) > EXTERNAL_DATA_BYTES
