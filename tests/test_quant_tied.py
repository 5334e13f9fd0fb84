"""quantize.tied.share_tied_embeddings: a tied OPT head and its embedding lookup read one
quantized table after 4-bit, 8-bit-block or dynamic int8 quantization, logits unchanged
(blocks) or within int8 error (dynamic), the file smaller by the table's quantized size;
untied heads are left alone."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from shira_export import ShiraConfig, get_shira_model
from shira_export.export.quantize import QuantizeOptions, choose
from shira_export.export.quantize import graph as quant_graph
from shira_export.export.quantize.tables import quantize_tables
from shira_export.export.quantize.tied import share_tied_embeddings

VOCAB, HIDDEN = 2000, 128  # a table large enough that its bytes dominate the file


def _opt(tied: bool) -> OPTForCausalLM:
    torch.manual_seed(0)
    cfg = OPTConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=4,
        ffn_dim=128,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        word_embed_proj_dim=HIDDEN,
        tie_word_embeddings=tied,
    )
    return OPTForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """fp32 merged exports of a tied and an untied OPT, and their int8 / int4 files."""
    from shira_export.pipeline import export_merged

    root = tmp_path_factory.mktemp("tied")
    out = {}
    for tied in (True, False):
        name = "tied" if tied else "untied"
        base = _opt(tied)
        base.save_pretrained(root / f"{name}_base")
        get_shira_model(copy.deepcopy(base), ShiraConfig(r=4, init_weights=False, random_seed=1)).save_pretrained(
            root / f"{name}_adapter"
        )
        export_merged(
            root / f"{name}_base", root / f"{name}_adapter", root / name, task="text-generation", verify=False
        )
        out[name] = root / name / "model.onnx"
        for mode in ("int8", "int4", "int8blocks"):
            out[name, mode] = root / f"{name}_{mode}.onnx"
            onnx.save(_quantized(out[name], mode), str(out[name, mode]))
    return out


def _quantized(path, mode: str, *, embeddings: bool = True, symmetric: bool = False) -> onnx.ModelProto:
    """The quantizer runs of export.quantize without the sharing: "int8" = dynamic int8 with the
    reduce_range the code chooses on this CPU; "int4" / "int8blocks": every MatMul and table at 4 / 8 bits."""
    model = onnx.load(str(path))
    quant_graph.fold_transposed_weights(model)
    if mode == "int8":
        chosen = choose(QuantizeOptions(mode="int8", int8_method="dynamic")).reduce_range
        q, counts = quant_graph.run_int8_dynamic(
            model, per_channel=True, reduce_range=bool(chosen), embeddings=embeddings
        )
    else:
        bits = 4 if mode == "int4" else 8
        quant_graph.gemms_to_matmuls(model)
        q, counts = quant_graph.run_nbits(
            model,
            quant_graph.count_quantizable(model, gemm=False)[0],
            bits=bits,
            block_size=32,
            symmetric=symmetric,
            accuracy_level=None if bits == 4 else 4,
        )
        if embeddings:
            assert quantize_tables(q, bits=bits, block_size=32).tables == 2  # token + position tables
    assert not counts.missed
    quant_graph.drop_unused_initializers(q)
    return q


def _logits(model: onnx.ModelProto | str, tokens: int = 7) -> np.ndarray:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    session = ort.InferenceSession(data if isinstance(data, bytes) else str(data))
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, tokens)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    feeds = {
        i.name: feeds[i.name] if i.name in feeds else np.tile(np.arange(tokens), (2, 1)) for i in session.get_inputs()
    }
    return session.run(["logits"], feeds)[0]


def _shared(path) -> tuple[onnx.ModelProto, int]:
    model = onnx.load(str(path))
    count = share_tied_embeddings(model)
    quant_graph.drop_unused_initializers(model)
    onnx.checker.check_model(model)
    return model, count


def test_int4_shares_the_head_blocks(exports):
    model, count = _shared(exports["tied", "int4"])
    assert count == 1  # the token table only: the position table has no matching head
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GatherBlockQuantized") == 2
    lookup = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized" and n.name.endswith("_shared"))
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    assert lookup.input[2:] == head.input[2:4]  # scales and zero points are the head's tensors
    # the lookup now reads the head's blocks: the same table rounded by ORT's quantizer instead of ours
    np.testing.assert_allclose(_logits(model), _logits(exports["tied", "int4"]), atol=1e-5)
    for tokens in (1, 13):  # other shapes than the check above
        np.testing.assert_allclose(_logits(model, tokens), _logits(exports["tied", "int4"], tokens), atol=1e-5)
    saved = exports["tied", "int4"].stat().st_size - len(model.SerializeToString())
    table = VOCAB * HIDDEN // 2 + VOCAB * (HIDDEN // 32) * 4  # 4-bit values + fp32 scales
    assert 0.99 * table <= saved < table + VOCAB * HIDDEN // 8
    options = ort.SessionOptions()  # the Reshape of the head's B is not constant-folded away
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ids = np.arange(VOCAB, dtype=np.int64)[None, :]
    session = ort.InferenceSession(model.SerializeToString(), options)
    unshared = ort.InferenceSession(str(exports["tied", "int4"]), options)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.zeros_like(ids)}
    feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
    np.testing.assert_allclose(session.run(["logits"], feeds)[0], unshared.run(["logits"], feeds)[0], atol=1e-5)


def test_int4_symmetric_head_without_zero_points(exports, tmp_path):
    path = tmp_path / "sym.onnx"
    onnx.save(_quantized(exports["tied"], "int4", symmetric=True), str(path))
    model, count = _shared(path)
    assert count == 1
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    assert len([i for i in head.input if i]) == 3  # no zero points: both ops default to 8
    # our tables are asymmetric: the shared lookup reads the head's coarser symmetric blocks instead
    reference = _logits(exports["tied"], 5)
    assert np.abs(_logits(model, 5) - reference).max() < 2 * np.abs(_logits(path, 5) - reference).max() + 0.05


def test_int8_shares_the_head_weight_within_int8_error(exports):
    model, count = _shared(exports["tied", "int8"])
    assert count == 1
    lookup = next(n for n in model.graph.node if n.name.endswith("_shared_gather"))
    heads = [n for n in model.graph.node if n.op_type == "MatMulInteger" and n.input[1] == lookup.input[0]]
    assert len(heads) == 1  # the head's int8 [K, N] weight, gathered by column
    for tokens in (1, 13):
        reference = _logits(exports["tied"], tokens)
        unshared = np.abs(_logits(exports["tied", "int8"], tokens) - reference)
        shared = np.abs(_logits(model, tokens) - reference)
        # per-row head scales replace one per-tensor table scale: the same error size (the max is noisy)
        assert shared.mean() <= 1.25 * unshared.mean(), (shared.mean(), unshared.mean())
        assert shared.max() < 0.06 * np.abs(reference).max()
    saved = exports["tied", "int8"].stat().st_size - len(model.SerializeToString())
    assert 0.99 * VOCAB * HIDDEN <= saved < 1.1 * VOCAB * HIDDEN  # the new nodes cost ~1 KB


def test_int8_blocks_share_the_head_blocks(exports):
    model, count = _shared(exports["tied", "int8blocks"])
    assert count == 1
    lookup = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized" and n.name.endswith("_shared"))
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    assert [a.i for a in lookup.attribute if a.name == "bits"] == [8] and lookup.input[2:] == head.input[2:4]
    for tokens in (1, 13):
        np.testing.assert_allclose(_logits(model, tokens), _logits(exports["tied", "int8blocks"], tokens), atol=1e-5)
    saved = exports["tied", "int8blocks"].stat().st_size - len(model.SerializeToString())
    table = VOCAB * HIDDEN + VOCAB * (HIDDEN // 32) * 5  # 8-bit values + fp32 scales + uint8 zero points
    assert 0.99 * table <= saved < 1.1 * table


@pytest.mark.parametrize("mode", ["int8", "int4", "int8blocks"])
def test_untied_head_is_left_alone(exports, mode):
    model, count = _shared(exports["untied", mode])
    assert count == 0
    np.testing.assert_array_equal(_logits(model), _logits(exports["untied", mode]))


def test_fp32_lookup_is_not_quantized_by_sharing(exports, tmp_path):
    """embeddings=False keeps the lookup fp32: sharing would quantize it, so nothing is shared."""
    for mode in ("int8", "int4", "int8blocks"):
        onnx.save(_quantized(exports["tied"], mode, embeddings=False), str(tmp_path / f"{mode}.onnx"))
        _, count = _shared(tmp_path / f"{mode}.onnx")
        assert count == 0


def test_patterns_see_only_sole_consumers():
    """A tensor read by two nodes (or a graph output) is no pattern's to rewire."""
    from onnx import TensorProto, helper

    from shira_export.export.quantize.tied import _sole_consumers

    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="r"),
        helper.make_node("Neg", ["a"], ["b"], name="n1"),
        helper.make_node("Abs", ["a"], ["c"], name="n2"),
        helper.make_node("Exp", ["b"], ["y"], name="e"),
        helper.make_node("Identity", ["c"], ["z"], name="i"),
    ]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2])  # noqa: E731
    graph = helper.make_graph(nodes, "g", [vi("x")], [vi("y"), vi("z"), vi("c")])
    sole = {name: node.name for name, node in _sole_consumers(graph).items()}
    assert sole == {"x": "r", "b": "e"}  # "a" has two readers, "c" is also a graph output
