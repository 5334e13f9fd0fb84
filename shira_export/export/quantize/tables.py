"""Embedding tables (a `Gather` over a constant [rows, K] table) as 8- or 4-bit blocks.

ORT's MatMulNBits quantizer writes 4-bit tables only; 4-bit tables cost MiniLM's
mean-pooled sentence embeddings 0.998 -> 0.985 worst cosine (48 built-in sentences, every
MatMul at 8 bits), 8-bit ones about 1e-4. So tables are written here, for either width:
`GatherBlockQuantized` (com.microsoft) with per-row blocks of `block_size` along K,
asymmetric (uint8 zero points), fp32 scales, the same layout as MatMulNBits' B, so a tied
LM head can share them (quantize.tied).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from shira_export.artifacts.ir_edits import constant, edited, op, replace
from shira_export.export.quantize.graph import weight_initializers

__all__ = ["TableStats", "quantize_tables", "quantize_blocks", "pack4"]


@dataclass(frozen=True)
class TableStats:
    """What `quantize_tables` did."""

    bits: int
    tables: int  # Gather nodes now reading a quantized table
    skipped: tuple[str, ...]  # tables whose width no block size divides (left fp32)
    fp32_bytes: int
    quantized_bytes: int


def pack4(values: np.ndarray) -> np.ndarray:
    """uint8 [..., m] of 4-bit values -> [..., ceil(m / 2)] bytes, low nibble first."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), values.dtype)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def quantize_blocks(table: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric blocks of `block` along the last axis: (codes uint8 [rows, K], scales fp32
    [rows, K/block], zero points uint8 [rows, K/block]). Zero lies on the grid (exact zeros)."""
    rows, k = table.shape
    top = (1 << bits) - 1
    blocks = table.astype(np.float64).reshape(rows, k // block, block)
    low, high = np.minimum(blocks.min(-1), 0.0), np.maximum(blocks.max(-1), 0.0)
    scale = (high - low) / top
    scale = np.where(scale > 0, scale, 1.0)
    zp = np.clip(np.round(-low / scale), 0, top)
    codes = np.clip(np.round(blocks / scale[..., None] + zp[..., None]), 0, top)
    return codes.reshape(rows, k).astype(np.uint8), scale.astype(np.float32), zp.astype(np.uint8)


def _block_for(k: int, wanted: int) -> int:
    """`wanted` when it divides K, else the largest smaller power of two >= 16 that does (0: none)."""
    block = wanted
    while block >= 16 and k % block:
        block //= 2
    return block if block >= 16 else 0


def quantize_tables(model: onnx.ModelProto, *, bits: int, block_size: int, exclude: Sequence[str] = ()) -> TableStats:
    """Replace each `Gather(table, ids)` over a constant 2-D float table (axis 0) by a
    `GatherBlockQuantized` over `bits`-bit blocks, in place (through onnx-ir). The fp32 table
    stays in the graph's initializers until `drop_unused_initializers` (other readers may exist)."""
    weights = weight_initializers(model)
    done: dict[str, tuple[ir.Value, ir.Value, ir.Value, int]] = {}  # table -> (data, scales, zp, block)
    skipped: list[str] = []
    count = fp32_bytes = q_bytes = 0
    with edited(model) as view:
        graph = view.graph
        for node in list(graph):
            table = node.inputs[0] if node.op_type == "Gather" and node.domain == "" and node.inputs else None
            axis = node.attributes.get_int("axis", 0)
            if table is None or table.name not in weights or axis != 0 or node.name in exclude:
                continue
            name = table.name or ""
            if name not in done:
                arr = numpy_helper.to_array(weights[name])
                block = _block_for(arr.shape[1], block_size)
                if not block:
                    skipped.append(node.name or "")
                    continue
                codes, scales, zp = quantize_blocks(arr, bits, block)
                if bits == 4:
                    codes, zp = pack4(codes), pack4(zp)
                names = (f"{name}_q{bits}", f"{name}_q{bits}_scales", f"{name}_q{bits}_zp")
                data, scales_v, zp_v = (constant(graph, n, v) for n, v in zip(names, (codes, scales, zp)))
                done[name] = (data, scales_v, zp_v, block)
                fp32_bytes += arr.nbytes
                q_bytes += codes.nbytes + scales.nbytes + zp.nbytes
            data, scales_v, zp_v, block = done[name]
            quantized = op(
                "GatherBlockQuantized",
                [data, node.inputs[1], scales_v, zp_v],
                node.outputs[0].name or "",
                name=node.name or f"{name}_gather",
                domain="com.microsoft",
                bits=bits,
                block_size=block,
                gather_axis=0,
                quantize_axis=1,
            )
            replace(graph, [node], [quantized], [node.outputs[0]], [quantized.outputs[0]])
            count += 1
    if count and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return TableStats(bits, count, tuple(skipped), fp32_bytes, q_bytes)
