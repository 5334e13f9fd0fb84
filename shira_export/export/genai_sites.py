"""Sparse-delta sites on onnxruntime-genai model-builder graphs.

The builder packs q|k|v into one `attn/qkv_proj` MatMul (and may split a checkpoint's
packed `gate_up_proj` into `mlp/gate_proj` + `mlp/up_proj`), names every weight after
its node, and in int4 replaces the MatMul by `MatMulNBits` writing the same output tensor.
So a targeted module is one or more *pieces*: a block of its output rows that lands at a
column offset of one builder node.

Per builder node with pieces, each module's two parts (export.site_layout) are packed into
the node's space apart: the scattered entries' indices (row * in + col, in the module's own
(out, in) space, exactly as in every `.onnx_adapter` this package writes) move by one Add
(+ offset * in) and are concatenated along nnz (`_prelude`); the ELL slots, which name input
features (shared by the pieces), are padded to one K and concatenated along the output
axis (`_packed_ell`); both broadcast to one R and feed the same site as any other
(export.delta_sites): a packed q|k|v site decodes its slots with one gather for all three.
A node with one whole module keeps both parts as they are. The adapter inputs stay the module's
`shira.<module>.*`, so the files of an optimum/torch-route export of the same base load
here unchanged (same fingerprint: it covers modules, not nodes), and mixed batches work
here too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import partial
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from shira_export.artifacts.naming import GENAI_GROUPS_KEY
from shira_export.errors import ShiraInputError
from shira_export.export import graph_delta, quant_delta
from shira_export.export.graph_delta import TargetSite, indices_name, values_name
from shira_export.artifacts.ir_edits import edited, graph_values, infer_shapes
from shira_export.artifacts.onnx_nodes import Nodes, Op

__all__ = [
    "Piece",
    "GROUPS_KEY",
    "locate_builder_pieces",
    "insert_builder_deltas",
    "builder_sites",
]

GROUPS_KEY = GENAI_GROUPS_KEY  # metadata_props entry describing the packed sites (the runtime reads it)
_PARENTS = {"self_attn": "attn", "attn": "attn", "mlp": "mlp"}
_PACKED = {
    "q_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "k_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "v_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "gate_proj": ("gate_up_proj", ("gate_proj", "up_proj")),
    "up_proj": ("gate_up_proj", ("gate_proj", "up_proj")),
}
_SPLIT = {"gate_up_proj": ("gate_proj", "up_proj")}  # a checkpoint-packed module the builder splits in two


@dataclass(frozen=True)
class Piece:
    """Rows [row_start, row_start + rows) of `module` are columns [offset, offset + rows) of `node`."""

    module: str
    node: str  # builder node name (MatMul or MatMulNBits)
    output: str  # the node's output tensor (the same in every precision)
    row_start: int
    rows: int
    offset: int
    node_out: int
    in_features: int
    weight: str = ""  # the node's weight initializer (MatMulNBits: its packed `_Q4` blob)


def _float_weights(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {
        i.name: numpy_helper.to_array(i)
        for i in graph.initializer
        if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and len(i.dims) == 2
    }


def _node_shape(node: onnx.NodeProto, floats: Mapping[str, np.ndarray]) -> tuple[int, int] | None:
    """(in, out) of a MatMul with a constant weight or of a MatMulNBits."""
    if node.op_type == "MatMul" and node.input[1] in floats:
        return tuple(floats[node.input[1]].shape)  # type: ignore[return-value]
    if node.op_type == "MatMulNBits":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        return int(attrs["K"]), int(attrs["N"])
    return None


def locate_builder_pieces(
    model: onnx.ModelProto, weights: Mapping[str, np.ndarray], all_weights: Mapping[str, np.ndarray]
) -> list[Piece]:
    """Pieces for every module of `weights` ({module: (out, in) fp32}); `all_weights` holds
    every linear layer of the model (packing offsets depend on untargeted siblings too).
    Float graphs are checked by content (each piece must equal W^T's block exactly, fp16
    after rounding); quantized nodes by shape (the parity check covers their content)."""
    graph = model.graph
    floats = _float_weights(graph)
    by_output = {n.output[0]: n for n in graph.node if n.op_type in ("MatMul", "MatMulNBits") and n.output}
    pieces: list[Piece] = []
    problems: list[str] = []
    for module in sorted(weights):
        w = np.asarray(weights[module], np.float32)
        found = _module_pieces(module, w, all_weights, by_output, floats)
        if isinstance(found, str):
            problems.append(f"module {module!r}: {found}")
        else:
            pieces += found
    if problems:
        raise ShiraInputError("builder graph: cannot place the sparse delta of\n  " + "\n  ".join(problems))
    return pieces


def _module_pieces(module, w, all_weights, by_output, floats) -> list[Piece] | str:
    parts = module.split(".")
    if len(parts) < 3 or parts[-2] not in _PARENTS or "layers" not in parts:
        return "not a decoder-layer projection (the builder graph names only model.layers.N.{self_attn,mlp}.*)"
    layer = parts[parts.index("layers") + 1]
    prefix = f"/model/layers.{layer}/{_PARENTS[parts[-2]]}/"
    name, parent = parts[-1], ".".join(parts[:-1])

    def node_for(proj: str):
        node = by_output.get(f"{prefix}{proj}/MatMul/output_0")
        return node, (_node_shape(node, floats) if node is not None else None)

    out_f, in_f = w.shape
    candidates: list[tuple[str, int, int, int]] = []  # (node proj, row_start, rows, offset)
    node, shape = node_for(name)
    if node is not None:
        candidates = [(name, 0, out_f, 0)]
    elif name in _PACKED and node_for(_PACKED[name][0])[0] is not None:
        offset = 0
        for sibling in _PACKED[name][1]:
            if sibling == name:
                break
            sib = all_weights.get(f"{parent}.{sibling}")
            if sib is None:
                return f"packed into {_PACKED[name][0]} but sibling {sibling} is not in the model"
            offset += sib.shape[0]
        candidates = [(_PACKED[name][0], 0, out_f, offset)]
    elif name in _SPLIT and all(node_for(p)[0] is not None for p in _SPLIT[name]):
        first = node_for(_SPLIT[name][0])[1]
        half = first[1] if first else out_f // 2
        candidates = [(_SPLIT[name][0], 0, half, 0), (_SPLIT[name][1], half, out_f - half, 0)]
    else:
        return f"no builder node {prefix}{name}/MatMul (nor a packed or split one)"
    pieces = []
    for proj, start, rows, offset in candidates:
        node, shape = node_for(proj)
        if shape is None:
            return f"builder node {node.name} has no constant weight"
        k, n = shape
        if k != in_f or offset + rows > n:
            return f"builder node {node.name} is {k}x{n}; rows {start}..{start + rows} at column {offset} of a {in_f}-input layer do not fit"
        if node.op_type == "MatMul":
            block = floats[node.input[1]][:, offset : offset + rows]
            want = w[start : start + rows].T.astype(block.dtype)
            if not np.array_equal(block, want):
                return f"builder node {node.name}: columns {offset}..{offset + rows} differ from the module's weight"
        pieces.append(Piece(module, node.name, node.output[0], start, rows, offset, n, in_f, node.input[1]))
    return pieces


def builder_sites(pieces: Sequence[Piece], weights: Mapping[str, np.ndarray]) -> list[TargetSite]:
    """One TargetSite per module (its first piece's node), for the manifest and adapter files:
    sizes and digests of the module's own (out, in) weight, as every export records them."""
    first: dict[str, Piece] = {}
    for p in pieces:
        first.setdefault(p.module, p)
    sites = []
    for m, p in sorted(first.items()):
        w = np.asarray(weights[m], np.float32)
        sites.append(
            TargetSite(m, p.node, p.weight, int(w.shape[0]), int(w.shape[1]), False, graph_delta._digest(w))
        )  # as locate_targets digests it: (out, in)
    return sites


def _group_key(output: str) -> str:
    # "/model/layers.0/attn/qkv_proj/MatMul/output_0" -> "node.model.layers.0.attn.qkv_proj"
    return "node." + output.strip("/").rsplit("/MatMul", 1)[0].replace("/", ".")


def _packed_ell(b: Nodes, p: str, key: str, pieces: Sequence[Piece], module_rows: Mapping[str, int]) -> None:
    """`shira.<key>.ell_indices` / `.ell_values` [R, 1, K * node_out]: every piece's ELL slots at its
    columns (a split module's slice of them; a slot names an input feature, which packing does not
    move), each padded to the largest K and the columns no piece owns filled with no-op slots
    (index 0, value 0), all broadcast to one R. So a packed site decodes its slots with one
    gather for q|k|v together instead of scattering them."""
    ells = []
    for i, piece in enumerate(pieces):
        _, _, ei, ev = graph_delta.adapter_input_names(piece.module)
        b.const(f"{p}eshape{i}", np.array([0, -1, module_rows[piece.module]], np.int64))  # [R, K, out]: K >= 1
        ei = b.op("Reshape", [ei, f"{p}eshape{i}"], f"{p}ei3_{i}")
        ev = b.op("Reshape", [ev, f"{p}eshape{i}"], f"{p}ev3_{i}")
        if piece.row_start or piece.rows != module_rows[piece.module]:  # part of a split module
            b.const(f"{p}es{i}", np.array([piece.row_start], np.int64))
            b.const(f"{p}ee{i}", np.array([piece.row_start + piece.rows], np.int64))
            b.const(f"{p}ea{i}", np.array([2], np.int64))
            ei = b.op("Slice", [ei, f"{p}es{i}", f"{p}ee{i}", f"{p}ea{i}"], f"{p}eis{i}")
            ev = b.op("Slice", [ev, f"{p}es{i}", f"{p}ee{i}", f"{p}ea{i}"], f"{p}evs{i}")
        ells.append((ei, ev))
    ks = [b.op("Shape", [ei], f"{p}ek{i}", start=1, end=2) for i, (ei, _) in enumerate(ells)]
    rs = [b.op("Shape", [ei], f"{p}er{i}", start=0, end=1) for i, (ei, _) in enumerate(ells)]
    k, r = b.op("Max", ks, f"{p}eK"), b.op("Max", rs, f"{p}eR")
    b.const(f"{p}e11", np.array([1, 1], np.int64))
    b.op("Concat", [r, f"{p}e11"], f"{p}eR11", axis=0)
    b.const(f"{p}epad0", np.array([0, 0, 0, 0], np.int64))
    b.const(f"{p}epad1", np.array([0], np.int64))
    idx_parts: list[str] = []
    val_parts: list[str] = []

    def filler(start: int, stop: int) -> None:  # columns of the node no targeted module owns
        b.const(f"{p}ew{start}", np.array([stop - start], np.int64))
        b.op("Concat", [r, k, f"{p}ew{start}"], f"{p}efs{start}", axis=0)
        idx_parts.append(b.filled(f"{p}efi{start}", f"{p}efs{start}", TensorProto.INT32, 0))
        val_parts.append(b.filled(f"{p}efv{start}", f"{p}efs{start}", TensorProto.FLOAT, 0))

    col = 0
    for i, (piece, (ei, ev)) in enumerate(zip(pieces, ells)):
        if piece.offset > col:
            filler(col, piece.offset)
        b.op("Sub", [k, ks[i]], f"{p}emiss{i}")
        b.op("Concat", [f"{p}epad0", f"{p}emiss{i}", f"{p}epad1"], f"{p}epads{i}", axis=0)  # pad K at its end
        b.op("Pad", [ei, f"{p}epads{i}"], f"{p}eip{i}")
        b.op("Pad", [ev, f"{p}epads{i}"], f"{p}evp{i}")
        idx_parts.append(b.op("Expand", [f"{p}eip{i}", f"{p}eR11"], f"{p}eie{i}"))
        val_parts.append(b.op("Expand", [f"{p}evp{i}", f"{p}eR11"], f"{p}eve{i}"))
        col = piece.offset + piece.rows
    if col < pieces[0].node_out:
        filler(col, pieces[0].node_out)
    b.op("Concat", idx_parts, f"{p}ell_idx3", axis=2)
    b.op("Concat", val_parts, f"{p}ell_vals3", axis=2)
    b.const(f"{p}eflat", np.array([0, 1, -1], np.int64))  # the site's [R, 1, K * out]
    b.op("Reshape", [f"{p}ell_idx3", f"{p}eflat"], graph_delta.ell_indices_name(key), name=f"{p}ell_indices")
    b.op("Reshape", [f"{p}ell_vals3", f"{p}eflat"], graph_delta.ell_values_name(key), name=f"{p}ell_values")


def _prelude(b: Nodes, key: str, pieces: Sequence[Piece], module_rows: Mapping[str, int]) -> None:
    """Packed [R, 1, nnz] indices and values of the scattered part of every piece of one node, as
    `shira.<key>.indices / .values`: each piece's entries moved to the node's columns, entries of a split module
    that belong to another piece turned into padding (index 0, value 0: a no-op), modules
    fed with different R ([1, 1, 0] defaults next to a mixed batch's [B, 1, nnz]) broadcast to one R."""
    p = f"{graph_delta.PREFIX}/{key}/pk_"  # apart from the site's own names (delta_sites)
    b.const(f"{p}zero_i", np.array(0, np.int32))
    b.const(f"{p}zero_f", np.array(0, np.float32))
    idx_parts, val_parts = [], []
    merged: dict[str, tuple[str, str]] = {}
    for i, piece in enumerate(pieces):
        merged[piece.module] = (indices_name(piece.module), values_name(piece.module))
        idx, vals = merged[piece.module]
        in_f = piece.in_features
        shift = (piece.offset - piece.row_start) * in_f  # row r of the module is column offset + r - row_start
        shifted = idx
        if shift:
            b.const(f"{p}shift{i}", np.array(shift, np.int32))
            shifted = b.op("Add", [idx, f"{p}shift{i}"], f"{p}flat{i}")
        if piece.row_start or piece.rows != module_rows[piece.module]:  # part of a split module
            lo, hi = piece.row_start * in_f, (piece.row_start + piece.rows) * in_f
            b.const(f"{p}lo{i}", np.array(lo, np.int32))
            b.const(f"{p}hi{i}", np.array(hi, np.int32))
            b.op("GreaterOrEqual", [idx, f"{p}lo{i}"], f"{p}ge{i}")
            b.op("Less", [idx, f"{p}hi{i}"], f"{p}lt{i}")
            b.op("And", [f"{p}ge{i}", f"{p}lt{i}"], f"{p}in{i}")
            shifted = b.op("Where", [f"{p}in{i}", shifted, f"{p}zero_i"], f"{p}idx{i}")
            vals = b.op("Where", [f"{p}in{i}", vals, f"{p}zero_f"], f"{p}val{i}")
        idx_parts.append(shifted)
        val_parts.append(vals)
    if len(pieces) > 1:  # one R for all: Concat along nnz needs equal rows
        rows = [b.op("Shape", [merged[piece.module][0]], f"{p}r{i}", start=0, end=1) for i, piece in enumerate(pieces)]
        b.op("Max", rows, f"{p}R")
        b.const(f"{p}one", np.array([1, 1], np.int64))
        b.op("Concat", [f"{p}R", f"{p}one"], f"{p}R1", axis=0)  # [R, 1, 1]
        for parts, tag in ((idx_parts, "ie"), (val_parts, "ve")):
            for i, name in enumerate(list(parts)):
                parts[i] = b.op("Expand", [name, f"{p}R1"], f"{p}{tag}{i}")
    b.op("Concat", idx_parts, indices_name(key), name=f"{p}indices", axis=2)
    b.op("Concat", val_parts, values_name(key), name=f"{p}values", axis=2)


def _float_site(b: Nodes, site: TargetSite, base: Op, y: str, threshold: int, value_type: int) -> bool:
    graph_delta._delta_nodes(b, site, base, y, threshold, value_type)
    return False  # the site replaces the MatMul


def insert_builder_deltas(
    model: onnx.ModelProto,
    pieces: Sequence[Piece],
    module_rows: Mapping[str, int],
    *,
    threshold: int = graph_delta.DEFAULT_TOKEN_THRESHOLD,
) -> None:
    """Rewrite a builder graph in place: a delta branch on every node with pieces, the
    adapter inputs `shira.<module>.indices/values` with empty defaults, and the packing
    recorded in the model's metadata (GROUPS_KEY)."""
    by_node: dict[str, list[Piece]] = {}
    for piece in pieces:
        by_node.setdefault(piece.node, []).append(piece)
    if model.ir_version < 4:
        model.ir_version = 4
    groups = {}
    with edited(model) as view:
        graph = view.graph
        graph_delta.add_adapter_inputs(graph, sorted({p.module for p in pieces}), module_rows)
        infer_shapes(view, [n.inputs[0].name or "" for n in graph if n.name in by_node and n.inputs[0] is not None])
        values = graph_values(graph)
        for node in list(graph):
            group = by_node.get(node.name or "")
            if group is None:
                continue
            group = sorted(group, key=lambda g: g.offset)
            single = (
                len(group) == 1
                and group[0].offset == 0
                and group[0].row_start == 0
                and group[0].rows == module_rows[group[0].module] == group[0].node_out
            )
            x, w = (value.name or "" for value in node.inputs[:2])  # type: ignore[union-attr]
            y = node.outputs[0].name or ""
            key = group[0].module if single else _group_key(y)
            site = TargetSite(key, node.name or "", w, group[0].node_out, group[0].in_features, False, "")
            pre = Nodes(values)
            if not single:
                if group[0].node_out * group[0].in_features >= 2**31:
                    raise ShiraInputError(
                        f"builder node {node.name}: {group[0].in_features}x{group[0].node_out} is too "
                        f"large for int32 indices"
                    )
                _prelude(pre, key, group, module_rows)
                _packed_ell(pre, f"{graph_delta.PREFIX}/{key}/pk_", key, group, module_rows)
                graph.insert_before(node, pre.nodes)
            groups[key] = {"node": node.name, "pieces": [asdict(g) for g in group]}
            if node.op_type == "MatMul":
                dtype = int(graph.initializers[w].const_value.dtype)  # type: ignore[union-attr]
                build = partial(_float_site, site=site, base=Op.of(node), y=y, threshold=threshold, value_type=dtype)
            else:  # MatMulNBits: decodes inside the site, its dequantized weight prefills (export.packed_weight)
                build = partial(quant_delta.quantized_site, site=site, producer=node, x=x, y=y, threshold=threshold)
            quant_delta.place_site(graph, node, y, values, build)
    entry = model.metadata_props.add()
    entry.key, entry.value = GROUPS_KEY, json.dumps(groups)
