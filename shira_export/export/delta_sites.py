"""The nodes of one sparse-delta site, shared by the fp32 graph (graph_delta), the
quantized graph (quant_delta) and genai builder graphs (genai_sites).

Inputs per site, two parts of one delta (export.site_layout splits an adapter between them):

    ell_idx  int32 [R, K, out]  slot k of output feature j reads input feature ell_idx[r, k, j]
    ell_vals fp32  [R, K, out]  ... with this value (ELLPACK: the output feature is the position)
    idx      int32 [R, nnz]     the entries that do not fit K slots: flat out * in_features + in
    vals     fp32  [R, nnz]     (PyTorch's (out, in) layout)

R = 1 applies one adapter to the whole batch, R = B gives batch row b the adapter of row b.
Padding anywhere is index 0 / value 0.0 (adds 0: a no-op); the defaults are [1, 0, out] and
[1, 0]: no delta. Every slot says where it goes, so any order of entries is valid. x is
viewed as [R, n, in] (n = rows per adapter row), so a [B, S, in] input and a flattened
[B*S, in] one (OPT's fc1, GPT-2's Conv1D Gemm) map alike.

    row, col = idx / in, idx - row * in
    y = If(n > threshold and nnz + K > 0,                                         # or rows x entries
           then: MatMul(x3, W + scatter(ell) + scatter(col * out + row, vals))  # weight side: long inputs
                 (quantized: y_base + MatMul(x3, the same scatters into zeros); a MatMulNBits
                  site dequantizes W first: export.packed_weight)
           else: base op(x, W) + sum_k(x3[..., ell_idx] * ell_vals)             # activation side: decode
                               + scatter(row, x3[..., col] * vals))

The ELL part needs no scatter at decode (a gather, a product and a sum over K, about 2 ns
per slot against ~9 ns per entry of the scattered part: docs/sparse_format.md).

An empty adapter takes the activation branch, where zero-size tensors make every op a
no-op. The activation branch keeps the base op's constant weight, which onnxruntime
prepacks; the weight branch (export.delta_prefill, with a second If on R == 1) copies W
once per adapter row, cheap next to the MatMul of many rows. Measured per op:
docs/sparse_format.md.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from onnx import TensorProto

from shira_export.export.delta_prefill import weight_branch
from shira_export.artifacts.onnx_nodes import Nodes, Op

__all__ = ["site_nodes", "BASE_NODE"]

BASE_NODE = "base"  # name suffix of the site's base op inside its activation branch


def _views(b: Nodes, p: str, x: str, idx: str, ell_idx: str, in_f: int) -> None:
    """row / col [R, nnz], R, and x as [R, n, in]: what both branches read. R is the larger
    of the two parts' (a part with R = 1, e.g. its empty default, broadcasts)."""
    b.const(p + "in_f", np.array(in_f, np.int32))
    b.op("Div", [idx, p + "in_f"], p + "row")  # output index
    b.op("Mul", [p + "row", p + "in_f"], p + "row_start")
    b.op("Sub", [idx, p + "row_start"], p + "col")  # input index
    b.op("Shape", [idx], p + "R_coo", start=0, end=1)
    b.op("Shape", [ell_idx], p + "R_ell", start=0, end=1)
    b.op("Max", [p + "R_coo", p + "R_ell"], p + "R")
    b.const(p + "m1_in", np.array([-1, in_f], np.int64))
    b.op("Concat", [p + "R", p + "m1_in"], p + "x3_shape", axis=0)
    b.op("Reshape", [x, p + "x3_shape"], p + "x3")  # [R, n, in]


def _activation_branch(
    b: Nodes,
    p: str,
    vals: str,
    ell_idx: str,
    ell_vals: str,
    out_f: int,
    y0: str,
    base: Optional[Op],
    value_type: int,
) -> str:
    """y[r, n, j] += sum_k x[r, n, ell_idx[r, k, j]] * ell_vals[r, k, j], then
    y[r, n, row] += x[r, n, col] * value for the scattered entries: no copy of W."""
    if base is not None:
        b.copy(base, p + BASE_NODE, {}, y0)
    b.const(p + "ax1", np.array([1], np.int64))
    b.op("Unsqueeze", [p + "col", p + "ax1"], p + "col3")  # [R, 1, nnz]
    b.op("Unsqueeze", [p + "row", p + "ax1"], p + "row3")
    b.op("Unsqueeze", [vals, p + "ax1"], p + "vals3")
    b.op("Shape", [p + "x3"], p + "rn", start=0, end=2)
    b.const(p + "one", np.array([1], np.int64))
    b.op("Concat", [p + "rn", p + "one"], p + "rn1", axis=0)
    b.op("Expand", [p + "col3", p + "rn1"], p + "cols")  # [R, n, nnz]
    b.op("Expand", [p + "row3", p + "rn1"], p + "rows")
    b.op("GatherElements", [p + "x3", p + "cols"], p + "g", axis=2)
    b.op("Mul", [p + "g", p + "vals3"], p + "u")
    b.const(p + "m1_out", np.array([-1, out_f], np.int64))
    b.op("Concat", [p + "R", p + "m1_out"], p + "y3_shape", axis=0)
    b.op("Reshape", [y0, p + "y3_shape"], p + "y3")
    b.const(p + "flat_k", np.array([0, 1, -1], np.int64))  # [R, K, out] -> [R, 1, K * out]
    b.op("Reshape", [ell_idx, p + "flat_k"], p + "ek")
    b.op("Reshape", [ell_vals, p + "flat_k"], p + "ev")
    b.op("Expand", [p + "ek", p + "rn1"], p + "eks")  # [R, n, K * out]
    b.op("GatherElements", [p + "x3", p + "eks"], p + "eg", axis=2)
    b.op("Mul", [p + "eg", p + "ev"], p + "eu")
    b.const(p + "k_out", np.array([0, 0, -1, out_f], np.int64))
    b.op("Reshape", [p + "eu", p + "k_out"], p + "eu4")  # [R, n, K, out]
    # the sum over K as ones[1, K] @ [.., K, out]: a GEMV, ~10x cheaper than ReduceSum over
    # a middle axis in onnxruntime 1.32 (docs/sparse_format.md)
    b.op("Shape", [ell_idx], p + "K", start=1, end=2)
    b.const(p + "one_k", np.array([1], np.int64))
    b.op("Concat", [p + "one_k", p + "K"], p + "ones_shape", axis=0)
    b.filled(p + "ones", p + "ones_shape", value_type, 1)
    b.op("MatMul", [p + "ones", p + "eu4"], p + "ed4")  # [R, n, 1, out]; K = 0: zeros
    b.const(p + "n_out", np.array([0, 0, out_f], np.int64))
    b.op("Reshape", [p + "ed4", p + "n_out"], p + "ed")
    b.op("Add", [p + "y3", p + "ed"], p + "y3e")
    b.op("ScatterElements", [p + "y3e", p + "rows", p + "u"], p + "ys", axis=2, reduction="add")
    b.op("Shape", [y0], p + "y_shape")
    return b.op("Reshape", [p + "ys", p + "y_shape"], p + "y_short")


def site_nodes(
    b: Nodes,
    p: str,
    x: str,
    y: str,
    idx: str,
    vals: str,
    ell_idx: str,
    ell_vals: str,
    in_f: int,
    out_f: int,
    *,
    threshold: int,
    value_type: int = TensorProto.FLOAT,
    base: Optional[Op] = None,
    y_base: Optional[str] = None,
    transposed: bool = False,
    decode_base: Optional[Op] = None,
    weight_prelude: Optional[Callable[[Nodes], object]] = None,
    work_threshold: Optional[int] = None,
) -> str:
    """Append to `b` the nodes computing `y` for one site, all named under prefix `p`; returns
    `y`. Either `base` (the fp32/fp16 MatMul or Gemm they replace, its weight a constant) or
    `y_base` (the output of a quantized base op left in the graph: the delta is added on the
    activations). `decode_base` replaces `base` in the decode branch and `weight_prelude`
    adds the first nodes of the prefill branch (export.packed_weight: a MatMulNBits op
    decodes, its dequantized weight in fp32 prefills). The prefill branch runs above
    `threshold` rows per adapter row, or, with `work_threshold`, above that many rows x
    entries (the decode branch's work)."""
    if (base is None) == (y_base is None):
        raise ValueError("site_nodes: pass exactly one of base (float weight) and y_base (quantized base output)")
    transposed = transposed and base is not None  # a quantized site's delta is built [in, out], whatever W was
    _views(b, p, x, idx, ell_idx, in_f)
    if value_type != TensorProto.FLOAT:
        vals = b.op("Cast", [vals], p + "vals", to=value_type)
        ell_vals = b.op("Cast", [ell_vals], p + "ell_vals", to=value_type)
    y0 = p + "y0" if base is not None else y_base
    assert y0 is not None
    short = b.branch()
    short_out = _activation_branch(
        short, p, vals, ell_idx, ell_vals, out_f, y0, decode_base if decode_base is not None else base, value_type
    )
    long = b.branch()
    if weight_prelude is not None:
        weight_prelude(long)
    long_out = weight_branch(
        long,
        p,
        x,
        idx,
        vals,
        ell_idx,
        ell_vals,
        in_f,
        out_f,
        base=base,
        y_base=y_base,
        transposed=transposed,
        value_type=value_type,
    )
    b.op("Shape", [p + "x3"], p + "n", start=1, end=2)  # rows of x per adapter row
    b.op("Size", [vals], p + "nnz")
    b.op("Size", [ell_vals], p + "slots")
    b.op("Add", [p + "nnz", p + "slots"], p + "entries")
    b.const(p + "limit", np.array(threshold if work_threshold is None else work_threshold, np.int64))
    if work_threshold is None:  # rows, or rows x entries: the decode branch's work
        b.op("Greater", [p + "n", p + "limit"], p + "long")
    else:
        b.op("Mul", [p + "n", p + "entries"], p + "work")
        b.op("Greater", [p + "work", p + "limit"], p + "long")
    b.const(p + "zero", np.array(0, np.int64))
    b.op("Greater", [p + "entries", p + "zero"], p + "any")
    b.op("And", [p + "long", p + "any"], p + "use_weight")
    return b.if_(
        p + "use_weight",
        y,
        p + "If",
        long.graph(p + "weight_g", long_out, value_type),
        short.graph(p + "act_g", short_out, value_type),
    )
