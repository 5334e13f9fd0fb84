"""`shira-export verify` must catch broken exports: each test breaks a real export on purpose
and expects exit code 1 with the failure named in the reports."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from shira_export.cli import main as cli_main
from tiny_models import VOCAB, tiny_opt
from verify_helpers import export_merged_onnx, make_adapter, write_manifest

TASK = "text-generation-with-past"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Tiny OPT base + adapter + merged ONNX export that passes verification."""
    root = tmp_path_factory.mktemp("catches")
    tiny_opt().save_pretrained(root / "base")
    merged = make_adapter(tiny_opt, root / "adapter", targets=["q_proj", "v_proj"], seed=1)
    export_merged_onnx(merged, root / "merged_hf", root / "onnx", task=TASK, source=root / "adapter")
    return root


def _verify(root, candidate, tmp_path, *extra: str) -> tuple[int, dict, ET.Element]:
    rc = cli_main(
        [
            "verify",
            "--model",
            str(root / "base"),
            "--candidate",
            str(candidate),
            "--quiet",
            "--report-dir",
            str(tmp_path),
            "--junit",
            str(tmp_path / "junit.xml"),
            "--markdown",
            str(tmp_path / "summary.md"),
            *extra,
        ]
    )
    report = json.loads((tmp_path / "parity.json").read_text())
    return rc, report, ET.parse(tmp_path / "junit.xml").getroot()


def _failed(report: dict) -> set[tuple[str, str, str]]:
    return {(r["adapter"], r["output"], r["metric"]) for r in report["records"] if r["passed"] is False}


def _copy(good, tmp_path, name):
    out = tmp_path / name
    shutil.copytree(good / "onnx", out)
    return out


def _weight_initializer(good, model: onnx.ModelProto, parameter: str, *, transposed: bool = True):
    """The initializer holding `parameter` of the merged model, found by content (W^T for a
    MatMul): exporters name initializers differently."""
    from safetensors.torch import load_file

    want = load_file(good / "merged_hf" / "model.safetensors")[parameter].numpy()
    want = want.T if transposed else want
    for init in model.graph.initializer:
        if tuple(init.dims) == want.shape and np.array_equal(numpy_helper.to_array(init), want):
            return init
    raise AssertionError(f"{parameter} not found in the graph")


def test_the_unbroken_export_passes(good, tmp_path):
    rc, report, junit = _verify(good, good / "onnx", tmp_path)
    assert rc == 0 and report["verdict"] == "pass" and junit.get("failures") == "0"


def test_one_weight_perturbed_by_1e_2(good, tmp_path):
    cand = _copy(good, tmp_path, "perturbed")
    model = onnx.load(cand / "model.onnx")
    init = _weight_initializer(good, model, "model.decoder.layers.1.self_attn.v_proj.weight")
    weight = numpy_helper.to_array(init).copy()
    weight[3, 5] += 1e-2
    init.CopyFrom(numpy_helper.from_array(weight, init.name))
    onnx.save(model, cand / "model.onnx")

    rc, report, junit = _verify(good, cand, tmp_path)
    assert rc == 1 and report["verdict"] == "fail"
    assert ("default", "logits", "max_abs") in _failed(report)
    rec = next(r for r in report["records"] if r["metric"] == "max_abs")
    assert 1e-4 < rec["value"] < 1e-1  # one weight moved: a small but real miss
    failure = junit.find(".//testcase[@name='max_abs']/failure")
    assert failure is not None and "rule <= 1.000e-04" in failure.get("message")


def test_nan_injected_into_logits(good, tmp_path):
    cand = _copy(good, tmp_path, "nan")
    model = onnx.load(cand / "model.onnx")
    for node in model.graph.node:
        node.output[:] = ["logits_clean" if o == "logits" else o for o in node.output]
    bias = np.zeros(VOCAB, np.float32)
    bias[7] = np.nan  # one vocabulary entry turns NaN at every position
    model.graph.initializer.append(numpy_helper.from_array(bias, "nan_bias"))
    model.graph.node.append(helper.make_node("Add", ["logits_clean", "nan_bias"], ["logits"], name="inject_nan"))
    onnx.checker.check_model(model)
    onnx.save(model, cand / "model.onnx")

    rc, report, _ = _verify(good, cand, tmp_path)
    assert rc == 1
    assert ("default", "logits", "nan_count") in _failed(report)
    rec = next(r for r in report["records"] if r["metric"] == "nan_count")
    compared = [i for i in report["inputs"] if i.get("used_for") != "generate"]  # padded positions are not compared
    positions = sum(sum(i["lengths"]) if "lengths" in i else i["shape"][0] * i["shape"][1] for i in compared)
    assert rec["value"] == positions  # exactly one NaN per position
    assert "Failures" in (tmp_path / "summary.md").read_text()


def test_graph_with_a_shape_frozen_by_tracing(good, tmp_path):
    """`torch.onnx.export(dynamo=False)` traced at 1 x 16 tokens with the sequence axis left
    static: it runs only at the traced shape, which verify never uses."""
    cand = tmp_path / "traced"
    cand.mkdir()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(good / "merged_hf").eval()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Logits(model).eval(),
            (ids, torch.ones_like(ids)),
            cand / "model.onnx",
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}},
            opset_version=17,
        )
    model.config.save_pretrained(cand)
    write_manifest(cand, task="text-generation", source=good / "adapter")

    rc, report, junit = _verify(good, cand, tmp_path)
    assert rc == 1
    assert ("default", "(run)", "run_errors") in _failed(report)
    rec = next(r for r in report["records"] if r["metric"] == "run_errors")
    assert rec["value"] == len(report["inputs"])  # no untraced shape runs
    assert "seeded-1x1" in rec["message"] and "Expected: 16" in rec["message"]
    assert len(rec["details"]["errors"]) == len(report["inputs"])
    assert junit.find(".//testcase[@name='run_errors']/failure") is not None


def test_adapter_file_swapped_for_another_adapters(tmp_path):
    """Sparse export of two adapters; b's .onnx_adapter replaced by a's."""
    from shira_export.pipeline import export_sparse

    tiny_opt().save_pretrained(tmp_path / "base")
    make_adapter(tiny_opt, tmp_path / "a", targets=["q_proj", "v_proj"], seed=1)
    make_adapter(tiny_opt, tmp_path / "b", targets=["q_proj", "v_proj"], seed=2)
    out = tmp_path / "sparse"
    export_sparse(tmp_path / "base", {"a": tmp_path / "a", "b": tmp_path / "b"}, out, verify=False)
    reports = tmp_path / "reports"
    reports.mkdir()

    rc, report, _ = _verify(tmp_path, out, reports)
    assert rc == 0, _failed(report)
    assert [a["name"] for a in report["adapters"]] == ["a", "b", "base"]
    assert {r["output"] for r in report["records"]} >= {"logits", "logits@lean", "generate", "generate@lean"}

    manifest = json.loads((out / "shira_export.json").read_text())
    shutil.copy(out / manifest["adapters"]["a"]["file"], out / manifest["adapters"]["b"]["file"])
    # a consistent but wrong folder: the manifest's digest updated too (else loading refuses b outright)
    manifest["adapters"]["b"]["sha256"] = hashlib.sha256(
        (out / manifest["adapters"]["b"]["file"]).read_bytes()
    ).hexdigest()
    (out / "shira_export.json").write_text(json.dumps(manifest, indent=2))
    rc, report, _ = _verify(tmp_path, out, reports)
    assert rc == 1
    failed = _failed(report)
    assert {a for a, _, _ in failed} == {"b"}  # a and the base model still pass
    assert {("b", "logits", "max_abs"), ("b", "logits@lean", "max_abs"), ("b", "generate", "greedy_prefix")} <= failed


def test_a_model_file_that_does_not_load_is_a_failure_not_a_crash(good, tmp_path):
    cand = _copy(good, tmp_path, "corrupt")
    (cand / "model.onnx").write_bytes(b"not an onnx model")
    rc, report, _ = _verify(good, cand, tmp_path)
    assert rc == 1
    assert _failed(report) == {("default", "(run)", "run_errors")}
    assert "candidate failed to load" in next(r["message"] for r in report["records"] if r["passed"] is False)


def test_position_embeddings_corrupted_past_40_fail_by_default(good, tmp_path):
    """Rows 40+ of the position table overwritten: verify's default inputs (a long batch,
    padded batches, the built-in sentences) reach those positions (issue 16 item 7)."""
    cand = _copy(good, tmp_path, "positions")
    model = onnx.load(cand / "model.onnx")
    init = _weight_initializer(good, model, "model.decoder.embed_positions.weight", transposed=False)
    table = numpy_helper.to_array(init).copy()
    table[40 + 2 :] = np.random.default_rng(0).standard_normal(table[42:].shape).astype(np.float32)  # OPT offset 2
    init.CopyFrom(numpy_helper.from_array(table, init.name))
    onnx.save(model, cand / "model.onnx")
    rc, report, _ = _verify(good, cand, tmp_path)
    assert rc == 1
    assert ("default", "logits", "max_abs") in _failed(report)
    rec = next(r for r in report["records"] if r["metric"] == "max_abs")
    worst = rec["details"]["worst"]
    assert worst["index"][1] >= 40  # the worst position is past the corrupted row


@pytest.fixture(scope="module")
def quantized(good, tmp_path_factory):
    from shira_export.export.quantize import quantize_onnx_model

    out = tmp_path_factory.mktemp("q") / "int8"
    quantize_onnx_model(good / "onnx", out, mode="int8")
    return out


def test_the_quantized_export_passes_its_own_profile(good, quantized, tmp_path):
    rc, report, _ = _verify(good, quantized, tmp_path)  # no --profile: the manifest says int8
    assert rc == 0 and report["profile"]["name"] == "int8", _failed(report)


@pytest.mark.parametrize("what", ["scale", "zero_point"])
def test_one_wrong_scale_or_zero_point_fails(good, quantized, tmp_path, what):
    """One block's scale x4, or one block's zero point moved by 64 steps, in one MatMulNBits."""
    cand = tmp_path / "broken"
    shutil.copytree(quantized, cand)
    model = onnx.load(cand / "model.onnx")
    # by op type, not by name: the first MatMulNBits (layer 0), and for the zero point one reading a ReLU's
    # output (a zero point error is multiplied by the block's activation sum, ~0 after a LayerNorm)
    producers = {o: n for n in model.graph.node for o in n.output}
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    node = nbits[0] if what == "scale" else next(n for n in nbits if producers[n.input[0]].op_type == "Relu")
    name = node.input[2] if what == "scale" else node.input[3]
    init = next(t for t in model.graph.initializer if t.name == name)
    values = numpy_helper.to_array(init).copy()
    flat = values.reshape(-1)
    if what == "scale":
        flat[5] *= 4.0
    else:
        flat[5] = (int(flat[5]) + 64) % 256
    init.CopyFrom(numpy_helper.from_array(values, name))
    onnx.save(model, cand / "model.onnx")
    rc, report, _ = _verify(good, cand, tmp_path)
    assert rc == 1, report["records"]
    assert {m for _, o, m in _failed(report) if o == "logits"} & {"cosine", "top1_agreement"}
