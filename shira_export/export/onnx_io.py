"""When an ONNX model must keep its tensors outside the .onnx file: protobuf cannot
serialize a message past 2 GiB, so larger models store them in one external data file
beside the graph (optimum's rule). One limit for every writer in this package."""

from __future__ import annotations

import onnx

__all__ = ["EXTERNAL_DATA_BYTES", "needs_external_data", "save_onnx", "tensor_bytes"]

# protobuf's 2 GiB, less 64 MiB of headroom for the graph itself
EXTERNAL_DATA_BYTES = 2**31 - 2**26


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers' data."""
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)


def needs_external_data(model: onnx.ModelProto) -> bool:
    return tensor_bytes(model) > EXTERNAL_DATA_BYTES


def save_onnx(model: onnx.ModelProto, path) -> None:
    """Write `model` at `path`; past the limit its tensors go to `<name>_data` beside it.
    A stale data file of an earlier write is removed first."""
    from pathlib import Path

    path = Path(path)
    data = path.parent / (path.name + "_data")
    data.unlink(missing_ok=True)
    external = needs_external_data(model)
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
