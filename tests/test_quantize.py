"""export.quantize: int8 / int4 of merged and sparse exports of a tiny BERT, adapters
kept exact on the quantized sparse graph, and bad input refused with nothing written."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from shira_export import ShiraConfig, ShiraModel, get_shira_model
from shira_export.errors import ShiraInputError
from shira_export.export.quantize import quantize_onnx_model
from tiny_models import VOCAB, tiny_bert


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Base folder, two adapters, fp32 merged and sparse exports, and their int8/int4 copies."""
    from shira_export.pipeline import export_merged
    from shira_export.pipeline import export_sparse

    root = tmp_path_factory.mktemp("quant")
    base = tiny_bert()
    base.save_pretrained(root / "base")
    for name, seed in (("a", 1), ("b", 2)):
        model = get_shira_model(
            copy.deepcopy(base),
            ShiraConfig(r=4, target_modules=["query", "value"], init_weights=False, random_seed=seed),
        )
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "shira_weight" in n:
                    p.mul_(0.3)  # a delta of the size training gives, not randn's
        model.save_pretrained(root / name)
    export_merged(root / "base", root / "a", root / "merged", task="feature-extraction", verify=False)
    export_sparse(
        root / "base", {"a": root / "a", "b": root / "b"}, root / "sparse", task="feature-extraction", verify=False
    )
    reports = {}
    for kind in ("merged", "sparse"):
        for mode in ("int8", "int4"):
            reports[kind, mode] = quantize_onnx_model(root / kind, root / f"{kind}_{mode}", mode=mode, block_size=32)
    return root, base, reports


def _feeds(batch: int = 2, tokens: int = 11, seed: int = 0) -> dict:
    ids = np.random.default_rng(seed).integers(1, VOCAB, (batch, tokens)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def _torch_hidden(base, adapter_dir, feeds) -> np.ndarray:
    model = (
        base if adapter_dir is None else ShiraModel.from_pretrained(copy.deepcopy(base), adapter_dir).merge_and_unload()
    )
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()


def _cos_min(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def _session_run(folder, feeds, adapter=None):
    from shira_export.runtime import ShiraSession

    session = ShiraSession(folder, mode="portable")
    return session.run(
        {k: v for k, v in feeds.items() if k in session.input_names},
        adapter=adapter,
        output_names=["last_hidden_state"],
    )["last_hidden_state"]


@pytest.mark.parametrize("mode, min_cos", [("int8", 0.99), ("int4", 0.97)])
def test_merged_quantized_counts_size_and_parity(exports, mode, min_cos):
    root, base, reports = exports
    report = reports["merged", mode]
    counts = report.files["model.onnx"]
    assert counts["matmuls"][0] == counts["matmuls"][1] == 12  # 2 layers x (q, k, v, o, up, down)
    assert counts["gathers"][0] == counts["gathers"][1] == 2  # word + position tables (token type: 2 rows, too small)
    assert report.quantized_bytes < 0.8 * report.fp32_bytes  # tiny graph: node overhead dominates (MiniLM: bench)
    manifest = json.loads((root / f"merged_{mode}" / "shira_export.json").read_text())
    assert manifest["quantization"] == mode and manifest["kind"] == "merged"
    feeds = _feeds(tokens=13)  # not the traced length
    out = ort.InferenceSession(str(root / f"merged_{mode}" / "model.onnx")).run(["last_hidden_state"], feeds)[0]
    assert _cos_min(out, _torch_hidden(base, root / "a", feeds)) >= min_cos


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_sparse_quantized_switches_adapters_and_keeps_files(exports, mode):
    root, base, reports = exports
    folder = root / f"sparse_{mode}"
    assert reports["sparse", mode].sparse_sites == 4
    for name in ("a", "b"):  # adapters are copied byte for byte: still fp32, still valid
        rel = f"adapters/{name}.onnx_adapter"
        assert (folder / rel).read_bytes() == (root / "sparse" / rel).read_bytes()
    graph = onnx.load(str(folder / "model.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert "MatMulNBits" in ops and "MatMul" in ops  # attention's activation x activation MatMuls stay fp32
    feeds = _feeds(tokens=7)
    outs = {name: _session_run(folder, feeds, name) for name in ("a", "b", None)}
    assert np.abs(outs["a"] - outs["b"]).max() > 1e-3
    np.testing.assert_array_equal(outs["a"], _session_run(folder, feeds, "a"))
    for name in ("a", "b"):
        ref = _torch_hidden(base, root / name, feeds)
        assert _cos_min(outs[name], ref) >= (0.99 if mode == "int8" else 0.97)
    # with no adapter the sparse graph is exactly the quantized base (same weights, empty delta)
    if mode == "int4":  # int4 is weight-only: deterministic, so compare with the merged-free base
        base_q = root / "base_int4.onnx"
        if not base_q.exists():
            stripped = _base_onnx(root)
            quantize_onnx_model(stripped, base_q, mode="int4", block_size=32)
        ref = ort.InferenceSession(str(base_q)).run(["last_hidden_state"], feeds)[0]
        np.testing.assert_allclose(outs[None], ref, atol=1e-5)


def _nbits(path) -> dict:
    """MatMulNBits node name -> its `bits` attribute."""
    nodes = onnx.load(str(path)).graph.node
    return {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in nodes if n.op_type == "MatMulNBits"}


def test_int4_fixed_plan_keeps_the_last_two_thirds_of_matmuls_at_8_bits(exports, tmp_path):
    root, base, _ = exports
    report = quantize_onnx_model(root / "merged", tmp_path / "fixed", mode="int4", block_size=32, plan="fixed")
    assert report.options["int8_tail"] == pytest.approx(2 / 3) and report.matmuls_8bit == 8  # ceil(12 * 2/3), no head
    bits = _nbits(tmp_path / "fixed" / "model.onnx")
    eight = sorted(name for name, b in bits.items() if b == 8)
    order = list(bits)  # graph order (the exported graph is topologically sorted): the first four are 4-bit
    assert len(bits) == 12 and len(eight) == 8 and [bits[n] for n in order] == [4] * 4 + [8] * 8
    levels = {
        n.name: [a.i for a in n.attribute if a.name == "accuracy_level"]
        for n in onnx.load(str(tmp_path / "fixed" / "model.onnx")).graph.node
        if n.name in eight
    }
    assert all(v == [4] for v in levels.values())  # the fast int8 kernel (ORT's fallback is 26x slower)
    plain = quantize_onnx_model(
        root / "merged", tmp_path / "all4", mode="int4", block_size=32, plan="fixed", int8_tail=0
    )
    assert plain.matmuls_8bit == 0 and set(_nbits(tmp_path / "all4" / "model.onnx").values()) == {4}
    assert plain.files["model.onnx"]["matmuls"] == [12, 12] == report.files["model.onnx"]["matmuls"]
    assert plain.quantized_bytes < report.quantized_bytes
    feeds = _feeds(tokens=9)
    ref = _torch_hidden(base, root / "a", feeds)
    mixed = ort.InferenceSession(str(tmp_path / "fixed" / "model.onnx")).run(["last_hidden_state"], feeds)[0]
    all4 = ort.InferenceSession(str(tmp_path / "all4" / "model.onnx")).run(["last_hidden_state"], feeds)[0]
    assert _cos_min(mixed, ref) >= 0.97 and _cos_min(all4, ref) >= 0.97
    assert np.abs(mixed - ref).mean() < np.abs(all4 - ref).mean()


def _plan(report, where: str = "model.onnx") -> dict:
    return next(p for p in report.passes[where] if p["pass"] == "plan_bits")


def _worst_on_calibration(fp32_folder, quantized_onnx) -> float:
    """Worst per-token cosine of the real quantized graph (ORT's kernels on this CPU) against
    the fp32 graph, on the measured plan's calibration inputs."""
    from shira_export.export.quantize.calib import calibration_feeds

    model = onnx.load(str(fp32_folder / "model.onnx"))
    ref, cand = (ort.InferenceSession(str(p)) for p in (fp32_folder / "model.onnx", quantized_onnx))
    worst = 1.0
    for feeds, mask in calibration_feeds(model, fp32_folder):
        a, b = ref.run(["last_hidden_state"], feeds)[0], cand.run(["last_hidden_state"], feeds)[0]
        worst = min(worst, _cos_min(a[mask.astype(bool)], b[mask.astype(bool)]))
    return worst


def test_int4_measured_plan_meets_its_target_with_the_real_kernels(exports, tmp_path):
    """The default int4 plan is measured: the chosen 4-bit set's simulated worst cosine is
    >= the target, the graph holds exactly that set at 4 bits, and ORT's own kernels on this
    CPU give (within the 8-bit path's activation rounding) what the simulation said."""
    root, base, reports = exports
    report = reports["merged", "int4"]
    plan = _plan(report)
    measured = plan["measured"]
    assert plan["method"] == "measured" and report.options["plan"] == "measured"
    assert min(measured["chosen_score"].values()) >= measured["target_cosine"] == 0.995  # token states
    bits = {re.sub(r"_Q[48]$", "", n): b for n, b in _nbits(root / "merged_int4" / "model.onnx").items()}
    four = sorted(n for n, b in bits.items() if b == 4)
    assert four == sorted(measured["chosen_4bit"]) and len(four) == plan["matmuls_4bit"] == report.matmuls_4bit
    assert set(measured["sensitivity"]) == set(bits) and len(bits) == 12  # every body MatMul measured (no head here)
    # a layer whose error alone is past the target cannot be in the chosen set
    assert not [n for n in four if measured["sensitivity"][n] < measured["target_cosine"]]
    real = _worst_on_calibration(root / "merged", root / "merged_int4" / "model.onnx")
    assert real == pytest.approx(min(measured["chosen_score"]["cosine"], 1.0), abs=0.004)
    assert real >= measured["target_cosine"] - 0.004
    everything = quantize_onnx_model(root / "merged", tmp_path / "all4", mode="int4", plan="fixed", int8_tail=0)
    assert _worst_on_calibration(root / "merged", tmp_path / "all4" / "model.onnx") == pytest.approx(
        measured["all_4bit_score"]["cosine"], abs=0.004
    )
    assert everything.matmuls_4bit == 12
    # the quality it buys on inputs the plan never saw (held-out seed, PyTorch reference)
    feeds = _feeds(batch=3, tokens=15, seed=7)
    out = ort.InferenceSession(str(root / "merged_int4" / "model.onnx")).run(["last_hidden_state"], feeds)[0]
    assert _cos_min(out, _torch_hidden(base, root / "a", feeds)) >= 0.98


@pytest.mark.parametrize("target, four", [(1.0, 0), (0.05, 12)])
def test_int4_measured_plan_follows_its_target(exports, tmp_path, capsys, target, four):
    """An unreachable target leaves every MatMul at 8 bits and says so; a loose one puts all at 4."""
    root, _, _ = exports
    report = quantize_onnx_model(root / "merged", tmp_path / "q", mode="int4", plan_min_cosine=target)
    assert report.matmuls_4bit == four and report.matmuls_8bit == 12 - four
    err = capsys.readouterr().err
    assert f"int4 plan (measured): {four} of 12 body MatMuls at 4 bits" in err
    assert ("all at 8 bits" in err) is (four == 0)
    assert _plan(report)["weight_fraction_4bit"] == (1.0 if four else 0.0)


def test_int4_plan_falls_back_to_fixed_when_inputs_cannot_be_fed(exports, tmp_path, capsys):
    root, _, _ = exports
    model = onnx.load(str(root / "merged" / "model.onnx"))
    model.graph.input.append(onnx.helper.make_tensor_value_info("pixel_values", onnx.TensorProto.FLOAT, [1, 3]))
    onnx.save(model, str(tmp_path / "odd.onnx"))
    report = quantize_onnx_model(tmp_path / "odd.onnx", tmp_path / "odd_int4.onnx", mode="int4")
    plan = _plan(report, "odd_int4.onnx")
    assert plan["method"] == "fixed" and report.matmuls_8bit == 8  # the fixed plan's ceil(12 * 2/3)
    assert "pixel_values" in plan["measured"]["reason"] and "pixel_values" in capsys.readouterr().err


def test_classifier_score_counts_flipped_labels():
    """Classifier logits are judged by probabilities' cosine and by label agreement over every row."""
    from shira_export.export.quantize.calib import CALIBRATION_TEXTS
    from shira_export.export.quantize.measure import _score
    from shira_export.verify.sentences import SENTENCES

    ref = np.array([[2.0, 0.0, -1.0], [0.0, 0.01, 0.0], [1.0, 3.0, 0.0], [0.5, 0.0, 0.0]])
    cand = ref.copy()
    cand[1, 0] += 0.02  # a near-tie row flips: counted
    score = _score(ref, cand, np.ones((4, 1)))
    assert score["labels"] == 0.75 and score["cosine"] > 0.999
    assert _score(ref, ref + 5.0, np.ones((4, 1))) == {"cosine": pytest.approx(1.0), "labels": 1.0}  # shift-invariant

    def spans(text: str) -> set:  # 4-word spans: no verify sentence, nor a near copy, among the plan's texts
        words = text.lower().split()
        return {" ".join(words[i : i + 4]) for i in range(len(words) - 3)} | {text}

    assert not set().union(*map(spans, CALIBRATION_TEXTS)) & set().union(*map(spans, SENTENCES))


def test_fake_quant_is_what_matmulnbits_computes():
    """The plan's simulation of 4- and 8-bit blocks equals ORT's MatMulNBits on this CPU."""
    from onnx import TensorProto, helper, numpy_helper

    from shira_export.export.quantize.graph import run_nbits
    from shira_export.export.quantize.measure import fake_quant

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((96, 40)) * 0.05).astype(np.float32)
    w[:, 3] = np.abs(w[:, 3])  # a block with no negative value (zero point 0)
    w[:32, 5] = 0  # an all-zero block
    x = rng.standard_normal((5, 96)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 40])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for bits in (4, 8):
        for symmetric in (False, True):
            q, _ = run_nbits(model, ["mm"], bits=bits, block_size=32, symmetric=symmetric, accuracy_level=None)
            y = ort.InferenceSession(q.SerializeToString()).run(None, {"x": x})[0]
            sim = x @ fake_quant(w, bits=bits, block_size=32, symmetric=symmetric)
            assert np.abs(y - sim).max() < 1e-5, (bits, symmetric)
            assert np.abs(y - x @ w).max() > (1e-2 if bits == 4 else 1e-3)  # the rounding is really there


def _base_onnx(root):
    from shira_export.export.manifest import read_sparse_manifest
    from shira_export.export.quant_delta import strip_sparse_deltas

    model = onnx.load(str(root / "sparse" / "model.onnx"))
    strip_sparse_deltas(model, read_sparse_manifest(root / "sparse").targets)
    onnx.save(model, str(root / "base_fp32.onnx"))
    return root / "base_fp32.onnx"


def test_short_and_long_delta_branches_agree(exports):
    """The activation-side delta is exact either way: threshold 0 (dense delta MatMul) and
    a huge threshold (gather/scatter) give the same outputs on the same quantized graph."""
    from shira_export.export.manifest import read_sparse_manifest
    from shira_export.export.quant_delta import attach_quantized_deltas, strip_sparse_deltas
    from shira_export.export.quantize.graph import count_quantizable, run_nbits

    root, _, _ = exports
    targets = read_sparse_manifest(root / "sparse").targets
    model = onnx.load(str(root / "sparse" / "model.onnx"))
    io = strip_sparse_deltas(model, targets)
    quantized, counts = run_nbits(
        model, count_quantizable(model, gemm=False)[0], bits=4, block_size=32, symmetric=False, accuracy_level=None
    )
    assert counts.matmuls_quantized == counts.matmuls_expected == 12 and not counts.missed
    lora = ort.LoraAdapter()
    lora.Load(str(root / "sparse" / "adapters" / "a.onnx_adapter"))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    feeds = _feeds(tokens=9)
    outs = []
    for threshold in (0, 10**6):
        graph = onnx.ModelProto()
        graph.CopyFrom(quantized)
        attach_quantized_deltas(graph, targets, io, threshold=threshold)
        outs.append(ort.InferenceSession(graph.SerializeToString()).run(["last_hidden_state"], feeds, options)[0])
    np.testing.assert_allclose(outs[0], outs[1], atol=2e-5)


def test_cpu_features_and_choices_are_recorded(exports, tmp_path, monkeypatch):
    """The manifest says which CPU the folder was built on and what was chosen for it; the
    dynamic int8 method uses 7-bit weights exactly when the CPU has no VNNI."""
    from shira_export.export.quantize import QuantizeOptions, choose, cpu_features

    root, _, reports = exports
    cpu = cpu_features()
    details = json.loads((root / "merged_int8" / "shira_export.json").read_text())["quantization_details"]
    assert details["choices"]["cpu"]["flags"] == list(cpu.flags) and details["choices"]["cpu"]["vnni"] == cpu.vnni
    assert details["choices"]["accuracy_level_8bit"] == 4 and details["choices"]["table_bits"] == 8
    assert details["options"]["int8_method"] == "blocks" and details["choices"]["reduce_range"] is None
    dynamic = quantize_onnx_model(root / "merged", tmp_path / "dyn", mode="int8", int8_method="dynamic")
    assert dynamic.reduce_range is (not cpu.vnni), dynamic.choices["reasons"]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "dyn" / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops and "MatMulNBits" not in ops
    forced = quantize_onnx_model(
        root / "merged", tmp_path / "rr", mode="int8", int8_method="dynamic", reduce_range=True
    )
    assert forced.reduce_range is True and forced.choices["reasons"]["reduce_range"] == "given"
    for flags, vnni in (("avx2 fma avx512f avx512_vnni", True), ("avx2 fma", False)):  # the other CPU kind
        monkeypatch.setenv("SHIRA_EXPORT_CPU_FLAGS", flags)
        chosen = choose(QuantizeOptions(mode="int8", int8_method="dynamic"))
        assert chosen.cpu.vnni is vnni and chosen.reduce_range is (not vnni)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"mode": "int3"}, "expected one of ['int8', 'int4']"),
        ({"mode": "int4", "block_size": 48}, "block_size: expected one of"),
        ({"mode": "int4", "int8_tail": 1.5}, "int8_tail: expected a fraction in [0, 1]"),
        ({"mode": "int4", "plan": "guess"}, "plan: expected one of ['measured', 'fixed']"),
        ({"mode": "int4", "plan_min_cosine": 1.5}, "plan_min_cosine: expected a cosine in (0, 1]"),
        ({"mode": "int8", "reduce_range": "yes"}, "reduce_range"),
        ({"mode": "int8", "int8_method": "static"}, "int8_method: expected one of ['blocks', 'dynamic']"),
        ({"mode": "int8", "table_bits": 2}, "table_bits"),
        ({"mode": "int8", "blok_size": 32}, "unknown option(s) ['blok_size']"),
    ],
)
def test_bad_options_write_nothing(exports, tmp_path, kwargs, fragment):
    root, _, _ = exports
    with pytest.raises(ShiraInputError, match=re.escape(fragment)):
        quantize_onnx_model(root / "merged", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_already_quantized_and_computed_weights_are_refused(exports, tmp_path):
    root, _, _ = exports
    with pytest.raises(ShiraInputError, match="already quantized"):
        quantize_onnx_model(root / "merged_int8", tmp_path / "again", mode="int4")
    with pytest.raises(ShiraInputError, match="already quantized"):
        quantize_onnx_model(root / "merged_int4" / "model.onnx", tmp_path / "again.onnx", mode="int8")
    # the fp32 sparse graph as a bare file: its ScatterND-into-W branch would stay fp32 silently
    with pytest.raises(ShiraInputError, match="computed in the graph"):
        quantize_onnx_model(root / "sparse" / "model.onnx", tmp_path / "sparse.onnx", mode="int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_cli_merged_quantize_verifies_with_matching_profile(exports, tmp_path, mode):
    from shira_export.cli import main

    root, _, _ = exports
    out = tmp_path / f"q{mode}"
    code = main(
        [
            "merged",
            "--model",
            str(root / "base"),
            "--adapter",
            str(root / "a"),
            "--format",
            "onnx",
            "--task",
            "feature-extraction",
            "--quantize",
            mode,
            "--block-size",
            "32",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    manifest = json.loads((out / "shira_export.json").read_text())
    assert manifest["quantization"] == mode
    parity = json.loads((out / "parity.json").read_text())
    assert parity["profile"]["name"] == mode and parity["verdict"] == "pass"
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert "MatMulNBits" in ops and "GatherBlockQuantized" in ops


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--quantize", "int3"], None),
        (["--quantize", "int4", "--block-size", "48"], "block_size"),
        (["--quantize", "int8", "--dtype", "fp16"], "needs format='onnx' and dtype='fp32'"),
    ],
)
def test_cli_merged_quantize_bad_options_exit_2(exports, tmp_path, capsys, extra, fragment):
    from shira_export.cli import main

    root, _, _ = exports
    out = tmp_path / "bad"
    try:
        code = main(
            [
                "merged",
                "--model",
                str(root / "base"),
                "--adapter",
                str(root / "a"),
                "--format",
                "onnx",
                "--output",
                str(out),
                *extra,
            ]
        )
    except SystemExit as exc:  # argparse rejects a value outside the choices
        code = exc.code
    assert code == 2
    assert not out.exists()
    if fragment:
        assert fragment in capsys.readouterr().err


def test_cli_sparse_quantize_keeps_adapters_exact_and_runs_portable(exports, tmp_path):
    from shira_export.cli import main
    from shira_export.runtime import Mode, ShiraSession

    root, base, _ = exports
    out = tmp_path / "sq"
    code = main(
        [
            "sparse",
            "--model",
            str(root / "base"),
            "--adapter",
            f"a={root / 'a'}",
            "--adapter",
            f"b={root / 'b'}",
            "--task",
            "feature-extraction",
            "--quantize",
            "int8",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    parity = json.loads((out / "parity.json").read_text())
    assert parity["verdict"] == "pass" and parity["profile"]["name"] == "int8"
    assert {r["adapter"] for r in parity["records"]} == {"a", "b", "base"}
    assert not any(r["output"].endswith("@dense") for r in parity["records"])  # no fp32 weights to feed
    session = ShiraSession(out)
    assert session.mode is Mode.LEAN  # the runtime's default (#18): the graph as written, adapter arrays fed
    with pytest.raises(ShiraInputError, match="quantized"):
        ShiraSession(out, mode="dense")
    # the adapter still changes the output, and its file is byte for byte the fp32 export's
    feeds = _feeds()
    with_a = session.run(feeds, adapter="a", output_names=["last_hidden_state"])["last_hidden_state"]
    plain = session.run(feeds, adapter=None, output_names=["last_hidden_state"])["last_hidden_state"]
    assert np.abs(with_a - plain).max() > 1e-3
    assert (out / "adapters" / "a.onnx_adapter").read_bytes() == (
        root / "sparse" / "adapters" / "a.onnx_adapter"
    ).read_bytes()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_causal_lm_leaves_no_fp32_weight_behind(tmp_path, mode):
    """OPT has Gemm layers (fc1/fc2) and a head tied to the embedding table: every weight
    must end up quantized, and the fp32 originals must not stay in the file."""
    from transformers import OPTConfig, OPTForCausalLM

    from shira_export.pipeline import export_merged

    torch.manual_seed(0)  # big enough that weights, not graph structure, make up the file
    base = OPTForCausalLM(
        OPTConfig(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=512,
            vocab_size=2000,
            max_position_embeddings=64,
            word_embed_proj_dim=128,
        )
    ).eval()
    base.save_pretrained(tmp_path / "base")
    get_shira_model(base, ShiraConfig(r=2, init_weights=False)).save_pretrained(tmp_path / "ad")
    export_merged(tmp_path / "base", tmp_path / "ad", tmp_path / "fp32", verify=False)
    report = quantize_onnx_model(tmp_path / "fp32", tmp_path / mode, mode=mode, block_size=32)
    graph = onnx.load(str(tmp_path / mode / "model.onnx")).graph
    big_floats = [
        t.name
        for t in graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
        and int(np.prod(t.dims)) >= 1000
        and not t.name.endswith(("_scale", "_scales"))
    ]  # per-channel scales are fp32 by design
    assert big_floats == []
    quantized, expected = report.files["model.onnx"]["matmuls"]
    assert quantized == expected >= 2 * 6 + 1  # q/k/v/out/fc1/fc2 per layer + the tied head
    heads = [n.name for n in graph.node if n.op_type == "MatMulNBits" and "logits" in n.output]
    bits = _nbits(tmp_path / mode / "model.onnx")
    assert len(heads) == 1 and bits[heads[0]] == 8  # the head (and the table it shares) at 8 bits in both modes
    if mode == "int8":
        assert report.matmuls_8bit == 13
    else:  # the measured plan: what it chose is in the graph, the head at 8 bits beside it
        plan = next(p for p in report.passes["model.onnx"] if p["pass"] == "plan_bits")
        assert plan["method"] == "measured" and plan["heads"] == [re.sub(r"_Q8$", "", heads[0])]
        assert plan["heads"][0] not in plan["measured"]["sensitivity"]
        assert report.matmuls_8bit == plan["matmuls_8bit"] == 13 - plan["matmuls_4bit"]
        assert min(plan["measured"]["chosen_score"].values()) >= 0.99
    # the tied head and the embedding lookup share one quantized table
    assert report.tied_tables_shared == 1
    # 8-bit blocks of 32: 8 + 1 (fp32 scale) + 0.25 (zero point) bits a weight (0.29x), plus the graph itself, which
    # weighs on a 0.5M-parameter model (0.307 with optimum's graph, 0.345 with the torch exporter's); int4: 2/3 at 8
    assert report.size_ratio < (0.36 if mode == "int8" else 0.35), report.size_ratio
