"""Tied embeddings after quantization: one quantized table for a tied LM head and its lookup
(4- or 8-bit MatMulNBits heads with GatherBlockQuantized lookups, or int8 MatMulInteger).

`fold_transposed_weights` gives a tied head (OPT, GPT-2) its own transposed copy of the
embedding table so the quantizers can read a constant B; the lookup is quantized apart, so
the file holds the table twice. `share_tied_embeddings` points the lookup at the head's
quantized weights. Tiedness is decided by content (the two dequantized tables agree within
their rounding), not by names.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["share_tied_embeddings"]


def share_tied_embeddings(model: onnx.ModelProto) -> int:
    """Point each quantized embedding lookup whose table equals (within quantization error)
    a quantized LM head's weight at the head's weights, in place, so a tied table is stored
    once. int4: `GatherBlockQuantized` reads MatMulNBits' B (packed uint8, reshaped to
    [N, K/2]), scales and zero points (same blocks along hidden, same packing). int8:
    `Gather(B, ids, axis=1)` on MatMulInteger's [K, N] weight, a transpose of the gathered
    [K, tokens] slice, then the head's per-row scale and zero point. Returns how many lookups
    now share; run `drop_unused_initializers` after it to drop the old tables."""
    inits = {i.name: i for i in model.graph.initializer}
    arrays: dict[str, np.ndarray] = {}

    def arr(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name])
        return arrays[name]

    consumers = _sole_consumers(model.graph)
    producers = {o: n for n in model.graph.node for o in n.output}
    heads = [_Head(n, arr, _int8_scale(n, consumers, producers, inits)) for n in model.graph.node if _is_head(n, inits)]
    heads = [h for h in heads if h.int4 or h.scale]
    shared = 0
    for node in list(model.graph.node):
        table = _lookup_table(node, consumers, inits, arr)
        if table is None:
            continue
        head = next((h for h in heads if h.matches(table)), None)
        if head is None:
            continue
        _rewire(model.graph, node, consumers, head)
        shared += 1
    return shared


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _is_head(node: onnx.NodeProto, inits: dict) -> bool:
    if node.op_type == "MatMulNBits":
        a = _attrs(node)  # g_idx (input 4) reorders K: not a row-wise table any more
        return (
            a.get("bits", 4) in (4, 8)
            and a["K"] % a["block_size"] == 0
            and len(node.input) < 5
            and all(i in inits for i in node.input[1:4] if i)
        )
    return (
        node.op_type == "MatMulInteger"
        and len(node.input) == 4
        and node.input[1] in inits
        and node.input[3] in inits
        and len(inits[node.input[1]].dims) == 2
    )


def _unpack4(packed: np.ndarray, count: int) -> np.ndarray:
    """uint8 [..., m] holding two 4-bit values per byte (low nibble first) -> [..., count]."""
    both = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return both[..., :count].astype(np.float32)


class _Head:
    """A quantized MatMul weight [K, N] seen as a quantized [N, K] table."""

    def __init__(self, node: onnx.NodeProto, arr: Callable[[str], np.ndarray], scale: Optional[str]) -> None:
        self.node, self.arr, self.scale = node, arr, scale
        self.int4 = node.op_type == "MatMulNBits"  # blockwise (4 or 8 bits), else MatMulInteger
        self.bits = 8
        if self.int4:
            a = _attrs(node)
            self.n, self.k, self.block, self.bits = a["N"], a["K"], a["block_size"], a.get("bits", 4)
        else:
            self.k, self.n = arr(node.input[1]).shape
        self._table: Optional[tuple[np.ndarray, np.ndarray]] = None

    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """(dequantized [N, K], per-row largest scale) computed once."""
        if self._table is None:
            if self.int4:
                blocks = self.k // self.block
                scales = self.arr(self.node.input[2]).reshape(self.n, blocks).astype(np.float32)
                has_zp = len(self.node.input) > 3 and self.node.input[3]
                if self.bits == 8:
                    zp = (
                        self.arr(self.node.input[3]).reshape(self.n, blocks).astype(np.float32)
                        if has_zp
                        else np.full((self.n, blocks), 128, np.float32)
                    )
                    q = self.arr(self.node.input[1]).reshape(self.n, blocks, -1).astype(np.float32)
                else:
                    zp = (
                        _unpack4(self.arr(self.node.input[3]), blocks)
                        if has_zp
                        else np.full((self.n, blocks), 8, np.float32)
                    )
                    q = _unpack4(self.arr(self.node.input[1]).reshape(self.n, -1), self.k).reshape(self.n, blocks, -1)
                w = ((q - zp[..., None]) * scales[..., None]).reshape(self.n, self.k)
                self._table = w, np.abs(scales).max(axis=1)
            else:
                assert self.scale is not None  # int8 heads without a scale are filtered out in share_tied_embeddings
                scale = np.broadcast_to(self.arr(self.scale).astype(np.float32).reshape(-1), (self.n,))
                zp = np.broadcast_to(self.arr(self.node.input[3]).astype(np.float32).reshape(-1), (self.n,))
                q = self.arr(self.node.input[1]).astype(np.float32).T
                self._table = (q - zp[:, None]) * scale[:, None], np.abs(scale)
        return self._table

    def matches(self, table: tuple[np.ndarray, np.ndarray]) -> bool:
        values, step = table
        if values.shape != (self.n, self.k):
            return False
        mine, my_step = self.table()
        # two roundings of one table differ by at most half a step each; untied tables by far more
        return bool(np.all(np.abs(values - mine).max(axis=1) <= 0.51 * (step + my_step) + 1e-6))


def _sole_consumers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """{tensor: the node reading it} for tensors exactly one node reads and no graph output is:
    the patterns below rewire or remove a tensor's consumer, so they must be its only reader."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    return {name: nodes[0] for name, nodes in readers.items() if len(nodes) == 1 and name not in outputs}


def _int8_scale(node: onnx.NodeProto, consumers: dict, producers: dict, inits: dict) -> Optional[str]:
    """MatMulInteger's weight scale: quantize_dynamic writes Mul(Cast(MatMulInteger), Mul(a_scale, b_scale))."""
    if node.op_type != "MatMulInteger":
        return None
    cast = consumers.get(node.output[0])
    mul = consumers.get(cast.output[0]) if cast is not None and cast.op_type == "Cast" else None
    if mul is None or mul.op_type != "Mul":
        return None
    product = producers.get(next((i for i in mul.input if i != cast.output[0]), ""))  # type: ignore[union-attr]
    if product is None or product.op_type != "Mul":
        return None
    found = [i for i in product.input if i in inits and _numel(inits[i]) in (1, inits[node.input[1]].dims[1])]
    return found[0] if len(found) == 1 else None


def _lookup_table(
    node: onnx.NodeProto, consumers: dict, inits: dict, arr: Callable[[str], np.ndarray]
) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(dequantized [N, K] table, per-row largest scale) of a quantized embedding lookup, else None."""
    if node.op_type == "GatherBlockQuantized":
        a = _attrs(node)
        data = inits.get(node.input[0])
        if (
            data is None
            or len(data.dims) != 2
            or a.get("gather_axis", 0) != 0
            or a.get("quantize_axis", 1) not in (1, -1)
            or not all(i in inits for i in node.input[2:] if i)
        ):
            return None
        n, k = data.dims
        block, bits = a.get("block_size", 128), a.get("bits", 4)
        if data.data_type == TensorProto.UINT8 and bits == 8:
            q = arr(node.input[0]).astype(np.float32)
        elif data.data_type == TensorProto.UINT8:
            if bits != 4:
                return None
            q, k = _unpack4(arr(node.input[0]), 2 * k), 2 * k
        elif data.data_type in (TensorProto.UINT4, TensorProto.INT4):
            q = arr(node.input[0]).astype(np.float32)
        else:
            return None
        if k % block:
            return None
        blocks = k // block
        scales = arr(node.input[2]).astype(np.float32).reshape(n, blocks)
        if len(node.input) > 3 and node.input[3]:
            zp = arr(node.input[3])
            zp = (
                _unpack4(zp, blocks)
                if data.data_type == TensorProto.UINT8 and bits == 4
                else zp.astype(np.float32).reshape(n, blocks)
            )
        else:
            zp = np.full((n, blocks), (1 << (bits - 1)) if data.data_type == TensorProto.UINT8 else 0.0, np.float32)
        w = (q.reshape(n, blocks, block) - zp[..., None]) * scales[..., None]
        return w.reshape(n, k), np.abs(scales).max(axis=1)
    if node.op_type == "Gather" and node.input[0] in inits and _attrs(node).get("axis", 0) == 0:
        dq = consumers.get(node.output[0])
        data = inits[node.input[0]]
        if (
            dq is None
            or dq.op_type != "DequantizeLinear"
            or len(data.dims) != 2
            or not all(i in inits and _numel(inits[i]) == 1 for i in dq.input[1:] if i)
        ):
            return None  # quantize_dynamic writes one scale per table; anything else is not this pattern
        scale = float(arr(dq.input[1]).reshape(-1)[0])
        zero = float(arr(dq.input[2]).reshape(-1)[0]) if len(dq.input) > 2 and dq.input[2] else 0.0
        w = (arr(node.input[0]).astype(np.float32) - zero) * scale
        return w, np.full(data.dims[0], abs(scale), np.float32)
    return None


def _const(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    if name not in {i.name for i in graph.initializer}:
        graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _rewire(graph: onnx.GraphProto, node: onnx.NodeProto, consumers: dict, head: _Head) -> None:
    """Replace the lookup `node` (and an int8 lookup's DequantizeLinear) by one reading `head`'s weights."""
    base, ids = node.name or node.output[0], node.input[1]
    if head.int4:
        blocks = head.k // head.block
        b, scales = head.node.input[1], head.node.input[2]
        new = (
            []
            if any(f"{b}_rows" in n.output for n in graph.node)
            else [  # a second lookup of one table
                helper.make_node(
                    "Reshape",
                    [b, _const(graph, f"{b}_rows_shape", np.array([head.n, head.k * head.bits // 8]))],
                    [f"{b}_rows"],
                    name=f"{base}_shared_rows",
                )
            ]
        )
        inputs = [f"{b}_rows", ids, scales]
        if list(head.arr(scales).shape) != [head.n, blocks]:
            new.append(
                helper.make_node(
                    "Reshape",
                    [scales, _const(graph, f"{scales}_rows_shape", np.array([head.n, blocks]))],
                    [f"{scales}_rows"],
                    name=f"{base}_shared_scales",
                )
            )
            inputs[2] = f"{scales}_rows"
        if len(head.node.input) > 3 and head.node.input[3]:
            zp, width = head.node.input[3], (blocks + 1) // 2 if head.bits == 4 else blocks
            if list(head.arr(zp).shape) != [head.n, width]:
                new.append(
                    helper.make_node(
                        "Reshape",
                        [zp, _const(graph, f"{zp}_rows_shape", np.array([head.n, width]))],
                        [f"{zp}_rows"],
                        name=f"{base}_shared_zp",
                    )
                )
                zp = f"{zp}_rows"
            inputs.append(zp)
        new.append(
            helper.make_node(
                "GatherBlockQuantized",
                inputs,
                list(node.output),
                name=f"{base}_shared",
                domain="com.microsoft",
                bits=head.bits,
                block_size=head.block,
                gather_axis=0,
                quantize_axis=1,
            )
        )
        old = [node]
    else:  # B is [K, N]: gather columns, then transpose only the gathered [K, tokens] slice
        dq = consumers[node.output[0]]
        out, p = dq.output[0], f"{base}_shared"
        flat = _const(graph, "shira_shared_flat_shape", np.array([-1]))
        new = [
            helper.make_node("Reshape", [ids, flat], [f"{p}_ids"], name=f"{p}_ids"),
            helper.make_node("Gather", [head.node.input[1], f"{p}_ids"], [f"{p}_cols"], name=f"{p}_gather", axis=1),
            helper.make_node("Transpose", [f"{p}_cols"], [f"{p}_rows_q"], name=f"{p}_transpose", perm=[1, 0]),
            helper.make_node("Cast", [f"{p}_rows_q"], [f"{p}_rows_f"], name=f"{p}_cast", to=TensorProto.FLOAT),
        ]
        rows = f"{p}_rows_f"
        if np.any(head.arr(head.node.input[3])):
            new += [
                helper.make_node("Gather", [head.node.input[3], f"{p}_ids"], [f"{p}_zp_q"], name=f"{p}_zp_gather"),
                helper.make_node("Cast", [f"{p}_zp_q"], [f"{p}_zp"], name=f"{p}_zp_cast", to=TensorProto.FLOAT),
                helper.make_node(
                    "Unsqueeze",
                    [f"{p}_zp", _const(graph, "shira_shared_axis1", np.array([1]))],
                    [f"{p}_zp_col"],
                    name=f"{p}_zp_col",
                ),
                helper.make_node("Sub", [rows, f"{p}_zp_col"], [f"{p}_centered"], name=f"{p}_sub"),
            ]
            rows = f"{p}_centered"
        scale = str(head.scale)
        if _numel(next(i for i in graph.initializer if i.name == scale)) > 1:
            new += [
                helper.make_node("Gather", [scale, f"{p}_ids"], [f"{p}_scale"], name=f"{p}_scale_gather"),
                helper.make_node(
                    "Unsqueeze",
                    [f"{p}_scale", _const(graph, "shira_shared_axis1", np.array([1]))],
                    [f"{p}_scale_col"],
                    name=f"{p}_scale_col",
                ),
            ]
            scale = f"{p}_scale_col"
        new += [
            helper.make_node("Mul", [rows, scale], [f"{p}_values"], name=f"{p}_mul"),
            helper.make_node("Shape", [ids], [f"{p}_ids_shape"], name=f"{p}_ids_shape"),
            helper.make_node(
                "Concat",
                [f"{p}_ids_shape", _const(graph, f"{p}_k", np.array([head.k]))],
                [f"{p}_shape"],
                name=f"{p}_shape",
                axis=0,
            ),
            helper.make_node("Reshape", [f"{p}_values", f"{p}_shape"], [out], name=f"{p}_reshape"),
        ]
        old = [node, dq]
    at = min(list(graph.node).index(o) for o in old)
    for o in old:
        graph.node.remove(o)
    for i, n in enumerate(new):
        graph.node.insert(at + i, n)


def _numel(init: TensorProto) -> int:
    n = 1
    for d in init.dims:
        n *= d
    return n
