"""The prefill (weight-side) branch of a sparse-delta site (export.delta_sites): W plus the
delta built per adapter row, then one MatMul, for inputs long enough that copying W costs
less than the decode branch's per-row work."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np
from onnx import TensorProto

from shira_export.artifacts.onnx_nodes import Nodes, Op

__all__ = ["weight_branch"]


def _ell_scatter(b: Nodes, q: str, w: str, ell_idx: str, ell_vals: str, transposed: bool, *, batched: bool) -> str:
    """`q + "w_ell"` = w with the ELL part added: W [in, out] takes the [K, out] slots along
    axis 0 as they are (w[ell_idx[k, j], j] += ell_vals[k, j]); W [out, in] takes them
    transposed along axis 1. `batched`: w is [R, *, *] and the slots [R, K, out]; else w is
    2-D and the slots' R is 1."""
    ei, ev = ell_idx, ell_vals
    if not batched:
        b.const(q + "ax0", np.array([0], np.int64))
        ei = b.op("Squeeze", [ell_idx, q + "ax0"], q + "ei2")  # [K, out]
        ev = b.op("Squeeze", [ell_vals, q + "ax0"], q + "ev2")
    lead = [0] if batched else []
    if transposed:
        perm = lead + [x + len(lead) for x in (1, 0)]
        ei = b.op("Transpose", [ei], q + "eiT", perm=perm)
        ev = b.op("Transpose", [ev], q + "evT", perm=perm)
    axis = len(lead) + (1 if transposed else 0)
    return b.op("ScatterElements", [w, ei, ev], q + "w_ell", axis=axis, reduction="add")


def _weight_branch_rows(
    b: Nodes,
    p: str,
    x: str,
    idx: str,
    vals: str,
    ell_idx: str,
    ell_vals: str,
    in_f: int,
    out_f: int,
    *,
    base: Optional[Op],
    y_base: Optional[str],
    transposed: bool,
    value_type: int,
) -> str:
    """fp32 (`base`): MatMul(x3, W + delta) with W + delta built per adapter row ([R, in, out]).
    Quantized (`y_base`): y_base + MatMul(x3, delta), W being packed."""
    # ScatterND on the flat [R * in * out] copy: per entry about 4x cheaper than ScatterElements
    # on [R, in*out] in onnxruntime 1.32 (tools/bench_site.py, docs/sparse_format.md)
    b.const(p + "one_one", np.array([1, 1], np.int64))
    b.op("Concat", [p + "R", p + "one_one"], p + "R11", axis=0)  # [R, 1, 1]
    flat_idx = idx if transposed else p + "t"  # the graph holds W [out, in]: the flat index is its own
    if not transposed:  # W^T [in, out]: position (col, row) is col * out + row
        b.const(p + "out_f", np.array(out_f, np.int32))
        b.op("Mul", [p + "col2", p + "out_f"], p + "col_start")
        b.op("Add", [p + "col_start", p + "row2"], flat_idx)
    b.op("Squeeze", [p + "R"], p + "R_s")
    b.const(p + "zero64", np.array(0, np.int64))
    b.const(p + "one64", np.array(1, np.int64))
    b.op("Range", [p + "zero64", p + "R_s", p + "one64"], p + "r_ids")
    b.const(p + "wsize", np.array(in_f * out_f, np.int64))
    b.op("Mul", [p + "r_ids", p + "wsize"], p + "r_off")
    b.const(p + "ax1w", np.array([1], np.int64))
    b.op("Unsqueeze", [p + "r_off", p + "ax1w"], p + "r_off2")  # [R, 1]
    b.op("Cast", [flat_idx], p + "t64", to=TensorProto.INT64)
    b.op("Add", [p + "t64", p + "r_off2"], p + "t_all")  # [R, nnz] into the flat [R * in * out]
    b.const(p + "ax2w", np.array([2], np.int64))
    b.op("Unsqueeze", [p + "t_all", p + "ax2w"], p + "t3")  # [R, nnz, 1]
    shape = [-1, out_f, in_f] if transposed else [-1, in_f, out_f]
    if base is not None:  # R copies of W; [R, 1, 1] is not a constant, so W is never folded into a second copy
        b.op("Expand", [base.inputs[1], p + "R11"], p + "w_r")  # [R, in, out] or [R, out, in]
    else:
        b.const(p + "w_dims", np.array(shape[1:], np.int64))
        b.op("Concat", [p + "R", p + "w_dims"], p + "z_shape", axis=0)
        b.filled(p + "w_r", p + "z_shape", value_type, 0)
    # a part fed with R = 1 next to the other's R = B applies to every row, as at decode
    b.op("Expand", [ell_idx, p + "R11"], p + "ell_idx_r")
    b.op("Expand", [ell_vals, p + "R11"], p + "ell_vals_r")
    b.op("Shape", [p + "t_all"], p + "t_shape")
    b.op("Expand", [vals, p + "t_shape"], p + "vals_r")  # [R, nnz]
    _ell_scatter(b, p + "r_", p + "w_r", p + "ell_idx_r", p + "ell_vals_r", transposed, batched=True)
    b.const(p + "flat", np.array([-1], np.int64))
    b.op("Reshape", [p + "r_w_ell", p + "flat"], p + "w_flat")
    b.op("ScatterND", [p + "w_flat", p + "t3", p + "vals_r"], p + "w_flat2", reduction="add")
    b.const(p + "w_shape", np.array(shape, np.int64))
    w_eff = b.op("Reshape", [p + "w_flat2", p + "w_shape"], p + "w_3")
    if transposed:
        w_eff = b.op("Transpose", [w_eff], p + "w_eff", perm=[0, 2, 1])  # [R, in, out]
    y = b.op("MatMul", [p + "x3", w_eff], p + "y3l")  # [R, n, out]
    if base is not None and base.op_type == "Gemm" and len(base.inputs) > 2 and base.inputs[2]:
        y = b.op("Add", [y, base.inputs[2]], p + "y3b")
    b.op("Shape", [x], p + "x_lead", start=0, end=-1)
    b.const(p + "out1", np.array([out_f], np.int64))
    b.op("Concat", [p + "x_lead", p + "out1"], p + "y_shape_l", axis=0)
    b.op("Reshape", [y, p + "y_shape_l"], p + "y_long" if y_base is None else p + "d_long")
    if y_base is not None:
        b.op("Add", [y_base, p + "d_long"], p + "y_long")
    return p + "y_long"


def _flat_entries(
    b: Nodes, p: str, q: str, idx: str, vals: str, ell_idx: str, ell_vals: str, in_f: int, out_f: int, transposed: bool
) -> tuple[str, str]:
    """(positions int32 [E], values [E]) of every entry of both parts (R = 1) in the flat W
    (W [out, in]: row * in + col, the file's own index; W^T [in, out]: col * out + row), so
    that one scatter writes them all: one copy of W, not one per part."""
    if transposed:  # slot k of output feature j sits at j * in + ell_idx[k, j]
        b.const(q + "j_in", (np.arange(out_f, dtype=np.int32) * in_f)[None, None, :])
        b.op("Add", [ell_idx, q + "j_in"], q + "e_at")
        coo = idx
    else:  # ... at ell_idx[k, j] * out + j; a scattered entry at col * out + row
        b.const(q + "out_f", np.array(out_f, np.int32))
        b.const(q + "j", np.arange(out_f, dtype=np.int32)[None, None, :])
        b.op("Mul", [ell_idx, q + "out_f"], q + "e_start")
        b.op("Add", [q + "e_start", q + "j"], q + "e_at")
        b.op("Mul", [p + "col2", q + "out_f"], q + "c_start")
        coo = b.op("Add", [q + "c_start", p + "row2"], q + "c_at")
    b.const(q + "flat", np.array([-1], np.int64))
    b.op("Reshape", [q + "e_at", q + "flat"], q + "e_at1")
    b.op("Reshape", [coo, q + "flat"], q + "c_at1")
    b.op("Reshape", [ell_vals, q + "flat"], q + "e_v1")
    b.op("Reshape", [vals, q + "flat"], q + "c_v1")
    return (
        b.op("Concat", [q + "e_at1", q + "c_at1"], q + "at", axis=0),
        b.op("Concat", [q + "e_v1", q + "c_v1"], q + "av", axis=0),
    )


def _weight_branch_one(
    b: Nodes,
    p: str,
    x: str,
    idx: str,
    vals: str,
    ell_idx: str,
    ell_vals: str,
    in_f: int,
    out_f: int,
    *,
    base: Optional[Op],
    y_base: Optional[str],
    transposed: bool,
    value_type: int,
) -> str:
    """R = 1 (one adapter: files, LoraAdapter, genai): one ScatterElements of every entry into
    the flat W (fp32) or zeros (quantized), then the base op itself: no batched MatMul."""
    q = p + "one/"
    at, av = _flat_entries(b, p, q, idx, vals, ell_idx, ell_vals, in_f, out_f, transposed)
    b.const(q + "w_shape", np.array([out_f, in_f] if transposed else [in_f, out_f], np.int64))
    if base is not None:
        # W viewed flat through a run-time shape ([-1] + 0 * entries): a constant one would let
        # an optimizer fold a flat second copy of W into the model
        b.op("Shape", [at], q + "n_at")
        b.const(q + "zero", np.array([0], np.int64))
        b.op("Mul", [q + "n_at", q + "zero"], q + "rt0")
        b.op("Add", [q + "flat", q + "rt0"], q + "flat_rt")
        b.op("Reshape", [base.inputs[1], q + "flat_rt"], q + "w_flat")
        b.op("ScatterElements", [q + "w_flat", at, av], q + "w_flat2", axis=0, reduction="add")
        b.op("Reshape", [q + "w_flat2", q + "w_shape"], q + "w_ell")
        return b.copy(base, q + "op", {1: q + "w_ell"}, q + "y")
    assert y_base is not None
    b.const(q + "z_size", np.array([in_f * out_f], np.int64))
    b.filled(q + "z", q + "z_size", value_type, 0)
    b.op("ScatterElements", [q + "z", at, av], q + "w_flat2", axis=0, reduction="add")
    b.op("Reshape", [q + "w_flat2", q + "w_shape"], q + "w_ell")
    b.op("MatMul", [x, q + "w_ell"], q + "d")
    return b.op("Add", [y_base, q + "d"], q + "y")


def weight_branch(
    b: Nodes,
    p: str,
    x: str,
    idx: str,
    vals: str,
    ell_idx: str,
    ell_vals: str,
    in_f: int,
    out_f: int,
    *,
    base: Optional[Op],
    y_base: Optional[str],
    transposed: bool,
    value_type: int,
    any_delta: str,
    plain: Callable[[Nodes], str],
    prelude: Optional[Callable[[Nodes, str], str]] = None,
) -> str:
    """If(R == 1 and `any_delta`: one copy of W and the base op, else If(`any_delta`: R copies
    and a batched MatMul, else `plain(branch)`: the base op)). One adapter (the common
    prefill) is one If below the site's (each level is a subgraph run: its nodes cost more). `prelude(branch, tag)` builds a branch's first nodes and
    returns the name of the weight the base op reads there (export.packed_weight)."""
    # the decode's shapes ([R, 1, n]) as this branch's: [R, nnz] and [R, K, out]
    b.const(p + "sq1", np.array([1], np.int64))
    idx, vals = b.op("Squeeze", [idx, p + "sq1"], p + "idx2"), b.op("Squeeze", [vals, p + "sq1"], p + "vals2")
    b.op("Squeeze", [p + "row", p + "sq1"], p + "row2")
    b.op("Squeeze", [p + "col", p + "sq1"], p + "col2")
    b.const(p + "k_out3", np.array([0, -1, out_f], np.int64))  # K >= 1
    ell_idx = b.op("Reshape", [ell_idx, p + "k_out3"], p + "ell_idx3")
    ell_vals = b.op("Reshape", [ell_vals, p + "k_out3"], p + "ell_vals3")

    def weight_op(branch: Nodes, tag: str) -> Optional[Op]:
        if prelude is None or base is None:
            return base
        return dataclasses.replace(base, inputs=(base.inputs[0], prelude(branch, tag), *base.inputs[2:]))

    kw = dict(y_base=y_base, transposed=transposed, value_type=value_type)
    one, rest = b.branch(), b.branch()
    rows, other = rest.branch(), rest.branch()
    parts = (p, x, idx, vals, ell_idx, ell_vals, in_f, out_f)
    one_out = _weight_branch_one(one, *parts, base=weight_op(one, ""), **kw)  # type: ignore[arg-type]
    rows_out = _weight_branch_rows(rows, *parts, base=weight_op(rows, "rows_"), **kw)  # type: ignore[arg-type]
    rest_out = rest.if_(
        any_delta,
        p + "y_rest",
        p + "If_rows",
        rows.graph(p + "rows_g", rows_out, value_type),
        other.graph(p + "plain_g", plain(other), value_type),
    )
    b.const(p + "R_one", np.array([1], np.int64))
    b.op("Equal", [p + "R", p + "R_one"], p + "is_one")
    b.op("And", [p + "is_one", any_delta], p + "one_delta")
    return b.if_(
        p + "one_delta",
        p + "y_weight",
        p + "If_one",
        one.graph(p + "one_g", one_out, value_type),
        rest.graph(p + "rest_g", rest_out, value_type),
    )
