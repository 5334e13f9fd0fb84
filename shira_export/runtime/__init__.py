"""onnxruntime sessions over sparse exports: many adapters, the adapter chosen per call."""

from shira_export.runtime.generation import CausalLMOutput, ShiraORTModelForCausalLM
from shira_export.runtime.session import Mode, ShiraSession

__all__ = ["Mode", "ShiraSession", "ShiraORTModelForCausalLM", "CausalLMOutput"]
