"""The one ONNX writer: every `.onnx` this package writes goes through `save_onnx`.

Protobuf cannot serialize a message past 2 GiB, so a larger model keeps its tensors in one
external data file beside the graph (optimum's rule); smaller ones are one file unless the
caller needs external data anyway (the genai builder's layout).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import onnx

__all__ = ["EXTERNAL_DATA_BYTES", "needs_external_data", "save_onnx", "tensor_bytes"]

# protobuf's 2 GiB, less 64 MiB of headroom for the graph itself
EXTERNAL_DATA_BYTES = 2**31 - 2**26


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers' data."""
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)


def needs_external_data(model: onnx.ModelProto) -> bool:
    return tensor_bytes(model) > EXTERNAL_DATA_BYTES


def save_onnx(
    model: onnx.ModelProto,
    path: Union[str, os.PathLike],
    *,
    location: Optional[str] = None,
    external: Optional[bool] = None,
) -> Path:
    """Write `model` at `path`. Its tensors go to `location` (default `<name>_data`) beside
    it when `external` says so, or (None) when they pass EXTERNAL_DATA_BYTES. A stale data
    file of that name is removed first: onnx appends to an existing one."""
    path = Path(path)
    location = location or path.name + "_data"
    (path.parent / location).unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=needs_external_data(model) if external is None else external,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=1024,
    )
    return path
