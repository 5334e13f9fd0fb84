"""The torch exporter's Reshape -> Transpose -> Reshape rewrite: applied where provable, exact."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from shira_export.export.exporters.graph_rewrites import fuse_split_transposes


def _graph(split_from_shape: bool) -> onnx.ModelProto:
    """q @ k^T with k^T built as torch.export writes it. With `split_from_shape` False the
    second reshape's target is a constant (not provably k's own dims): no rewrite."""
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["k"], ["k_shape"]),
        helper.make_node("Slice", ["k_shape", "two", "four"], ["s_d"]),  # [s, d]
        helper.make_node("Concat", ["minus1", "s_d"], ["merged_shape"], axis=0),
        helper.make_node("Reshape", ["k", "merged_shape"], ["k3"]),
        helper.make_node("Transpose", ["k3"], ["k3t"], perm=[0, 2, 1]),
        helper.make_node("Slice", ["k_shape", "zero", "two"], ["b_h"]),
        helper.make_node("Slice", ["k_shape", "three", "four"], ["d"]),
        helper.make_node("Slice", ["k_shape", "two", "three"], ["s"]),
        helper.make_node("Concat", ["b_h", "d", "s"], ["split_shape"], axis=0),
        helper.make_node("Reshape", ["k3t", "split_shape" if split_from_shape else "fixed_shape"], ["kt"]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
    ]
    inits = [
        i64("minus1", [-1]),
        i64("zero", [0]),
        i64("two", [2]),
        i64("three", [3]),
        i64("four", [4]),
        i64("fixed_shape", [2, 3, 5, 4]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("q", TensorProto.FLOAT, ["b", 3, "t", 5]),
            helper.make_tensor_value_info("k", TensorProto.FLOAT, ["b", 3, "s", 5]),
        ],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_rewrite_is_exact_at_other_shapes_and_leaves_the_unprovable_alone():
    rng = np.random.default_rng(0)
    model = ir.from_proto(_graph(True))
    assert fuse_split_transposes(model) == 1
    rewritten = ir.to_proto(model)
    ops = [n.op_type for n in rewritten.graph.node]
    transposes = [n for n in rewritten.graph.node if n.op_type == "Transpose"]
    assert [list(helper.get_attribute_value(a)) for n in transposes for a in n.attribute][-1] == [0, 1, 3, 2]
    assert ops.index("MatMul") > ops.index("Transpose")
    for b, t, s in ((1, 1, 7), (2, 4, 3), (3, 2, 9)):
        feeds = {
            "q": rng.standard_normal((b, 3, t, 5), dtype=np.float32),
            "k": rng.standard_normal((b, 3, s, 5), dtype=np.float32),
        }
        expected = feeds["q"] @ np.swapaxes(feeds["k"], -1, -2)
        np.testing.assert_allclose(_run(rewritten, feeds), expected, rtol=1e-5, atol=1e-5)

    fixed = ir.from_proto(_graph(False))
    assert fuse_split_transposes(fixed) == 0


def test_torch_export_of_a_decoder_has_no_split_key_transpose(tmp_path):
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from shira_export.export.exporters.torch_export import export_with_torch

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        ffn_dim=32,
        num_attention_heads=2,
        max_position_embeddings=64,
        word_embed_proj_dim=16,
    )
    model = OPTForCausalLM(config).eval()
    path = export_with_torch(model, tmp_path, task="text-generation-with-past")
    proto = onnx.load(str(path))
    perms = [
        list(helper.get_attribute_value(a))
        for n in proto.graph.node
        if n.op_type == "Transpose"
        for a in n.attribute
        if a.name == "perm"
    ]
    assert [0, 2, 1] not in perms
    assert perms.count([0, 1, 3, 2]) == config.num_hidden_layers
    # parity with PyTorch at a shape other than the traced one, with left padding and a cache
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 64, (3, 2))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -2:]
    past = [torch.randn(3, 2, 5, 8) for _ in range(2 * config.num_hidden_layers)]
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    feeds.update(
        {f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}": p.numpy() for i, p in enumerate(past)}
    )
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for layer in range(config.num_hidden_layers):
        cache.update(past[2 * layer], past[2 * layer + 1], layer)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits
    got = session.run(["logits"], feeds)[0]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)  # row 0 is the left-padded one
