"""Detect int8 saturation on this CPU before choosing `reduce_range` (ANCHORS 6).

On x86 without VNNI, ORT's u8 x s8 kernels sum pairs of products into int16 and can
saturate (max error 0.56 instead of 0.05 seen with per-channel weights); 7-bit weights
(`reduce_range=True`) avoid it at the cost of one bit. Whether it happens depends on the
CPU ORT runs on, so it is measured, not guessed: a few of the model's own weights, each
in a one-MatMul graph, are run in fp32 and int8 (with and without `reduce_range`) on
activations shaped like a transformer's (signed, and post-GELU non-negative with a tail).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["probe_int8_saturation", "SATURATION_RATIO", "SATURATION_MIN_ERROR"]

SATURATION_RATIO = 2.0  # full-range error this many times the 7-bit error ...
SATURATION_MIN_ERROR = 0.02  # ... and above this relative error: saturation
_PROBE_WEIGHTS = 3
_ROWS = 64


def _matmul_model(weight: np.ndarray) -> onnx.ModelProto:
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="probe")], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _activations(k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    signed = rng.standard_normal((_ROWS // 2, k))
    positive = np.abs(rng.standard_normal((_ROWS // 2, k))) * 3.0  # one-sided, like GELU outputs
    return np.concatenate([signed, positive]).astype(np.float32)


def _rel_error(model: onnx.ModelProto, x: np.ndarray, ref: np.ndarray, **kwargs) -> float:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from shira_export.export.quant_graph import _quiet

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    with tempfile.TemporaryDirectory(prefix="shira_probe_") as tmp, _quiet():
        path = Path(tmp) / "q.onnx"
        quantize_dynamic(model, path, weight_type=QuantType.QInt8, **kwargs)
        y = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-12))


def probe_int8_saturation(model: onnx.ModelProto, *, per_channel: bool) -> dict:
    """Relative error of int8 vs fp32 on the model's widest-range weights, with and
    without `reduce_range`; `use_reduce_range` is True when saturation shows."""
    candidates = [i for i in model.graph.initializer
                  if i.data_type == TensorProto.FLOAT and len(i.dims) == 2 and min(i.dims) >= 16]
    consumers = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1}
    weights = [numpy_helper.to_array(i) for i in candidates if i.name in consumers]
    weights.sort(key=lambda w: -float(np.abs(w).max()))
    full, reduced = [], []
    for w in weights[:_PROBE_WEIGHTS]:
        single = _matmul_model(w)
        x = _activations(w.shape[0])
        ref = x.astype(np.float64) @ w.astype(np.float64)
        full.append(_rel_error(single, x, ref, per_channel=per_channel, reduce_range=False))
        reduced.append(_rel_error(single, x, ref, per_channel=per_channel, reduce_range=True))
    worst_full, worst_reduced = max(full, default=0.0), max(reduced, default=0.0)
    saturation = worst_full > SATURATION_MIN_ERROR and worst_full > SATURATION_RATIO * worst_reduced
    return {
        "weights_probed": len(full),
        "max_rel_error": {"full_range": round(worst_full, 5), "reduce_range": round(worst_reduced, 5)},
        "saturation": bool(saturation),
        "use_reduce_range": bool(saturation),
    }
