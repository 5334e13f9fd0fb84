"""Tied embeddings after quantization: one quantized table for a tied LM head and its lookup
(4- or 8-bit MatMulNBits heads with GatherBlockQuantized lookups, or int8 MatMulInteger).

`fold_transposed_weights` gives a tied head (OPT, GPT-2) its own transposed copy of the
embedding table so the quantizers can read a constant B; the lookup is quantized apart, so
the file holds the table twice. `share_tied_embeddings` points the lookup at the head's
quantized weights. Tiedness is decided by content (the two dequantized tables agree within
their rounding), not by names. The edit runs on onnx-ir (artifacts.ir_edits): a pattern
rewires a tensor's consumer only when `Value.uses()` says it is the sole reader (readers
inside If/Loop bodies count), and new nodes take the removed lookup's place.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import numpy as np
import onnx
import onnx_ir as ir

from shira_export.artifacts.ir_edits import constant, edited, op, replace, sole_consumer

__all__ = ["share_tied_embeddings"]

_Arr = Callable[[ir.Value], np.ndarray]


def share_tied_embeddings(model: onnx.ModelProto) -> int:
    """Point each quantized embedding lookup whose table equals (within quantization error)
    a quantized LM head's weight at the head's weights, in place, so a tied table is stored
    once. int4: `GatherBlockQuantized` reads MatMulNBits' B (packed uint8, reshaped to
    [N, K/2]), scales and zero points (same blocks along hidden, same packing). int8:
    `Gather(B, ids, axis=1)` on MatMulInteger's [K, N] weight, a transpose of the gathered
    [K, tokens] slice, then the head's per-row scale and zero point. Returns how many lookups
    now share; run `drop_unused_initializers` after it to drop the old tables."""
    shared = 0
    with edited(model) as view:
        graph = view.graph
        arrays: dict[str, np.ndarray] = {}

        def arr(value: ir.Value) -> np.ndarray:
            name = value.name or ""
            if name not in arrays:
                assert value.const_value is not None  # callers pass initializers only
                arrays[name] = value.const_value.numpy()
            return arrays[name]

        heads = [_Head(n, arr, _int8_scale(n, graph)) for n in graph if _is_head(n, graph)]
        heads = [h for h in heads if h.int4 or h.scale is not None]
        for node in list(graph):
            table = _lookup_table(node, graph, arr)
            if table is None:
                continue
            head = next((h for h in heads if h.matches(table)), None)
            if head is None:
                continue
            _rewire(graph, node, head)
            shared += 1
    return shared


def _init(value: Optional[ir.Value], graph: ir.Graph) -> Optional[ir.Value]:
    """`value` when it is an initializer of `graph` (main graph) with its data, else None."""
    if value is None or graph.initializers.get(value.name or "") is not value or value.const_value is None:
        return None
    return value


def _dims(value: ir.Value) -> tuple[int, ...]:
    assert value.const_value is not None
    return tuple(value.const_value.shape.numpy())


def _numel(value: ir.Value) -> int:
    assert value.const_value is not None
    return int(value.const_value.size)


def _is_head(node: ir.Node, graph: ir.Graph) -> bool:
    ins = node.inputs
    if node.op_type == "MatMulNBits":
        a = node.attributes  # g_idx (input 4) reorders K: not a row-wise table any more
        return (
            a.get_int("bits", 4) in (4, 8)
            and a.get_int("K") % a.get_int("block_size") == 0
            and len(ins) < 5
            and all(_init(i, graph) is not None for i in ins[1:4] if i is not None)
        )
    return (
        node.op_type == "MatMulInteger"
        and len(ins) == 4
        and _init(ins[1], graph) is not None
        and _init(ins[3], graph) is not None
        and len(_dims(ins[1])) == 2  # type: ignore[arg-type]
    )


def _unpack4(packed: np.ndarray, count: int) -> np.ndarray:
    """uint8 [..., m] holding two 4-bit values per byte (low nibble first) -> [..., count]."""
    both = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return both[..., :count].astype(np.float32)


class _Head:
    """A quantized MatMul weight [K, N] seen as a quantized [N, K] table."""

    def __init__(self, node: ir.Node, arr: _Arr, scale: Optional[ir.Value]) -> None:
        self.node, self.arr, self.scale = node, arr, scale
        self.int4 = node.op_type == "MatMulNBits"  # blockwise (4 or 8 bits), else MatMulInteger
        self.bits = 8
        ins = node.inputs
        b = ins[1]
        assert b is not None  # _is_head checked it
        self.b: ir.Value = b
        self.zp = ins[3] if len(ins) > 3 else None
        if self.int4:
            a = node.attributes
            self.n, self.k, self.block = a.get_int("N"), a.get_int("K"), a.get_int("block_size")
            self.bits = a.get_int("bits", 4)
            self.scales = ins[2]
        else:
            self.k, self.n = _dims(self.b)
        self._table: Optional[tuple[np.ndarray, np.ndarray]] = None

    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """(dequantized [N, K], per-row largest scale) computed once."""
        if self._table is None:
            if self.int4:
                blocks = self.k // self.block
                assert self.scales is not None
                scales = self.arr(self.scales).reshape(self.n, blocks).astype(np.float32)
                if self.bits == 8:
                    zp = (
                        self.arr(self.zp).reshape(self.n, blocks).astype(np.float32)
                        if self.zp is not None
                        else np.full((self.n, blocks), 128, np.float32)
                    )
                    q = self.arr(self.b).reshape(self.n, blocks, -1).astype(np.float32)
                else:
                    zp = (
                        _unpack4(self.arr(self.zp), blocks)
                        if self.zp is not None
                        else np.full((self.n, blocks), 8, np.float32)
                    )
                    q = _unpack4(self.arr(self.b).reshape(self.n, -1), self.k).reshape(self.n, blocks, -1)
                w = ((q - zp[..., None]) * scales[..., None]).reshape(self.n, self.k)
                self._table = w, np.abs(scales).max(axis=1)
            else:
                assert self.scale is not None and self.zp is not None  # int8 heads without a scale are filtered out
                scale = np.broadcast_to(self.arr(self.scale).astype(np.float32).reshape(-1), (self.n,))
                zp = np.broadcast_to(self.arr(self.zp).astype(np.float32).reshape(-1), (self.n,))
                q = self.arr(self.b).astype(np.float32).T
                self._table = (q - zp[:, None]) * scale[:, None], np.abs(scale)
        return self._table

    def matches(self, table: tuple[np.ndarray, np.ndarray]) -> bool:
        values, step = table
        if values.shape != (self.n, self.k):
            return False
        mine, my_step = self.table()
        # two roundings of one table differ by at most half a step each; untied tables by far more
        return bool(np.all(np.abs(values - mine).max(axis=1) <= 0.51 * (step + my_step) + 1e-6))


def _sole_consumers(graph: Union[onnx.GraphProto, ir.Graph]) -> dict[str, ir.Node]:
    """{tensor: its sole reader} for the tensors the graph's nodes read (`sole_consumer`)."""
    view = ir.serde.deserialize_graph(graph) if isinstance(graph, onnx.GraphProto) else graph
    found = {}
    for node in view:
        for value in node.inputs:
            reader = sole_consumer(value)
            if value is not None and reader is not None:
                found[value.name or ""] = reader
    return found


def _int8_scale(node: ir.Node, graph: ir.Graph) -> Optional[ir.Value]:
    """MatMulInteger's weight scale: quantize_dynamic writes Mul(Cast(MatMulInteger), Mul(a_scale, b_scale))."""
    if node.op_type != "MatMulInteger":  # a head (_is_head): B and its zero point are initializers
        return None
    cast = sole_consumer(node.outputs[0])
    mul = sole_consumer(cast.outputs[0]) if cast is not None and cast.op_type == "Cast" else None
    if cast is None or mul is None or mul.op_type != "Mul":
        return None
    other = next((i for i in mul.inputs if i is not cast.outputs[0]), None)
    product = other.producer() if other is not None else None
    if product is None or product.op_type != "Mul":
        return None
    width = _dims(node.inputs[1])[1]  # type: ignore[arg-type]
    found = [i for i in product.inputs if _init(i, graph) is not None and _numel(i) in (1, width)]  # type: ignore[arg-type]
    return found[0] if len(found) == 1 else None


def _lookup_table(node: ir.Node, graph: ir.Graph, arr: _Arr) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(dequantized [N, K] table, per-row largest scale) of a quantized embedding lookup, else None."""
    ins = node.inputs
    if node.op_type == "GatherBlockQuantized":
        a = node.attributes
        data = _init(ins[0], graph)
        if (
            data is None
            or len(_dims(data)) != 2
            or a.get_int("gather_axis", 0) != 0
            or a.get_int("quantize_axis", 1) not in (1, -1)
            or not all(_init(i, graph) is not None for i in ins[2:] if i is not None)
        ):
            return None
        n, k = _dims(data)
        block, bits = a.get_int("block_size", 128), a.get_int("bits", 4)
        dtype = data.const_value.dtype  # type: ignore[union-attr]
        if dtype == ir.DataType.UINT8 and bits == 8:
            q = arr(data).astype(np.float32)
        elif dtype == ir.DataType.UINT8:
            if bits != 4:
                return None
            q, k = _unpack4(arr(data), 2 * k), 2 * k
        elif dtype in (ir.DataType.UINT4, ir.DataType.INT4):
            q = arr(data).astype(np.float32)
        else:
            return None
        if k % block:
            return None
        blocks = k // block
        scales = arr(ins[2]).astype(np.float32).reshape(n, blocks)  # type: ignore[arg-type]
        zp_value = ins[3] if len(ins) > 3 else None
        if zp_value is not None:
            zp = arr(zp_value)
            zp = (
                _unpack4(zp, blocks)
                if dtype == ir.DataType.UINT8 and bits == 4
                else zp.astype(np.float32).reshape(n, blocks)
            )
        else:
            zp = np.full((n, blocks), (1 << (bits - 1)) if dtype == ir.DataType.UINT8 else 0.0, np.float32)
        w = (q.reshape(n, blocks, block) - zp[..., None]) * scales[..., None]
        return w.reshape(n, k), np.abs(scales).max(axis=1)
    data = _init(ins[0], graph) if node.op_type == "Gather" else None
    if data is not None and node.attributes.get_int("axis", 0) == 0:
        dq = sole_consumer(node.outputs[0])
        if (
            dq is None
            or dq.op_type != "DequantizeLinear"
            or len(_dims(data)) != 2
            or not all(_init(i, graph) is not None and _numel(i) == 1 for i in dq.inputs[1:] if i is not None)
        ):
            return None  # quantize_dynamic writes one scale per table; anything else is not this pattern
        scale = float(arr(dq.inputs[1]).reshape(-1)[0])  # type: ignore[arg-type]
        zp_value = dq.inputs[2] if len(dq.inputs) > 2 else None
        zero = float(arr(zp_value).reshape(-1)[0]) if zp_value is not None else 0.0
        w = (arr(data).astype(np.float32) - zero) * scale
        return w, np.full(_dims(data)[0], abs(scale), np.float32)
    return None


def _rows(graph: ir.Graph, value: ir.Value, shape: list[int], node_name: str) -> tuple[ir.Value, Optional[ir.Node]]:
    """`Reshape(value, shape)` named `{value}_rows`: the one a lookup of the same table made
    already, else a new node (returned so the caller places it)."""
    name = f"{value.name}_rows"
    for use in value.uses():
        if use.node.op_type == "Reshape" and use.node.outputs[0].name == name:
            return use.node.outputs[0], None
    shape_value = constant(graph, f"{value.name}_rows_shape", np.array(shape))
    node = op("Reshape", [value, shape_value], name, name=node_name)
    return node.outputs[0], node


def _rewire(graph: ir.Graph, node: ir.Node, head: _Head) -> None:
    """Replace the lookup `node` (and an int8 lookup's DequantizeLinear) by one reading `head`'s weights."""
    base, ids = node.name or node.outputs[0].name, node.inputs[1]
    new: list[ir.Node] = []

    def add(made: tuple[ir.Value, Optional[ir.Node]]) -> ir.Value:
        if made[1] is not None:
            new.append(made[1])
        return made[0]

    if head.int4:
        blocks = head.k // head.block
        assert head.scales is not None
        inputs = [add(_rows(graph, head.b, [head.n, head.k * head.bits // 8], f"{base}_shared_rows")), ids]
        scales = head.scales
        if list(head.arr(scales).shape) != [head.n, blocks]:
            scales = add(_rows(graph, scales, [head.n, blocks], f"{base}_shared_scales"))
        inputs.append(scales)
        if head.zp is not None:
            zp, width = head.zp, (blocks + 1) // 2 if head.bits == 4 else blocks
            if list(head.arr(zp).shape) != [head.n, width]:
                zp = add(_rows(graph, zp, [head.n, width], f"{base}_shared_zp"))
            inputs.append(zp)
        attrs = {"bits": head.bits, "block_size": head.block, "gather_axis": 0, "quantize_axis": 1}
        out = node.outputs[0].name or ""
        new.append(op("GatherBlockQuantized", inputs, out, name=f"{base}_shared", domain="com.microsoft", **attrs))
        old = [node]
    else:  # B is [K, N]: gather columns, then transpose only the gathered [K, tokens] slice
        dq = sole_consumer(node.outputs[0])
        assert dq is not None  # _lookup_table matched it
        old, out, p = [node, dq], dq.outputs[0].name or "", f"{base}_shared"
        flat = constant(graph, "shira_shared_flat_shape", np.array([-1]))
        axis1 = lambda: constant(graph, "shira_shared_axis1", np.array([1]))  # noqa: E731
        new += [op("Reshape", [ids, flat], f"{p}_ids", name=f"{p}_ids")]
        pos = new[-1].outputs[0]
        new += [op("Gather", [head.b, pos], f"{p}_cols", name=f"{p}_gather", axis=1)]
        new += [op("Transpose", [new[-1].outputs[0]], f"{p}_rows_q", name=f"{p}_transpose", perm=[1, 0])]
        new += [op("Cast", [new[-1].outputs[0]], f"{p}_rows_f", name=f"{p}_cast", to=onnx.TensorProto.FLOAT)]
        rows = new[-1].outputs[0]
        if np.any(head.arr(head.zp)):  # type: ignore[arg-type]
            new += [op("Gather", [head.zp, pos], f"{p}_zp_q", name=f"{p}_zp_gather")]
            new += [op("Cast", [new[-1].outputs[0]], f"{p}_zp", name=f"{p}_zp_cast", to=onnx.TensorProto.FLOAT)]
            new += [op("Unsqueeze", [new[-1].outputs[0], axis1()], f"{p}_zp_col", name=f"{p}_zp_col")]
            new += [op("Sub", [rows, new[-1].outputs[0]], f"{p}_centered", name=f"{p}_sub")]
            rows = new[-1].outputs[0]
        scale = head.scale
        assert scale is not None
        if _numel(scale) > 1:
            new += [op("Gather", [scale, pos], f"{p}_scale", name=f"{p}_scale_gather")]
            new += [op("Unsqueeze", [new[-1].outputs[0], axis1()], f"{p}_scale_col", name=f"{p}_scale_col")]
            scale = new[-1].outputs[0]
        new += [op("Mul", [rows, scale], f"{p}_values", name=f"{p}_mul")]
        values = new[-1].outputs[0]
        new += [op("Shape", [ids], f"{p}_ids_shape", name=f"{p}_ids_shape")]
        k = constant(graph, f"{p}_k", np.array([head.k]))
        new += [op("Concat", [new[-1].outputs[0], k], f"{p}_shape", name=f"{p}_shape", axis=0)]
        new += [op("Reshape", [values, new[-1].outputs[0]], out, name=f"{p}_reshape")]
    replace(graph, old, new, [old[-1].outputs[0]], [new[-1].outputs[0]])
