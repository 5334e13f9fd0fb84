"""shira-export: SHiRA adapters from training to ONNX Runtime deployment."""

from typing import Any

__version__ = "0.1.0"
__all__ = [
    "ShiraConfig",
    "ShiraModel",
    "get_shira_model",
    "inject_adapter_in_model",
    "export_merged",
    "export_sparse",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # Lazy: `shira-export --help` and `import shira_export.errors` must not import torch.
    if name in ("ShiraConfig", "ShiraModel", "get_shira_model", "inject_adapter_in_model"):
        from shira_export import tuner

        return getattr(tuner, name)
    if name in ("export_merged", "export_sparse"):  # export -> quantize -> verify (shira_export.pipeline)
        from shira_export import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'shira_export' has no attribute {name!r}")
