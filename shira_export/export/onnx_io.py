"""Moved to the contract package: `shira_export.artifacts.onnx_io` (re-exported here)."""

from shira_export.artifacts.onnx_io import EXTERNAL_DATA_BYTES, needs_external_data, save_onnx, tensor_bytes

__all__ = ["EXTERNAL_DATA_BYTES", "needs_external_data", "save_onnx", "tensor_bytes"]
