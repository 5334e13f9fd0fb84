"""int4's measured bit plan: the classifier criterion (predicted label agreement from the
calibration margins) and the per-output-kind cosine target, on tiny hand-built graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from shira_export.errors import ShiraInputError
from shira_export.export.quantize.calib import calibration_feeds
from shira_export.export.quantize.measure import WeightProbe, fake_quant, label_scores
from shira_export.export.quantize.mixed import plan_bits, plan_target
from shira_export.export.quantize.options import (
    DEFAULT_PLAN_AGREEMENT,
    DEFAULT_PLAN_COSINE,
    EMBEDDING_PLAN_COSINE,
    QuantizeOptions,
)


def _graph(kind: str, seed: int = 0) -> onnx.ModelProto:
    """input_ids -> table -> MatMul 32x64 -> Relu -> MatMul 64x32 -> output by `kind`:
    "states" (the [batch, tokens, 32] states), "classifier" (mean over tokens -> MatMul 32x32
    -> logits [batch, 32 labels]) or "lm" (MatMul 32x64 -> logits [batch, tokens, 64])."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 1, (64, 32)).astype(np.float32), "table"),
        numpy_helper.from_array(rng.normal(0, 0.2, (32, 64)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.2, (64, 32)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["x"], name="embed"),
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="mm2"),
    ]
    if kind == "states":
        nodes.append(helper.make_node("Add", ["h2", "x"], ["last_hidden_state"], name="residual"))
        out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["b", "t", 32])
    elif kind == "classifier":
        inits.append(numpy_helper.from_array(rng.normal(0, 1, (32, 32)).astype(np.float32), "w_head"))
        nodes += [
            helper.make_node("ReduceMean", ["h2"], ["pooled"], name="pool", axes=[1], keepdims=0),
            helper.make_node("MatMul", ["pooled", "w_head"], ["logits"], name="head"),
        ]
        out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 32])
    else:
        inits.append(numpy_helper.from_array(rng.normal(0, 1, (32, 64)).astype(np.float32), "w_head"))
        nodes.append(helper.make_node("MatMul", ["h2", "w_head"], ["logits"], name="head"))
        out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "t", 64])
    graph = helper.make_graph(
        nodes, kind, [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"])], [out], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_predicted_agreement_counts_margin_error_pairs():
    """1/2 * P(margin_i <= |lead change_j|) over all row pairs, in logits of the reference top-1."""
    ref = np.array([[1.0, 0.0, 0.0], [0.0, 0.1, 0.0], [3.0, 0.0, -1.0], [0.0, 0.0, 0.5]])  # margins 1, .1, 3, .5
    cand = ref.copy()
    cand[0, 0] -= 0.2  # row 0's lead: 1 -> 0.8 (|change| 0.2)
    cand[2, 1] += 1.0  # row 2's lead: 3 -> 2 (|change| 1.0)
    cand[3, 1] -= 0.3  # not the runner-up: row 3's lead unchanged
    s = label_scores(ref, cand)
    # changes (0.2, 0, 1.0, 0): pairs with margin <= change: 0.2 -> {0.1}; 1.0 -> {1, 0.1, 0.5} = 4 of 16
    assert s["labels_predicted"] == pytest.approx(1 - 0.5 * 4 / 16)
    assert s["labels"] == 1.0  # no row flipped, yet the prediction is below 1
    assert label_scores(ref, ref + 7.0)["labels_predicted"] == 1.0  # a shift moves no lead
    assert "labels_predicted" not in label_scores(ref, cand, predict=False)


def _plan(kind: str, **options: object):
    model = _graph(kind)
    return model, plan_bits(model, QuantizeOptions(mode="int4", **options))  # type: ignore[arg-type]


def test_classifier_plan_keeps_the_predicted_agreement():
    """The plan's recorded agreement is what the chosen weights give, and it follows its target:
    with the agreement unchecked every body MatMul takes 4 bits, with 1.0 (no margin may be
    reached by any row's change) only the one that keeps every lead does."""
    model, loose = _plan("classifier", plan_min_cosine=0.05, plan_min_agreement=0.0)
    assert loose.four == ("mm1", "mm2") and loose.heads == ("head",) and loose.eight == ("head",)
    m = loose.measured
    assert m is not None and m["target_agreement"] == 0.0
    # recompute the chosen set's score by hand: 4-bit body, 8-bit head, on the calibration rows
    feeds = calibration_feeds(model, None)
    probe = WeightProbe(model, ["mm1", "mm2", "head"], feeds)
    w = probe.weights
    trial = {
        "w1": fake_quant(w["w1"], bits=4, block_size=32, symmetric=False),
        "w2": fake_quant(w["w2"], bits=4, block_size=32, symmetric=False),
        "w_head": fake_quant(w["w_head"], bits=8, block_size=32, symmetric=False),
    }
    ref = np.concatenate([r[0] for r in probe.reference])
    cand = np.concatenate([probe.session.run(["logits"], {**f, **w, **trial})[0] for f, _ in feeds])
    expected = label_scores(ref, cand)["labels_predicted"]
    assert m["chosen_score"]["labels_predicted"] == pytest.approx(expected, abs=1e-5)
    assert expected < 1.0  # the 4-bit error reaches some margin here
    _, strict = _plan("classifier", plan_min_cosine=0.05, plan_min_agreement=1.0)
    assert strict.measured is not None and strict.measured["target_agreement"] == 1.0
    # only mm2 moves no lead past any margin; adding mm1 (the loose set) does
    assert strict.four == ("mm2",) and strict.measured["chosen_score"]["labels_predicted"] == 1.0
    assert "predicted label agreement" in loose.summary()


def test_cosine_target_by_output_kind():
    """Token states (feature extraction) get the embedding target, logits the default one; an
    explicit plan_min_cosine wins. Only classifier plans carry an agreement target."""
    for kind, target in (("states", EMBEDDING_PLAN_COSINE), ("lm", DEFAULT_PLAN_COSINE), ("classifier", 0.99)):
        model = _graph(kind)
        heads = ("head",) if kind != "states" else ()
        assert plan_target(model, heads, QuantizeOptions(mode="int4"))[0] == target
        assert plan_target(model, heads, QuantizeOptions(mode="int4", plan_min_cosine=0.9)) == (
            0.9,
            "plan_min_cosine given",
        )
    assert (EMBEDDING_PLAN_COSINE, DEFAULT_PLAN_COSINE, DEFAULT_PLAN_AGREEMENT) == (0.995, 0.99, 0.97)
    _, states = _plan("states")
    assert states.measured is not None and states.measured["target_cosine"] == 0.995
    assert states.measured["target_agreement"] is None and "embedding target" in states.measured["reason"]
    _, lm = _plan("lm")
    assert lm.measured is not None and lm.measured["target_cosine"] == 0.99 and lm.measured["target_agreement"] is None


@pytest.mark.parametrize("value", [1.5, -0.1, True, "high", float("nan")])
def test_plan_min_agreement_is_checked(value):
    with pytest.raises(ShiraInputError, match="plan_min_agreement: expected a fraction in"):
        QuantizeOptions(mode="int4", plan_min_agreement=value)  # type: ignore[arg-type]
    assert QuantizeOptions(mode="int4").plan_min_cosine is None  # chosen per output kind


@pytest.mark.parametrize("kind", ["classifier", "states"])
def test_classifier_8bit_matmuls_keep_fp32_activations(tmp_path, kind):
    """A classifier graph's 8-bit MatMulNBits run at accuracy level 0 (fp32 activations) unless
    given; other graphs keep the CPU's choice. The manifest's choices say which and why."""
    from shira_export.export.quantize import choose, quantize_onnx_model

    onnx.save(_graph(kind), str(tmp_path / "m.onnx"))
    report = quantize_onnx_model(tmp_path / "m.onnx", tmp_path / "q.onnx", mode="int8")
    levels = {
        next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)  # 0: the default, not written
        for n in onnx.load(str(tmp_path / "q.onnx")).graph.node
        if n.op_type == "MatMulNBits"
    }
    cpu_level = choose(QuantizeOptions(mode="int8")).accuracy_level_8bit
    assert cpu_level == 4
    expected = 0 if kind == "classifier" else cpu_level
    assert levels == {expected} and report.choices["accuracy_level_8bit"] == expected
    assert ("classifier graph" in report.choices["reasons"]["accuracy_level_8bit"]) is (kind == "classifier")
    given = quantize_onnx_model(tmp_path / "m.onnx", tmp_path / "g.onnx", mode="int8", accuracy_level_8bit=4)
    assert given.choices["accuracy_level_8bit"] == 4


def test_calibration_texts_are_not_the_quality_sentences():
    """The MiniLM quality rows (docs/quantize.md) judge the plan on the example's sentences:
    none of them, nor a 4-word span of one, is among the plan's calibration texts."""
    import sys
    from pathlib import Path

    from shira_export.export.quantize.calib import CALIBRATION_TEXTS

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        from minilm_data import HELD_OUT, TRAIN, split
    finally:
        sys.path.pop(0)

    def spans(text: str) -> set:
        words = text.lower().split()
        return {" ".join(words[i : i + 4]) for i in range(len(words) - 3)} | {text}

    quality = split(HELD_OUT)[0] + split(TRAIN)[0]
    assert len(quality) >= 42 and len(CALIBRATION_TEXTS) == 32
    assert not set().union(*map(spans, CALIBRATION_TEXTS)) & set().union(*map(spans, quality))
