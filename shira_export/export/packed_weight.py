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

from typing import Mapping, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper

from shira_export.export.delta_sites import const

__all__ = ["PACKED_WORK_THRESHOLD", "packed_int4", "dequantized_nodes"]

# Above this many rows x entries (slots + scattered) the dequantizing branch runs: the decode
# branch costs ~2.7 ns per row and entry, the dequantizing one a fixed ~2.5 ms per 768x768 site
# on the development machine (tools/bench_site.py --only int4,int4_new): r=8 crosses at ~64
# rows, r=32 at ~17.
PACKED_WORK_THRESHOLD = 1_000_000


def packed_int4(node: onnx.NodeProto, initializers: Mapping[str, onnx.TensorProto]) -> Optional[dict]:
    """{N, K, bits, block, blocks, zero_points} when `node` is a 4- or 8-bit MatMulNBits computing
    with fp32 activations whose packed weight, scales (and uint8 zero points) are initializers
    and that has no g_idx / bias; else None."""
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    extra = [name for name in node.input[4:] if name]
    b, scales = initializers.get(node.input[1]), initializers.get(node.input[2])
    zp = initializers.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    bits = int(attrs.get("bits", 4))
    # accuracy_level 2-4 computes in fp16/bf16/int8 activations: a fp32 prefill would then not
    # equal the decode branch's op, so those sites keep the base op in both branches
    if bits not in (4, 8) or int(attrs.get("accuracy_level", 0)) > 1 or extra or b is None or scales is None:
        return None
    if b.data_type != TensorProto.UINT8 or len(b.dims) != 3 or scales.data_type != TensorProto.FLOAT:
        return None
    n, blocks, blob = (int(d) for d in b.dims)
    block = int(attrs["block_size"])
    if blob * 8 // bits != block or int(np.prod(scales.dims)) != n * blocks:
        return None
    per_byte = 8 // bits  # zero points packed like the weight, along the blocks
    if zp is not None and (zp.data_type != TensorProto.UINT8 or int(np.prod(zp.dims)) != n * -(-blocks // per_byte)):
        return None
    return {"N": n, "K": int(attrs["K"]), "bits": bits, "block": block, "blocks": blocks, "zero_points": zp is not None}


def dequantized_nodes(p: str, node: onnx.NodeProto, info: dict, runtime_value: str) -> tuple[list[onnx.NodeProto], str]:
    """Nodes writing `p + "wt"`: the site's fp32 weight [K, N] (MatMul layout) dequantized from
    `node`'s packed inputs. `runtime_value` is any int64 [1] tensor computed at run time (its
    product with 0 keeps the row ids, and so the dequantized weight, out of constant folding)."""
    n, k, blocks, block = info["N"], info["K"], info["blocks"], info["block"]
    mk = helper.make_node
    # GatherBlockQuantized's shape inference needs static shapes for scales and zero points, so
    # only their values are made run-time (x + 0): no load-time copy of either is kept.
    rt = p + "rt_zero"
    nodes = [
        const(p + "zero1", np.array([0], np.int64)),
        mk("Mul", [runtime_value, p + "zero1"], [rt], name=rt),
        const(p + "ids0", np.arange(n, dtype=np.int64)),
        mk("Add", [p + "ids0", rt], [p + "ids"], name=p + "ids"),
        mk("Cast", [rt], [p + "rt_f"], name=p + "rt_f", to=TensorProto.FLOAT),
        mk("Add", [node.input[2], p + "rt_f"], [p + "scales_rt"], name=p + "scales_rt"),
        const(p + "s3", np.array([n, blocks, 1], np.int64)),
        mk("Reshape", [p + "scales_rt", p + "s3"], [p + "scales3"], name=p + "scales3"),
    ]
    inputs = [node.input[1], p + "ids", p + "scales3"]
    if info["zero_points"] and info["bits"] == 8:
        nodes += [
            mk("Cast", [rt], [p + "rt_u8"], name=p + "rt_u8", to=TensorProto.UINT8),
            mk("BitwiseOr", [node.input[3], p + "rt_u8"], [p + "zp_rt"], name=p + "zp_rt"),
            mk("Reshape", [p + "zp_rt", p + "s3"], [p + "zp3"], name=p + "zp3"),
        ]
        inputs.append(p + "zp3")
    elif info["zero_points"]:  # MatMulNBits packs two 4-bit zero points per byte along the blocks
        nodes += [
            mk("Cast", [rt], [p + "rt_u8"], name=p + "rt_u8", to=TensorProto.UINT8),
            const(p + "lo_mask0", np.array([15], np.uint8)),
            const(p + "four0", np.array([4], np.uint8)),
            mk("BitwiseOr", [p + "rt_u8", p + "lo_mask0"], [p + "lo_mask"], name=p + "lo_mask"),
            mk("BitwiseOr", [p + "rt_u8", p + "four0"], [p + "four"], name=p + "four"),
            mk("BitwiseAnd", [node.input[3], p + "lo_mask"], [p + "zlo"], name=p + "zlo"),
            mk("BitShift", [node.input[3], p + "four"], [p + "zhi"], name=p + "zhi", direction="RIGHT"),
            const(p + "z_shape", np.array([n, -1, 1], np.int64)),
            mk("Reshape", [p + "zlo", p + "z_shape"], [p + "zlo3"], name=p + "zlo3"),
            mk("Reshape", [p + "zhi", p + "z_shape"], [p + "zhi3"], name=p + "zhi3"),
            mk("Concat", [p + "zlo3", p + "zhi3"], [p + "zpairs"], name=p + "zpairs", axis=2),
            const(p + "z_flat", np.array([n, -1], np.int64)),
            mk("Reshape", [p + "zpairs", p + "z_flat"], [p + "zall"], name=p + "zall"),
            const(p + "z_lo", np.array([0], np.int64)),
            const(p + "z_hi", np.array([blocks], np.int64)),
            const(p + "ax1", np.array([1], np.int64)),
            mk("Slice", [p + "zall", p + "z_lo", p + "z_hi", p + "ax1"], [p + "zcut"], name=p + "zcut"),
            mk("Reshape", [p + "zcut", p + "s3"], [p + "zp3"], name=p + "zp3"),
        ]
        inputs.append(p + "zp3")
    nodes += [
        mk(
            "GatherBlockQuantized",
            inputs,
            [p + "deq"],
            name=p + "deq",
            domain="com.microsoft",
            bits=info["bits"],
            block_size=block,
            gather_axis=0,
            quantize_axis=2,
        ),  # [N, blocks, block]
        const(p + "w_shape", np.array([n, blocks * block], np.int64)),
        mk("Reshape", [p + "deq", p + "w_shape"], [p + "w_pad"], name=p + "w_pad"),
    ]
    w = p + "w_pad"
    if blocks * block != k:  # K padded up to whole blocks
        nodes += [
            const(p + "k_lo", np.array([0], np.int64)),
            const(p + "k_hi", np.array([k], np.int64)),
            const(p + "k_ax", np.array([1], np.int64)),
            mk("Slice", [w, p + "k_lo", p + "k_hi", p + "k_ax"], [p + "w"], name=p + "w"),
        ]
        w = p + "w"
    nodes.append(mk("Transpose", [w], [p + "wt"], name=p + "wt", perm=[1, 0]))  # [K, N]
    return nodes, p + "wt"
