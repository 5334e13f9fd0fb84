"""The fp32 weight of a 4- or 8-bit `MatMulNBits` site, dequantized inside the prefill branch.

A packed int4 / int8 weight cannot take a scatter, so the prefill of a quantized site would pay
the int4 MatMul plus a second, fp32 MatMul against a dense delta (about 2.2x the int4
site, docs/sparse_format.md). Instead the prefill branch dequantizes the packed weight
with onnxruntime's `com.microsoft.GatherBlockQuantized` (all rows; exact: the same values
MatMulNBits computes with), adds the delta to it and runs one fp32 MatMul, while the decode
branch keeps the MatMulNBits op itself. GatherBlockQuantized reads MatMulNBits' packed
[N, blocks, blob] bytes as they are (quantize_axis 2), so no second copy of the weight is
kept; its row ids, scales and zero points are run-time values (x + 0), so that no graph
optimizer can fold the dequantized weight into an fp32 constant (onnxruntime 1.32 does not
fold it even without this, measured; other runtimes and versions might).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_ir as ir
from onnx import TensorProto

from shira_export.artifacts.onnx_nodes import Nodes

__all__ = ["PACKED_TOKEN_THRESHOLD", "packed_int4", "dequantized_nodes"]

# Above this many tokens per sequence the dequantizing branch runs. Its cost is fixed (~2.5 ms
# per 768x768 site on the development machine), the decode delta's grows with rows x entries
# (tools/bench_site.py --only int4,int4_new): r=8 crosses near 60 rows, r=32 near 18. A token
# limit, not rows x entries, so that the gate is the same nodes for the sites that read one
# input (onnxruntime merges them) and costs no per-site ops at decode; 32 keeps both ranks
# within ~2x of their crossing.
PACKED_TOKEN_THRESHOLD = 32


def _constant(node: ir.Node, slot: int) -> Optional[ir.TensorProtocol]:
    """The initializer `node` reads at `slot`, or None (absent, or computed)."""
    value = node.inputs[slot] if slot < len(node.inputs) else None
    return value.const_value if value is not None and value.is_initializer() else None


def packed_int4(node: ir.Node) -> Optional[dict]:
    """{N, K, bits, block, blocks, zero_points} when `node` is a 4- or 8-bit MatMulNBits computing
    with fp32 activations whose packed weight, scales (and uint8 zero points) are initializers
    and that has no g_idx / bias; else None."""
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
        return None
    attrs = node.attributes
    extra = [value for value in node.inputs[4:] if value is not None]
    b, scales = _constant(node, 1), _constant(node, 2)
    zp = _constant(node, 3) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    bits = attrs.get_int("bits", 4)
    # accuracy_level 2-4 computes in fp16/bf16/int8 activations: a fp32 prefill would then not
    # equal the decode branch's op, so those sites keep the base op in both branches
    if bits not in (4, 8) or attrs.get_int("accuracy_level", 0) > 1 or extra or b is None or scales is None:
        return None
    if b.dtype != ir.DataType.UINT8 or len(b.shape) != 3 or scales.dtype != ir.DataType.FLOAT:
        return None
    n, blocks, blob = (int(d) for d in b.shape.numpy())
    block = attrs.get_int("block_size")
    if blob * 8 // bits != block or scales.size != n * blocks:
        return None
    per_byte = 8 // bits  # zero points packed like the weight, along the blocks
    if zp is not None and (zp.dtype != ir.DataType.UINT8 or zp.size != n * -(-blocks // per_byte)):
        return None
    k = attrs.get_int("K")
    return {"N": n, "K": k, "bits": bits, "block": block, "blocks": blocks, "zero_points": zp is not None}


def dequantized_nodes(b: Nodes, p: str, inputs: tuple[str, ...], info: dict, runtime_value: str) -> str:
    """Append the nodes writing `p + "w_nk"`, the site's fp32 weight [N, K] (PyTorch's [out, in],
    as MatMulNBits packs it: a MatMul with transB reads it without a transposed copy per call)
    dequantized from a MatMulNBits' packed `inputs` (names: x, B, scales, zero points), and
    return that name. `runtime_value` is any int64 [1] tensor computed at run time (its
    product with 0 keeps the row ids, and so the dequantized weight, out of constant folding)."""
    n, k, blocks, block = info["N"], info["K"], info["blocks"], info["block"]
    # GatherBlockQuantized's shape inference needs static shapes for scales and zero points, so
    # only their values are made run-time (x + 0): no load-time copy of either is kept.
    b.const(p + "zero1", np.array([0], np.int64))
    rt = b.op("Mul", [runtime_value, p + "zero1"], p + "rt_zero")
    b.const(p + "ids0", np.arange(n, dtype=np.int64))
    b.op("Add", [p + "ids0", rt], p + "ids")
    b.op("Cast", [rt], p + "rt_f", to=TensorProto.FLOAT)
    b.op("Add", [inputs[2], p + "rt_f"], p + "scales_rt")
    b.const(p + "s3", np.array([n, blocks, 1], np.int64))
    b.op("Reshape", [p + "scales_rt", p + "s3"], p + "scales3")
    gather = [inputs[1], p + "ids", p + "scales3"]
    if info["zero_points"] and info["bits"] == 8:
        b.op("Cast", [rt], p + "rt_u8", to=TensorProto.UINT8)
        b.op("BitwiseOr", [inputs[3], p + "rt_u8"], p + "zp_rt")
        gather.append(b.op("Reshape", [p + "zp_rt", p + "s3"], p + "zp3"))
    elif info["zero_points"]:  # MatMulNBits packs two 4-bit zero points per byte along the blocks
        b.op("Cast", [rt], p + "rt_u8", to=TensorProto.UINT8)
        b.const(p + "lo_mask0", np.array([15], np.uint8))
        b.const(p + "four0", np.array([4], np.uint8))
        b.op("BitwiseOr", [p + "rt_u8", p + "lo_mask0"], p + "lo_mask")
        b.op("BitwiseOr", [p + "rt_u8", p + "four0"], p + "four")
        b.op("BitwiseAnd", [inputs[3], p + "lo_mask"], p + "zlo")
        b.op("BitShift", [inputs[3], p + "four"], p + "zhi", direction="RIGHT")
        b.const(p + "z_shape", np.array([n, -1, 1], np.int64))
        b.op("Reshape", [p + "zlo", p + "z_shape"], p + "zlo3")
        b.op("Reshape", [p + "zhi", p + "z_shape"], p + "zhi3")
        b.op("Concat", [p + "zlo3", p + "zhi3"], p + "zpairs", axis=2)
        b.const(p + "z_flat", np.array([n, -1], np.int64))
        b.op("Reshape", [p + "zpairs", p + "z_flat"], p + "zall")
        b.const(p + "z_lo", np.array([0], np.int64))
        b.const(p + "z_hi", np.array([blocks], np.int64))
        b.const(p + "ax1", np.array([1], np.int64))
        b.op("Slice", [p + "zall", p + "z_lo", p + "z_hi", p + "ax1"], p + "zcut")
        gather.append(b.op("Reshape", [p + "zcut", p + "s3"], p + "zp3"))
    b.op(
        "GatherBlockQuantized",
        gather,
        p + "deq",
        domain="com.microsoft",
        bits=info["bits"],
        block_size=block,
        gather_axis=0,
        quantize_axis=2,
    )  # [N, blocks, block]
    b.const(p + "w_shape", np.array([n, blocks * block], np.int64))
    if blocks * block == k:
        return b.op("Reshape", [p + "deq", p + "w_shape"], p + "w_nk")
    w = b.op("Reshape", [p + "deq", p + "w_shape"], p + "w_pad")  # K padded up to whole blocks
    b.const(p + "k_lo", np.array([0], np.int64))
    b.const(p + "k_hi", np.array([k], np.int64))
    b.const(p + "k_ax", np.array([1], np.int64))
    return b.op("Slice", [w, p + "k_lo", p + "k_hi", p + "k_ax"], p + "w_nk")
