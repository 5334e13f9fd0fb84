"""shira-export: SHiRA adapters from training to ONNX Runtime deployment."""

from shira_export.tuner import ShiraConfig, ShiraModel, get_shira_model

__version__ = "0.1.0"
__all__ = ["ShiraConfig", "ShiraModel", "get_shira_model", "__version__"]
