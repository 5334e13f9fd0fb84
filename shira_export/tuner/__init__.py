"""Training side: a PEFT-compatible SHiRA tuner."""

from shira_export.tuner.config import MaskType, ShiraConfig
from shira_export.tuner.model import ShiraModel, get_shira_model, inject_adapter_in_model

__all__ = ["MaskType", "ShiraConfig", "ShiraModel", "get_shira_model", "inject_adapter_in_model"]
