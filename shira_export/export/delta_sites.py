"""The nodes of one sparse-delta site, shared by the fp32 graph (graph_delta), the
quantized graph (quant_delta) and genai builder graphs (genai_sites).

Inputs per site, two parts of one delta (export.site_layout splits an adapter between them):

    ell_idx  int32 [R, 1, K * out]  slot k of output feature j (at k * out + j) reads input
    ell_vals fp32  [R, 1, K * out]  feature ell_idx[r, 0, k * out + j] with this value (ELLPACK)
    idx      int32 [R, 1, nnz]      the entries that do not fit K slots: flat out * in_features + in
    vals     fp32  [R, 1, nnz]      (PyTorch's (out, in) layout)

R = 1 applies one adapter to the whole batch, R = B gives batch row b the adapter of row b.
Padding anywhere is index 0 / value 0.0 (adds 0: a no-op); the defaults are [1, 1, out]
(K = 1, all padding: K >= 1 always, read from the part's size) and [1, 1, 0]: no delta.
Every slot says where it goes, so any order of entries is valid. The middle axis of 1 is
the tokens' axis, which the decode gathers broadcast over.

    n = tokens per sequence (x [B, S, in]: S; any other x is viewed as [R, n, in])
    d = sum_k(x[..., ell_idx] * ell_vals) + scatter(row, x[..., col] * vals)   # on min(n, 1) rows when long
    y = If(n > threshold, then: MatMul(x, W + both parts scattered)            # weight side: prefill
                          else: base op(x, W) + d)                             # activation side: decode

The decode delta runs in the model's graph, not in the If's branch: onnxruntime 1.32 runs a
branch's nodes at 2-5x their cost in the model's graph (tools/bench_node_cost.py), and a
decode step is ~15 small ops per site; on long inputs it sees one row (a gather index of
[lead, 1, ...]), whose result the weight branch ignores; so it never sees a zero-size
tensor (K >= 1 too), and a Reshape may infer a dim with -1. The ELL part needs no
scatter at decode (a gather, a product and a GEMV over K, ~2 ns per slot against ~8 ns per
entry of the scattered part: docs/sparse_format.md). The activation branch keeps the base
op's constant weight, which onnxruntime prepacks; the weight branch (export.delta_prefill,
with a second If on R == 1 and an entry) copies W once per adapter row, cheap next to the MatMul of many
rows; an empty adapter takes the base op there.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from onnx import TensorProto, helper

from shira_export.export.delta_prefill import weight_branch
from shira_export.artifacts.onnx_nodes import Nodes, Op

__all__ = ["site_nodes", "BASE_NODE"]

BASE_NODE = "base"  # name suffix of the site's base op inside its activation branch


def _rank(b: Nodes, x: str) -> Optional[int]:
    shape = b[x].shape
    return None if shape is None else len(shape)


def _adapter_rows(b: Nodes, p: str, idx: str, ell_idx: str) -> str:
    """R: the larger of the two parts' (a part fed with R = 1, e.g. its default, broadcasts)."""
    b.op("Shape", [idx], p + "R_coo", start=0, end=1)
    b.op("Shape", [ell_idx], p + "R_ell", start=0, end=1)
    return b.op("Max", [p + "R_coo", p + "R_ell"], p + "R")


def _view(b: Nodes, p: str, x: str, in_f: int) -> str:
    """x as [R, n, in] (R = p + "R")."""
    b.const(p + "m1_in", np.array([-1, in_f], np.int64))
    b.op("Concat", [p + "R", p + "m1_in"], p + "x3_shape", axis=0)
    return b.op("Reshape", [x, p + "x3_shape"], p + "x3")


def _gate(b: Nodes, p: str, xv: str, lead: str, limit: int) -> tuple[str, str]:
    """(long, bs1): whether the weight branch runs (n rows of `xv` per adapter row above
    `limit`), and [lead, n or 1 when long, 1], the shape the decode delta's gather indices
    broadcast to. It reads x alone, so the sites of one x (q, k, v) share it once onnxruntime's
    common-subexpression pass has run."""
    b.op("Shape", [xv], p + "n", start=1, end=2)
    b.const(p + "limit", np.array([limit], np.int64))
    long_ = b.op("Greater", [p + "n", p + "limit"], p + "long")
    b.const(p + "one", np.array([1], np.int64))
    b.op("Where", [long_, p + "one", p + "n"], p + "n_short")
    return long_, b.op("Concat", [lead, p + "n_short", p + "one"], p + "bs1", axis=0)


def _decode_delta(
    b: Nodes,
    p: str,
    xv: str,
    bs1: str,
    idx: str,
    vals: str,
    ell_idx: str,
    ell_vals: str,
    in_f: int,
    out_f: int,
    value_type: int,
) -> str:
    """d[l, t, j] = sum_k xv[l, t, ell_idx[., 0, k * out + j]] * ell_vals[...], then
    d[l, t, row] += xv[l, t, col] * value for the scattered entries: [lead, n or 1, out]."""
    b.op("Expand", [ell_idx, bs1], p + "eks")  # [lead, n, K * out]
    b.op("GatherElements", [xv, p + "eks"], p + "eg", axis=2)
    b.op("Mul", [p + "eg", ell_vals], p + "eu")
    b.const(p + "k_out", np.array([0, 0, -1, out_f], np.int64))  # K * out > 0: K >= 1 (the default's 1)
    b.op("Reshape", [p + "eu", p + "k_out"], p + "eu4")  # [lead, n, K, out]
    # the sum over K as ones[K] @ [.., K, out]: a GEMV, ~10x cheaper than ReduceSum over a
    # middle axis in onnxruntime 1.32 (docs/sparse_format.md)
    b.op("Shape", [p + "eu4"], p + "K", start=2, end=3)
    b.filled(p + "ones", p + "K", value_type, 1)
    b.op("MatMul", [p + "ones", p + "eu4"], p + "ed")  # [lead, n, out]
    b.const(p + "in_f", np.array(in_f, np.int32))
    b.op("Div", [idx, p + "in_f"], p + "row")  # [R, 1, nnz] output index
    b.op("Mod", [idx, p + "in_f"], p + "col")  # input index (indices are >= 0: Mod's sign rule is moot)
    b.op("Expand", [p + "col", bs1], p + "cols")  # [lead, n, nnz]
    b.op("Expand", [p + "row", bs1], p + "rows")
    b.op("GatherElements", [xv, p + "cols"], p + "g", axis=2)
    b.op("Mul", [p + "g", vals], p + "u")
    return b.op("ScatterElements", [p + "ed", p + "rows", p + "u"], p + "d", axis=2, reduction="add")


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
    weight_prelude: Optional[Callable[[Nodes, str], str]] = None,
) -> str:
    """Append to `b` the nodes computing `y` for one site, all named under prefix `p`; returns
    `y`. Either `base` (the fp32/fp16 MatMul or Gemm they replace, its weight a constant) or
    `y_base` (the output of a quantized base op left in the graph: the delta is added on the
    activations). `decode_base` replaces `base` in the decode branch and `weight_prelude(branch,
    tag)` adds the first nodes of each prefill branch, returning the weight `base` reads there
    (export.packed_weight: a MatMulNBits op decodes, its dequantized weight in fp32 prefills). The prefill branch runs above
    `threshold` tokens (rows per adapter row)."""
    if (base is None) == (y_base is None):
        raise ValueError("site_nodes: pass exactly one of base (float weight) and y_base (quantized base output)")
    transposed = transposed and base is not None  # a quantized site's delta is built [in, out], whatever W was
    direct = _rank(b, x) == 3  # [B, S, in]: R is 1 or B, no view needed
    if value_type != TensorProto.FLOAT:
        vals = b.op("Cast", [vals], p + "vals", to=value_type)
        ell_vals = b.op("Cast", [ell_vals], p + "ell_vals", to=value_type)
    if direct:
        xv, lead = x, b.op("Shape", [x], p + "lead", start=0, end=1)
    else:
        lead = _adapter_rows(b, p, idx, ell_idx)
        xv = _view(b, p, x, in_f)
    long_, bs1 = _gate(b, p, xv, lead, threshold)
    d = _decode_delta(b, p, xv, bs1, idx, vals, ell_idx, ell_vals, in_f, out_f, value_type)

    short = b.branch()  # the base op and the delta's Add (and its view back for a viewed x)
    decode_op = decode_base if decode_base is not None else base
    y0 = short.copy(decode_op, p + BASE_NODE, {}, p + "y0") if decode_op is not None else y_base
    assert y0 is not None
    if not direct:
        short.op("Shape", [y0], p + "y_shape")
        d = short.op("Reshape", [d, p + "y_shape"], p + "d_y")
    short_out = short.op("Add", [y0, d], p + "y_short")

    long = b.branch()  # W + delta, unless the adapter is empty (then the base op)
    if direct:
        _adapter_rows(long, p, idx, ell_idx)
        _view(long, p, x, in_f)
    # an adapter (this row's or any) with a scattered entry or a nonzero slot: the defaults'
    # K = 1 of padding slots (and an all-zero adapter) take the base op
    long.op("Size", [vals], p + "nnz")
    long.const(p + "zero", np.array(0, np.int64))
    long.op("Greater", [p + "nnz", p + "zero"], p + "any_coo")
    long.op("Abs", [ell_vals], p + "ell_abs")
    long.op("ReduceMax", [p + "ell_abs"], p + "ell_max", keepdims=0)
    long.const(p + "zero_v", np.array(0, helper.tensor_dtype_to_np_dtype(value_type)))
    long.op("Greater", [p + "ell_max", p + "zero_v"], p + "any_ell")
    long.op("Or", [p + "any_coo", p + "any_ell"], p + "any")

    def plain(branch: Nodes) -> str:
        if decode_op is not None:
            return branch.copy(decode_op, p + "base_long", {}, p + "y_plain")
        return branch.op("Identity", [y_base], p + "y_plain")  # type: ignore[list-item]  # made in the branch

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
        any_delta=p + "any",
        plain=plain,
        prelude=weight_prelude,
    )
    return b.if_(
        long_,
        y,
        p + "If",
        long.graph(p + "weight_g", long_out, value_type),
        short.graph(p + "act_g", short_out, value_type),
    )
