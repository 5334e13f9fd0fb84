"""Sparse-delta sites on onnxruntime-genai model-builder graphs.

The builder packs q|k|v into one `attn/qkv_proj` MatMul (and may split a checkpoint's
packed `gate_up_proj` into `mlp/gate_proj` + `mlp/up_proj`), names every weight after
its node, and in int4 replaces the MatMul by `MatMulNBits` writing the same output tensor.
So a targeted module is one or more *pieces*: a block of its output rows that lands at a
column offset of one builder node.

Per builder node with pieces, each module's two parts (export.site_layout) are first made
one flat list (its ELL slots as flat entries: `_as_scattered`), whose indices (row * in +
col, in the module's own (out, in) space, exactly as in every `.onnx_adapter` this package
writes) are moved into the node's packed space by one Add (+ offset * in), concatenated
along nnz ([R, nnz] each, broadcast to one R), and fed to the same site as any other
(export.delta_sites) with an empty ELL part: a packed site decodes through the scattered
path. A node with one whole module keeps both parts. The adapter inputs stay the module's
`shira.<module>.*`, so the files of an optimum/torch-route export of the same base load
here unchanged (same fingerprint: it covers modules, not nodes), and mixed batches work
here too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from shira_export.artifacts.naming import GENAI_GROUPS_KEY
from shira_export.errors import ShiraInputError
from shira_export.export import graph_delta, quant_delta
from shira_export.export.delta_sites import const
from shira_export.export.graph_delta import TargetSite, indices_name, values_name

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


def _as_scattered(p: str, module: str, out_f: int, in_f: int) -> list[onnx.NodeProto]:
    """`p + "idx"` / `p + "vals"`: one module's two parts as one scattered list [R, nnz + K * out]
    (an ELL slot (k, j) is the flat entry j * in + ell_indices[k, j]; its padding stays a
    no-op), both parts broadcast to one R. The packed site then takes them as any other."""
    idx, vals, ell_idx, ell_vals = graph_delta.adapter_input_names(module)
    mk = helper.make_node
    return [
        const(p + "row_off", (np.arange(out_f, dtype=np.int64) * in_f).astype(np.int32)),
        mk("Add", [ell_idx, p + "row_off"], [p + "eflat3"], name=p + "eflat3"),
        const(p + "to2", np.array([0, -1], np.int64)),
        mk("Reshape", [p + "eflat3", p + "to2"], [p + "eflat"], name=p + "eflat"),
        mk("Reshape", [ell_vals, p + "to2"], [p + "evals"], name=p + "evals"),
        mk("Shape", [idx], [p + "Rc"], name=p + "Rc", start=0, end=1),
        mk("Shape", [ell_idx], [p + "Re"], name=p + "Re", start=0, end=1),
        mk("Max", [p + "Rc", p + "Re"], [p + "R"], name=p + "R"),
        const(p + "one", np.array([1], np.int64)),
        mk("Concat", [p + "R", p + "one"], [p + "R1"], name=p + "R1", axis=0),
        *(
            mk("Expand", [name, p + "R1"], [p + tag], name=p + tag)
            for name, tag in ((idx, "ci"), (vals, "cv"), (p + "eflat", "ei"), (p + "evals", "ev"))
        ),
        mk("Concat", [p + "ci", p + "ei"], [p + "idx"], name=p + "idx", axis=1),
        mk("Concat", [p + "cv", p + "ev"], [p + "vals"], name=p + "vals", axis=1),
    ]


def _prelude(key: str, pieces: Sequence[Piece], module_rows: Mapping[str, int]) -> list[onnx.NodeProto]:
    """Packed [R, nnz] indices and values of every piece of one node, as `shira.<key>.*`
    tensors: each piece's entries moved to the node's columns, entries of a split module
    that belong to another piece turned into padding (index 0, value 0: a no-op), modules
    fed with different R ([1, 0] defaults next to a mixed batch's [B, nnz]) broadcast to one R."""
    p = f"{graph_delta.PREFIX}/{key}/pk_"  # apart from the site's own names (delta_sites)
    nodes: list[onnx.NodeProto] = [
        const(f"{p}zero_i", np.array(0, np.int32)),
        const(f"{p}zero_f", np.array(0, np.float32)),
    ]
    idx_parts, val_parts = [], []
    merged: dict[str, tuple[str, str]] = {}
    for i, piece in enumerate(pieces):
        if piece.module not in merged:
            nodes += _as_scattered(f"{p}m{len(merged)}_", piece.module, module_rows[piece.module], piece.in_features)
            merged[piece.module] = (f"{p}m{len(merged)}_idx", f"{p}m{len(merged)}_vals")
        idx, vals = merged[piece.module]
        in_f = piece.in_features
        shift = (piece.offset - piece.row_start) * in_f  # row r of the module is column offset + r - row_start
        if shift:
            nodes += [
                const(f"{p}shift{i}", np.array(shift, np.int32)),
                helper.make_node("Add", [idx, f"{p}shift{i}"], [f"{p}flat{i}"], name=f"{p}flat{i}"),
            ]
        shifted = f"{p}flat{i}" if shift else idx
        if piece.row_start or piece.rows != module_rows[piece.module]:  # part of a split module
            lo, hi = piece.row_start * in_f, (piece.row_start + piece.rows) * in_f
            nodes += [
                const(f"{p}lo{i}", np.array(lo, np.int32)),
                const(f"{p}hi{i}", np.array(hi, np.int32)),
                helper.make_node("GreaterOrEqual", [idx, f"{p}lo{i}"], [f"{p}ge{i}"], name=f"{p}ge{i}"),
                helper.make_node("Less", [idx, f"{p}hi{i}"], [f"{p}lt{i}"], name=f"{p}lt{i}"),
                helper.make_node("And", [f"{p}ge{i}", f"{p}lt{i}"], [f"{p}in{i}"], name=f"{p}in{i}"),
                helper.make_node("Where", [f"{p}in{i}", shifted, f"{p}zero_i"], [f"{p}idx{i}"], name=f"{p}idx{i}"),
                helper.make_node("Where", [f"{p}in{i}", vals, f"{p}zero_f"], [f"{p}val{i}"], name=f"{p}val{i}"),
            ]
            shifted, vals = f"{p}idx{i}", f"{p}val{i}"
        idx_parts.append(shifted)
        val_parts.append(vals)
    if len(pieces) > 1:  # one R for all: Concat along nnz needs equal rows
        rows = []
        for i, piece in enumerate(pieces):
            nodes.append(
                helper.make_node("Shape", [merged[piece.module][0]], [f"{p}r{i}"], name=f"{p}r{i}", start=0, end=1)
            )
            rows.append(f"{p}r{i}")
        nodes += [
            helper.make_node("Max", rows, [f"{p}R"], name=f"{p}R"),
            const(f"{p}one", np.array([1], np.int64)),
            helper.make_node("Concat", [f"{p}R", f"{p}one"], [f"{p}R1"], name=f"{p}R1", axis=0),
        ]
        for parts, tag in ((idx_parts, "ie"), (val_parts, "ve")):
            for i, name in enumerate(list(parts)):
                nodes.append(helper.make_node("Expand", [name, f"{p}R1"], [f"{p}{tag}{i}"], name=f"{p}{tag}{i}"))
                parts[i] = f"{p}{tag}{i}"
    nodes += [
        helper.make_node("Concat", idx_parts, [indices_name(key)], name=f"{p}indices", axis=1),
        helper.make_node("Concat", val_parts, [values_name(key)], name=f"{p}values", axis=1),
    ]
    return nodes


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
    graph = model.graph
    by_node: dict[str, list[Piece]] = {}
    for piece in pieces:
        by_node.setdefault(piece.node, []).append(piece)
    if model.ir_version < 4:
        model.ir_version = 4
    dtypes = {i.name: i.data_type for i in graph.initializer}
    initializers = {i.name: i for i in graph.initializer}
    groups = {}
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        group = by_node.get(node.name)
        if group is None:
            new_nodes.append(node)
            continue
        group = sorted(group, key=lambda g: g.offset)
        single = (
            len(group) == 1
            and group[0].offset == 0
            and group[0].row_start == 0
            and group[0].rows == module_rows[group[0].module] == group[0].node_out
        )
        key = group[0].module if single else _group_key(node.output[0])
        site = TargetSite(key, node.name, node.input[1], group[0].node_out, group[0].in_features, False, "")
        if not single:
            if group[0].node_out * group[0].in_features >= 2**31:
                raise ShiraInputError(
                    f"builder node {node.name}: {group[0].in_features}x{group[0].node_out} is too "
                    f"large for int32 indices"
                )
            new_nodes += _prelude(key, group, module_rows)
        groups[key] = {"node": node.name, "pieces": [asdict(g) for g in group]}
        if not single:  # the packed site's ELL part is empty: _as_scattered moved every slot
            new_nodes.append(const(graph_delta.ell_indices_name(key), np.zeros((1, 0, site.out_features), np.int32)))
            new_nodes.append(const(graph_delta.ell_values_name(key), np.zeros((1, 0, site.out_features), np.float32)))
        if node.op_type == "MatMul":
            new_nodes += graph_delta._delta_nodes(site, node, threshold, dtypes[node.input[1]])
        else:  # MatMulNBits: decodes inside the site, its dequantized weight prefills (export.packed_weight)
            keep, nodes = quant_delta.quantized_site(site, node, node.input[0], node.output[0], threshold, initializers)
            new_nodes += ([node] if keep else []) + nodes
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph_delta.add_adapter_inputs(graph, sorted({p.module for p in pieces}), module_rows)
    entry = model.metadata_props.add()
    entry.key, entry.value = GROUPS_KEY, json.dumps(groups)
