"""The prefill (weight-side) branch of a sparse-delta site (export.delta_sites): W plus the
delta built per adapter row, then one MatMul, for inputs long enough that copying W costs
less than the decode branch's per-row work."""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper

from shira_export.export.onnx_nodes import const, copy_node, filled
from shira_export.export.onnx_nodes import op as _op

__all__ = ["weight_branch"]


def _ell_scatter(
    q: str, w: str, ell_idx: str, ell_vals: str, transposed: bool, *, batched: bool
) -> list[onnx.NodeProto]:
    """`q + "w_ell"` = w with the ELL part added: W [in, out] takes the [K, out] slots along
    axis 0 as they are (w[ell_idx[k, j], j] += ell_vals[k, j]); W [out, in] takes them
    transposed along axis 1. `batched`: w is [R, *, *] and the slots [R, K, out]; else w is
    2-D and the slots' R is 1."""
    nodes: list[onnx.NodeProto] = []
    ei, ev = ell_idx, ell_vals
    if not batched:
        nodes += [
            const(q + "ax0", np.array([0], np.int64)),
            _op("Squeeze", [ell_idx, q + "ax0"], q + "ei2"),  # [K, out]
            _op("Squeeze", [ell_vals, q + "ax0"], q + "ev2"),
        ]
        ei, ev = q + "ei2", q + "ev2"
    lead = [0] if batched else []
    if transposed:
        perm = lead + [x + len(lead) for x in (1, 0)]
        nodes += [_op("Transpose", [ei], q + "eiT", perm=perm), _op("Transpose", [ev], q + "evT", perm=perm)]
        ei, ev = q + "eiT", q + "evT"
    axis = len(lead) + (1 if transposed else 0)
    nodes.append(_op("ScatterElements", [w, ei, ev], q + "w_ell", axis=axis, reduction="add"))
    return nodes


def _weight_branch_rows(
    p: str,
    x: str,
    idx: str,
    vals: str,
    ell_idx: str,
    ell_vals: str,
    in_f: int,
    out_f: int,
    *,
    base: Optional[onnx.NodeProto],
    y_base: Optional[str],
    transposed: bool,
    value_type: int,
) -> tuple[list[onnx.NodeProto], str]:
    """fp32 (`base`): MatMul(x3, W + delta) with W + delta built per adapter row ([R, in, out]).
    Quantized (`y_base`): y_base + MatMul(x3, delta), W being packed."""
    # ScatterND on the flat [R * in * out] copy: per entry about 4x cheaper than ScatterElements
    # on [R, in*out] in onnxruntime 1.32 (tools/bench_site.py, docs/sparse_format.md)
    nodes = [
        const(p + "one_one", np.array([1, 1], np.int64)),
        _op("Concat", [p + "R", p + "one_one"], p + "R11", axis=0),
    ]  # [R, 1, 1]
    flat_idx = idx if transposed else p + "t"  # the graph holds W [out, in]: the flat index is its own
    if not transposed:  # W^T [in, out]: position (col, row) is col * out + row
        nodes += [
            const(p + "out_f", np.array(out_f, np.int32)),
            _op("Mul", [p + "col", p + "out_f"], p + "col_start"),
            _op("Add", [p + "col_start", p + "row"], flat_idx),
        ]
    nodes += [
        _op("Squeeze", [p + "R"], p + "R_s"),
        const(p + "zero64", np.array(0, np.int64)),
        const(p + "one64", np.array(1, np.int64)),
        _op("Range", [p + "zero64", p + "R_s", p + "one64"], p + "r_ids"),
        const(p + "wsize", np.array(in_f * out_f, np.int64)),
        _op("Mul", [p + "r_ids", p + "wsize"], p + "r_off"),
        const(p + "ax1w", np.array([1], np.int64)),
        _op("Unsqueeze", [p + "r_off", p + "ax1w"], p + "r_off2"),  # [R, 1]
        _op("Cast", [flat_idx], p + "t64", to=TensorProto.INT64),
        _op("Add", [p + "t64", p + "r_off2"], p + "t_all"),  # [R, nnz] into the flat [R * in * out]
        const(p + "ax2w", np.array([2], np.int64)),
        _op("Unsqueeze", [p + "t_all", p + "ax2w"], p + "t3"),  # [R, nnz, 1]
    ]
    shape = [-1, out_f, in_f] if transposed else [-1, in_f, out_f]
    if base is not None:  # R copies of W; [R, 1, 1] is not a constant, so W is never folded into a second copy
        nodes.append(_op("Expand", [base.input[1], p + "R11"], p + "w_r"))  # [R, in, out] or [R, out, in]
    else:
        nodes += [
            const(p + "w_dims", np.array(shape[1:], np.int64)),
            _op("Concat", [p + "R", p + "w_dims"], p + "z_shape", axis=0),
            filled(p + "w_r", p + "z_shape", value_type, 0),
        ]
    # a part fed with R = 1 next to the other's R = B applies to every row, as at decode
    nodes += [
        _op("Expand", [ell_idx, p + "R11"], p + "ell_idx_r"),
        _op("Expand", [ell_vals, p + "R11"], p + "ell_vals_r"),
        _op("Shape", [p + "t_all"], p + "t_shape"),
        _op("Expand", [vals, p + "t_shape"], p + "vals_r"),  # [R, nnz]
    ]
    nodes += _ell_scatter(p + "r_", p + "w_r", p + "ell_idx_r", p + "ell_vals_r", transposed, batched=True)
    nodes += [
        const(p + "flat", np.array([-1], np.int64)),
        _op("Reshape", [p + "r_w_ell", p + "flat"], p + "w_flat"),
        _op("ScatterND", [p + "w_flat", p + "t3", p + "vals_r"], p + "w_flat2", reduction="add"),
        const(p + "w_shape", np.array(shape, np.int64)),
        _op("Reshape", [p + "w_flat2", p + "w_shape"], p + "w_3"),
    ]
    w_eff = p + "w_3"
    if transposed:
        nodes.append(_op("Transpose", [w_eff], p + "w_eff", perm=[0, 2, 1]))  # [R, in, out]
        w_eff = p + "w_eff"
    nodes.append(_op("MatMul", [p + "x3", w_eff], p + "y3l"))  # [R, n, out]
    y = p + "y3l"
    if base is not None and base.op_type == "Gemm" and len(base.input) > 2 and base.input[2]:
        nodes.append(_op("Add", [y, base.input[2]], p + "y3b"))
        y = p + "y3b"
    nodes += [
        _op("Shape", [x], p + "x_lead", start=0, end=-1),
        const(p + "out1", np.array([out_f], np.int64)),
        _op("Concat", [p + "x_lead", p + "out1"], p + "y_shape_l", axis=0),
        _op("Reshape", [y, p + "y_shape_l"], p + "y_long" if y_base is None else p + "d_long"),
    ]
    if y_base is not None:
        nodes.append(_op("Add", [y_base, p + "d_long"], p + "y_long"))
    return nodes, p + "y_long"


def _weight_branch_one(
    p: str,
    x: str,
    vals: str,
    ell_idx: str,
    ell_vals: str,
    in_f: int,
    out_f: int,
    *,
    base: Optional[onnx.NodeProto],
    y_base: Optional[str],
    transposed: bool,
    value_type: int,
) -> tuple[list[onnx.NodeProto], str]:
    """R = 1 (one adapter: files, LoraAdapter, genai): ScatterND into one copy of the 2-D W
    (fp32) or zeros (quantized), then the base op itself: no batched MatMul, no reshapes."""
    q = p + "one/"
    a, b = (p + "row", p + "col") if transposed else (p + "col", p + "row")  # W [out, in] or W^T [in, out]
    nodes = [
        const(q + "ax2", np.array([2], np.int64)),
        _op("Unsqueeze", [a, q + "ax2"], q + "a3"),
        _op("Unsqueeze", [b, q + "ax2"], q + "b3"),
        _op("Concat", [q + "a3", q + "b3"], q + "pairs32", axis=2),
        _op("Cast", [q + "pairs32"], q + "pairs", to=TensorProto.INT64),  # [1, nnz, 2]
    ]
    if base is not None:
        nodes += [
            _op("ScatterND", [base.input[1], q + "pairs", vals], q + "w_coo", reduction="add"),
            *_ell_scatter(q, q + "w_coo", ell_idx, ell_vals, transposed, batched=False),
            copy_node(base, q + "op", {1: q + "w_ell"}, q + "y"),
        ]
        return nodes, q + "y"
    assert y_base is not None
    shape = [out_f, in_f] if transposed else [in_f, out_f]
    nodes += [
        const(q + "z_shape", np.array(shape, np.int64)),
        filled(q + "z", q + "z_shape", value_type, 0),
        _op("ScatterND", [q + "z", q + "pairs", vals], q + "w_coo", reduction="add"),
        *_ell_scatter(q, q + "w_coo", ell_idx, ell_vals, transposed, batched=False),
        _op("MatMul", [x, q + "w_ell"], q + "d"),
        _op("Add", [y_base, q + "d"], q + "y"),
    ]
    return nodes, q + "y"


def weight_branch(
    p: str,
    x: str,
    idx: str,
    vals: str,
    ell_idx: str,
    ell_vals: str,
    in_f: int,
    out_f: int,
    *,
    base: Optional[onnx.NodeProto],
    y_base: Optional[str],
    transposed: bool,
    value_type: int,
) -> tuple[list[onnx.NodeProto], str]:
    """If(R == 1, one copy of W and the base op, R copies and a batched MatMul): the If
    costs nothing next to a long input's MatMul."""
    kw = dict(base=base, y_base=y_base, transposed=transposed, value_type=value_type)
    one, one_out = _weight_branch_one(p, x, vals, ell_idx, ell_vals, in_f, out_f, **kw)  # type: ignore[arg-type]
    rows, rows_out = _weight_branch_rows(p, x, idx, vals, ell_idx, ell_vals, in_f, out_f, **kw)  # type: ignore[arg-type]
    info = lambda n: helper.make_tensor_value_info(n, value_type, None)  # noqa: E731
    return [
        const(p + "R_one", np.array([1], np.int64)),
        _op("Equal", [p + "R", p + "R_one"], p + "is_one"),
        helper.make_node(
            "If",
            [p + "is_one"],
            [p + "y_weight"],
            name=p + "If_rows",
            then_branch=helper.make_graph(one, p + "one_g", [], [info(one_out)]),
            else_branch=helper.make_graph(rows, p + "rows_g", [], [info(rows_out)]),
        ),
    ], p + "y_weight"
