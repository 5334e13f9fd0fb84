"""Deployment artifacts from a base model and SHiRA adapters."""

from shira_export.export.merged import MergedExport, export_merged
from shira_export.export.quantize import QuantizeReport, quantize_onnx_model
from shira_export.export.sparse import SparseExportResult, add_adapter_file, export_sparse
from shira_export.export.tasks import Dtype, Task

__all__ = [
    "Dtype",
    "MergedExport",
    "QuantizeReport",
    "SparseExportResult",
    "Task",
    "add_adapter_file",
    "export_merged",
    "export_sparse",
    "quantize_onnx_model",
]
