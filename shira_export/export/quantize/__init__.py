"""The quantize stage: int8 / int4 base weights of an ONNX export (folder or file).

    from shira_export.export.quantize import QuantizeOptions, quantize_onnx_model
    report = quantize_onnx_model("out/merged", "out/merged_int4", mode="int4")
    report = quantize_onnx_model("out/sparse", "out/sparse_int8", options=QuantizeOptions(mode="int8"))

Modules: options (typed options), cpu (features and per-CPU choices), mixed (bit plan),
graph (checks, quantizer runs), tables (embedding tables), tied (tied head/table sharing),
api (files and folders, the manifest). The sparse delta over a quantized base lives in
export.quant_delta (shared with the genai builder path).
"""

from shira_export.export.quantize.api import QuantizeReport, quantize_model, quantize_onnx_model
from shira_export.export.quantize.cpu import Choices, CpuFeatures, choose, cpu_features
from shira_export.export.quantize.options import (
    BLOCK_SIZES,
    Int8Method,
    QuantizeOptions,
    QuantMode,
    check_quantize_options,
)

__all__ = [
    "BLOCK_SIZES",
    "Choices",
    "CpuFeatures",
    "Int8Method",
    "QuantMode",
    "QuantizeOptions",
    "QuantizeReport",
    "check_quantize_options",
    "choose",
    "cpu_features",
    "quantize_model",
    "quantize_onnx_model",
]
