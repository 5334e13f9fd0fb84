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

from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from shira_export.export.delta_prefill import weight_branch
from shira_export.export.onnx_nodes import const, copy_node, filled
from shira_export.export.onnx_nodes import op as _op

__all__ = ["const", "copy_node", "site_nodes", "BASE_NODE"]

BASE_NODE = "base"  # name suffix of the site's base op inside its activation branch


def _views(p: str, x: str, idx: str, ell_idx: str, in_f: int) -> list[onnx.NodeProto]:
    """row / col [R, nnz], R, and x as [R, n, in]: what both branches read. R is the larger
    of the two parts' (a part with R = 1, e.g. its empty default, broadcasts)."""
    return [
        const(p + "in_f", np.array(in_f, np.int32)),
        _op("Div", [idx, p + "in_f"], p + "row"),  # output index
        _op("Mul", [p + "row", p + "in_f"], p + "row_start"),
        _op("Sub", [idx, p + "row_start"], p + "col"),  # input index
        _op("Shape", [idx], p + "R_coo", start=0, end=1),
        _op("Shape", [ell_idx], p + "R_ell", start=0, end=1),
        _op("Max", [p + "R_coo", p + "R_ell"], p + "R"),
        const(p + "m1_in", np.array([-1, in_f], np.int64)),
        _op("Concat", [p + "R", p + "m1_in"], p + "x3_shape", axis=0),
        _op("Reshape", [x, p + "x3_shape"], p + "x3"),  # [R, n, in]
    ]


def _activation_branch(
    p: str,
    vals: str,
    ell_idx: str,
    ell_vals: str,
    out_f: int,
    y0: str,
    base: Optional[onnx.NodeProto],
    value_type: int,
) -> tuple[list[onnx.NodeProto], str]:
    """y[r, n, j] += sum_k x[r, n, ell_idx[r, k, j]] * ell_vals[r, k, j], then
    y[r, n, row] += x[r, n, col] * value for the scattered entries: no copy of W."""
    nodes = [copy_node(base, p + BASE_NODE, {}, y0)] if base is not None else []
    nodes += [
        const(p + "ax1", np.array([1], np.int64)),
        _op("Unsqueeze", [p + "col", p + "ax1"], p + "col3"),  # [R, 1, nnz]
        _op("Unsqueeze", [p + "row", p + "ax1"], p + "row3"),
        _op("Unsqueeze", [vals, p + "ax1"], p + "vals3"),
        _op("Shape", [p + "x3"], p + "rn", start=0, end=2),
        const(p + "one", np.array([1], np.int64)),
        _op("Concat", [p + "rn", p + "one"], p + "rn1", axis=0),
        _op("Expand", [p + "col3", p + "rn1"], p + "cols"),  # [R, n, nnz]
        _op("Expand", [p + "row3", p + "rn1"], p + "rows"),
        _op("GatherElements", [p + "x3", p + "cols"], p + "g", axis=2),
        _op("Mul", [p + "g", p + "vals3"], p + "u"),
        const(p + "m1_out", np.array([-1, out_f], np.int64)),
        _op("Concat", [p + "R", p + "m1_out"], p + "y3_shape", axis=0),
        _op("Reshape", [y0, p + "y3_shape"], p + "y3"),
        const(p + "flat_k", np.array([0, 1, -1], np.int64)),  # [R, K, out] -> [R, 1, K * out]
        _op("Reshape", [ell_idx, p + "flat_k"], p + "ek"),
        _op("Reshape", [ell_vals, p + "flat_k"], p + "ev"),
        _op("Expand", [p + "ek", p + "rn1"], p + "eks"),  # [R, n, K * out]
        _op("GatherElements", [p + "x3", p + "eks"], p + "eg", axis=2),
        _op("Mul", [p + "eg", p + "ev"], p + "eu"),
        const(p + "k_out", np.array([0, 0, -1, out_f], np.int64)),
        _op("Reshape", [p + "eu", p + "k_out"], p + "eu4"),  # [R, n, K, out]
        # the sum over K as ones[1, K] @ [.., K, out]: a GEMV, ~10x cheaper than ReduceSum over
        # a middle axis in onnxruntime 1.32 (docs/sparse_format.md)
        _op("Shape", [ell_idx], p + "K", start=1, end=2),
        const(p + "one_k", np.array([1], np.int64)),
        _op("Concat", [p + "one_k", p + "K"], p + "ones_shape", axis=0),
        filled(p + "ones", p + "ones_shape", value_type, 1),
        _op("MatMul", [p + "ones", p + "eu4"], p + "ed4"),  # [R, n, 1, out]; K = 0: zeros
        const(p + "n_out", np.array([0, 0, out_f], np.int64)),
        _op("Reshape", [p + "ed4", p + "n_out"], p + "ed"),
        _op("Add", [p + "y3", p + "ed"], p + "y3e"),
        _op("ScatterElements", [p + "y3e", p + "rows", p + "u"], p + "ys", axis=2, reduction="add"),
        _op("Shape", [y0], p + "y_shape"),
        _op("Reshape", [p + "ys", p + "y_shape"], p + "y_short"),
    ]
    return nodes, p + "y_short"


def site_nodes(
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
    base: Optional[onnx.NodeProto] = None,
    y_base: Optional[str] = None,
    transposed: bool = False,
    decode_base: Optional[onnx.NodeProto] = None,
    weight_prelude: Sequence[onnx.NodeProto] = (),
    work_threshold: Optional[int] = None,
) -> list[onnx.NodeProto]:
    """Nodes computing `y` for one site, all named under prefix `p`. Either `base` (the
    fp32/fp16 MatMul or Gemm they replace, its weight a constant) or `y_base` (the output
    of a quantized base op left in the graph: the delta is added on the activations).
    `decode_base` replaces `base` in the decode branch and `weight_prelude` runs first in the
    prefill branch (export.packed_weight: a MatMulNBits op decodes, its dequantized weight
    in fp32 prefills). The prefill branch runs above `threshold` rows per adapter row, or,
    with `work_threshold`, above that many rows x entries (the decode branch's work)."""
    if (base is None) == (y_base is None):
        raise ValueError("site_nodes: pass exactly one of base (float weight) and y_base (quantized base output)")
    transposed = transposed and base is not None  # a quantized site's delta is built [in, out], whatever W was
    nodes = _views(p, x, idx, ell_idx, in_f)
    if value_type != TensorProto.FLOAT:
        nodes.append(_op("Cast", [vals], p + "vals", to=value_type))
        nodes.append(_op("Cast", [ell_vals], p + "ell_vals", to=value_type))
        vals, ell_vals = p + "vals", p + "ell_vals"
    y0 = p + "y0" if base is not None else y_base
    assert y0 is not None
    short_nodes, short_out = _activation_branch(
        p, vals, ell_idx, ell_vals, out_f, y0, decode_base if decode_base is not None else base, value_type
    )
    long_nodes, long_out = weight_branch(
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
    info = lambda n: helper.make_tensor_value_info(n, value_type, None)  # noqa: E731
    return nodes + [
        _op("Shape", [p + "x3"], p + "n", start=1, end=2),  # rows of x per adapter row
        _op("Size", [vals], p + "nnz"),
        _op("Size", [ell_vals], p + "slots"),
        _op("Add", [p + "nnz", p + "slots"], p + "entries"),
        const(p + "limit", np.array(threshold if work_threshold is None else work_threshold, np.int64)),
        *(
            [_op("Greater", [p + "n", p + "limit"], p + "long")]
            if work_threshold is None  # rows, or rows x entries: the decode branch's work
            else [
                _op("Mul", [p + "n", p + "entries"], p + "work"),
                _op("Greater", [p + "work", p + "limit"], p + "long"),
            ]
        ),
        const(p + "zero", np.array(0, np.int64)),
        _op("Greater", [p + "entries", p + "zero"], p + "any"),
        _op("And", [p + "long", p + "any"], p + "use_weight"),
        helper.make_node(
            "If",
            [p + "use_weight"],
            [y],
            name=p + "If",
            then_branch=helper.make_graph([*weight_prelude, *long_nodes], p + "weight_g", [], [info(long_out)]),
            else_branch=helper.make_graph(short_nodes, p + "act_g", [], [info(short_out)]),
        ),
    ]
