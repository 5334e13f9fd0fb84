"""onnxruntime sessions over export folders: sparse ones with many adapters chosen per
call (`ShiraSession`), merged ones (`PlainSession`), generation with the KV cache."""

from shira_export.runtime.generation import CausalLMOutput, ShiraORTModelForCausalLM
from shira_export.runtime.plain import PlainSession
from shira_export.runtime.session import Mode, ShiraSession

__all__ = ["Mode", "ShiraSession", "PlainSession", "ShiraORTModelForCausalLM", "CausalLMOutput"]
