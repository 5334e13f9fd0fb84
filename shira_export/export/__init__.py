"""The export stage: base model + adapters in, a folder described by its manifest out
(`shira_export.artifacts`). It never verifies: `shira_export.pipeline` composes export ->
quantize -> verify, and is what the public `export_merged` / `export_sparse` are.

Names load on first use, so importing a submodule (the contract re-exports some) does not
load every exporter.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shira_export.export.merged import MergedExport, plan_merged, write_merged
    from shira_export.export.quantize import QuantizeReport, quantize_onnx_model
    from shira_export.export.sparse import SparseExportResult, add_adapter_file, plan_sparse, write_sparse
    from shira_export.export.tasks import Dtype, Task

_NAMES = {
    "Dtype": "tasks",
    "Task": "tasks",
    "MergedExport": "merged",
    "plan_merged": "merged",
    "write_merged": "merged",
    "QuantizeReport": "quantize",
    "quantize_onnx_model": "quantize",
    "SparseExportResult": "sparse",
    "add_adapter_file": "sparse",
    "plan_sparse": "sparse",
    "write_sparse": "sparse",
}
__all__ = [
    "Dtype",
    "MergedExport",
    "QuantizeReport",
    "SparseExportResult",
    "Task",
    "add_adapter_file",
    "plan_merged",
    "plan_sparse",
    "quantize_onnx_model",
    "write_merged",
    "write_sparse",
]


# The public entry points moved to the pipeline (export no longer verifies itself); the old
# names keep working for code written against 0.x, with a warning, and load nothing until used.
_MOVED = {"export_merged", "export_sparse"}


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(import_module(f"shira_export.export.{_NAMES[name]}"), name)
    if name in _MOVED:
        import warnings

        warnings.warn(
            f"shira_export.export.{name} moved: use shira_export.{name} (shira_export.pipeline)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(import_module("shira_export.pipeline"), name)
    raise AttributeError(f"module 'shira_export.export' has no attribute {name!r}")
