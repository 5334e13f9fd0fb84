"""shira_export.verify: metrics, profiles, manifests, reports, the API and the CLI on tiny exports."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from shira_export.cli import main as cli_main
from shira_export.errors import ParityFailure, ShiraInputError
from shira_export.verify import REPORT_NAME, SCHEMA, SCHEMA_VERSION, get_profile, verify
from shira_export.verify.candidates import read_manifest
from shira_export.verify.inputs import read_texts, seeded_batches
from shira_export.verify.metrics import ArgmaxKind, OutputDiff, greedy_prefix_lengths
from shira_export.verify.profiles import parse_overrides
from tiny_models import tiny_bert, tiny_bert_cls, tiny_opt
from verify_helpers import export_merged_onnx, make_adapter, save_word_tokenizer, write_manifest

# ---------------------------------------------------------------- metrics and profiles


def test_output_diff_numbers():
    ref = np.arange(24, dtype=np.float32).reshape(1, 4, 6)
    cand = ref.copy()
    cand[0, 2, 3] += 0.5  # the worst element
    cand[0, 1, 0] += 0.1
    cand[0, 3] = -cand[0, 3]  # flips the argmax and the cosine of row 3
    d = OutputDiff("logits", ArgmaxKind.TOP1)
    d.add("a", ref, cand)
    m = d.metrics()
    assert m["max_abs"] == pytest.approx(2 * 23)
    assert m["top1_agreement"] == pytest.approx(3 / 4)
    assert m["cosine"] == pytest.approx(-1.0)
    assert m["nan_count"] == 0 and m["inf_count"] == 0
    diffs = np.abs(cand - ref).ravel()
    assert m["p90_abs"] == pytest.approx(np.percentile(diffs, 90), rel=1e-6)
    assert m["mean_abs"] == pytest.approx(diffs.mean(), rel=1e-6)
    assert d.details()["worst"]["index"] == [0, 3, 5]


def test_output_diff_counts_nan_and_inf_apart_from_the_finite_metrics():
    ref = np.ones((2, 3, 5), np.float32)
    cand = ref.copy()
    cand[0, 0, 0], cand[1, 2, 4] = np.nan, np.inf
    d = OutputDiff("logits")
    d.add("a", ref, cand)
    m = d.metrics()
    assert (m["nan_count"], m["inf_count"]) == (1, 1)
    assert m["max_abs"] == 0.0  # finite pairs agree exactly
    assert np.isnan(m["cosine"])  # rows holding NaN/Inf have no cosine


def test_greedy_prefix_lengths():
    ref = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    cand = np.array([[1, 2, 9, 4], [5, 6, 7, 8]])
    assert greedy_prefix_lengths(ref, cand) == [2, 4]


def test_profiles_and_overrides():
    assert get_profile("fp32").atol == 1e-4 and get_profile("fp32").min_greedy == 1.0
    assert get_profile("int8").atol is None and get_profile("int8").min_top1 == 0.9
    p = get_profile("fp32", parse_overrides(["atol=1e-3", "min_greedy=none", "greedy_tokens=4"]))
    assert (p.atol, p.min_greedy, p.greedy_tokens) == (1e-3, None, 4)
    with pytest.raises(ShiraInputError, match="unknown setting.*'atl'"):
        get_profile("fp32", {"atl": "1"})
    with pytest.raises(ShiraInputError, match="expected NAME=VALUE"):
        parse_overrides(["atol"])
    with pytest.raises(ShiraInputError, match="greedy_tokens: expected a positive integer"):
        get_profile("fp32", {"greedy_tokens": "2.5"})
    with pytest.raises(ShiraInputError, match="profile: expected one of"):
        get_profile("bf16")


def test_seeded_batches_avoid_the_traced_shape_and_repeat():
    a, b = seeded_batches(100, seed=3), seeded_batches(100, seed=3)
    shapes = [x.shape for x in a]
    assert [1, 1] in shapes and any(s[0] == 3 for s in shapes) and [2, 16] not in shapes
    assert all((x.input_ids == y.input_ids).all() for x, y in zip(a, b))
    assert all(x.shape[1] <= 5 for x in seeded_batches(100, max_length=5))


def test_read_texts_txt_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("w1 w2\n\nw3\n")
    (tmp_path / "p.jsonl").write_text('{"text": "w4 w5"}\n"w6"\n')
    assert read_texts(tmp_path / "p.txt") == ["w1 w2", "w3"]
    assert read_texts(tmp_path / "p.jsonl") == ["w4 w5", "w6"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": 1}\n')
    with pytest.raises(ShiraInputError, match=r"bad.jsonl:1: expected a string"):
        read_texts(tmp_path / "bad.jsonl")


def test_manifest_errors_name_file_and_key(tmp_path):
    with pytest.raises(ShiraInputError, match="shira_export.json: manifest not found"):
        read_manifest(tmp_path)
    write_manifest(tmp_path, task="text-generation-with-past", fmt="tflite")
    with pytest.raises(ShiraInputError, match="key 'format' expected 'onnx' or 'safetensors', found 'tflite'"):
        read_manifest(tmp_path)
    write_manifest(tmp_path, task="translation")
    with pytest.raises(ShiraInputError, match="key 'task'.*found 'translation'"):
        read_manifest(tmp_path)


# ---------------------------------------------------------------- end to end on real exports


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    """Tiny OPT base (with a tokenizer) + one adapter + its merged optimum ONNX export."""
    root = tmp_path_factory.mktemp("verify_opt")
    tiny_opt().save_pretrained(root / "base")
    save_word_tokenizer(root / "base")
    merged = make_adapter(tiny_opt, root / "adapter", targets=["q_proj", "v_proj"], seed=1)
    export_merged_onnx(
        merged, root / "merged_hf", root / "onnx", task="text-generation-with-past", source=root / "adapter"
    )
    return root


@pytest.fixture(scope="module")
def opt_report(opt):
    return verify(
        model=opt / "base",
        candidate=opt / "onnx",
        report_dir=opt / "reports",
        junit=opt / "reports/junit.xml",
        markdown=opt / "reports/summary.md",
        progress=False,
    )


def test_merged_onnx_passes_with_real_numbers(opt_report):
    r = opt_report
    assert r.passed, r.to_markdown()
    by = {(x.output, x.metric): x for x in r.records}
    assert by[("logits", "max_abs")].value < 1e-5
    assert by[("logits", "cosine")].value > 0.99999
    assert by[("logits", "top1_agreement")].value == 1.0
    assert by[("generate", "greedy_prefix")].value == 1.0
    assert by[("generate", "greedy_prefix")].details["prefix_lengths"]["seeded-3x7"] == [32, 32, 32]  # export's 32
    assert by[("logits", "max_abs")].threshold == 1e-4 and by[("logits", "max_abs")].passed
    assert by[("logits", "p50_abs")].passed is None  # reported, not judged, in fp32
    shapes = {i["name"]: tuple(i["shape"]) for i in r.inputs}
    assert {shapes[f"seeded-{b}x{n}"] for b, n in ((1, 1), (1, 11), (3, 7), (3, 21))} == {
        (1, 1),
        (1, 11),
        (3, 7),
        (3, 21),
    }
    assert shapes["seeded-2x94"] == (2, 94)  # long: 128 positions - 32 greedy tokens - 2
    padded = {i["name"]: i for i in r.inputs if "lengths" in i}
    assert padded["padded-3x17"]["lengths"] == [17, 9, 2] and padded["padded-3x17-left"]["used_for"] == "generate"
    sentences = [i for i in r.inputs if i["source"] == "builtin sentences" and i.get("used_for") == "forward"]
    assert sum(len(i["lengths"]) for i in sentences) == 48  # the tokenizer in the base folder encodes them all
    r.raise_for_failures()  # no-op on a pass


def test_json_report_schema(opt, opt_report):
    data = json.loads((opt / "reports" / REPORT_NAME).read_text())
    assert (data["schema"], data["schema_version"], data["verdict"]) == (SCHEMA, SCHEMA_VERSION, "pass")
    assert data["adapters"] == [{"name": "default", "source": str(opt / "adapter")}]
    assert data["environment"]["onnxruntime"] and data["environment"]["torch"]
    assert data["summary"]["failed"] == 0 and data["summary"]["checks"] >= 6
    rec = next(x for x in data["records"] if x["metric"] == "max_abs")
    assert set(rec) >= {
        "adapter",
        "output",
        "metric",
        "value",
        "threshold",
        "op",
        "passed",
        "message",
        "inputs",
        "details",
    }
    assert len(data["records"]) == len(opt_report.records)


def test_junit_and_markdown(opt, opt_report):
    root = ET.parse(opt / "reports" / "junit.xml").getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == len(opt_report.records) and root.get("failures") == "0"
    assert {c.get("name") for c in cases} >= {"max_abs", "greedy_prefix", "nan_count", "run_errors"}
    md = (opt / "reports" / "summary.md").read_text()
    assert md.startswith("## shira-export verify: PASS") and "### Adapter `default`: pass" in md
    assert "| output | run_errors | shape_mismatch | max_abs |" in md and "Failures" not in md
    assert "| logits | " in md and "| generate | " in md


def test_override_turns_a_pass_into_a_failure_with_a_useful_message(opt, opt_report):
    r = verify(
        model=opt / "base", candidate=opt / "onnx", overrides={"atol": 1e-12, "greedy_tokens": 2}, progress=False
    )
    assert not r.passed
    (fail,) = r.failures
    assert (fail.output, fail.metric) == ("logits", "max_abs")
    assert "rule <= 1.000e-12" in fail.message and "worst at input" in fail.message
    with pytest.raises(ParityFailure, match="max_abs") as info:
        r.raise_for_failures()
    assert info.value.report is r
    md = r.to_markdown()
    assert md.index("### Failures") < md.index("### Adapter")
    assert "| **logits** |" in md and "**FAIL " in md
    junit = ET.fromstring(r.to_junit())
    (failure,) = junit.findall(".//failure")
    assert "missed by" in failure.get("message") and "max_abs per input" in failure.text


def test_user_inputs_file_and_plot(opt, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w9 w13\nw100 w7 w7 w7 w2\n")
    import shira_export.verify.plot as plot

    r = verify(
        model=opt / "base",
        candidate=opt / "onnx",
        inputs=prompts,
        report_dir=tmp_path,
        overrides={"greedy_tokens": 3},
        progress=False,
        plot=True,
    )
    assert r.passed
    assert [i["shape"] for i in r.inputs if i["name"].startswith("text-")] == [[1, 3], [1, 5]]
    if plot.have_matplotlib():  # the `plot` extra; without it nothing is written and nothing fails
        assert (tmp_path / "parity_hist_default.png").stat().st_size > 1000
    else:
        assert not list(tmp_path.glob("*.png"))

    monkeypatch.setattr(plot, "have_matplotlib", lambda: False)
    assert plot.write_histograms(r, tmp_path / "none") == []


def test_cli_exit_codes(opt, tmp_path, capsys):
    assert (
        cli_main(
            [
                "verify",
                "--model",
                str(opt / "base"),
                "--candidate",
                str(opt / "onnx"),
                "--quiet",
                "--set",
                "greedy_tokens=2",
                "--junit",
                str(tmp_path / "j.xml"),
            ]
        )
        == 0
    )
    assert json.loads((opt / "onnx" / REPORT_NAME).read_text())["verdict"] == "pass"  # default report dir
    assert (
        cli_main(
            [
                "verify",
                "--model",
                str(opt / "base"),
                "--candidate",
                str(opt / "onnx"),
                "--quiet",
                "--set",
                "atol=1e-12",
                "--set",
                "greedy_tokens=2",
                "--report-dir",
                str(tmp_path),
            ]
        )
        == 1
    )
    assert "FAIL" in capsys.readouterr().out
    assert cli_main(["verify", "--model", str(opt / "base"), "--candidate", str(tmp_path / "nope")]) == 2
    assert cli_main(["verify", "--model", str(opt / "base"), "--candidate", str(opt / "onnx"), "--set", "atl=1"]) == 2


def test_adapter_flag_overrides_the_manifest_source(opt, tmp_path):
    """Verifying against another adapter than the one exported must fail."""
    make_adapter(tiny_opt, tmp_path / "other", targets=["q_proj", "v_proj"], seed=7)
    r = verify(
        model=opt / "base",
        adapters=[tmp_path / "other"],
        candidate=opt / "onnx",
        overrides={"greedy_tokens": 2},
        progress=False,
    )
    assert not r.passed and r.adapters[0]["source"] == str(tmp_path / "other")
    assert any(f.metric == "max_abs" for f in r.failures)


# ---------------------------------------------------------------- encoders and classifiers


def test_bert_feature_extraction_onnx(tmp_path):
    tiny_bert().save_pretrained(tmp_path / "base")
    merged = make_adapter(tiny_bert, tmp_path / "adapter", targets=["query", "value"], seed=2)
    export_merged_onnx(
        merged, tmp_path / "hf", tmp_path / "onnx", task="feature-extraction", source=tmp_path / "adapter"
    )
    r = verify(model=tmp_path / "base", candidate=tmp_path / "onnx", progress=False)
    assert r.passed, r.to_markdown()
    by = {(x.output, x.metric): x for x in r.records}
    assert by[("last_hidden_state", "max_abs")].value < 1e-5
    assert ("generate", "greedy_prefix") not in by


def test_bert_classifier_safetensors_label_agreement(tmp_path):
    tiny_bert_cls().save_pretrained(tmp_path / "base")
    merged = make_adapter(tiny_bert_cls, tmp_path / "adapter", targets=["query", "value"], seed=3)
    merged.save_pretrained(tmp_path / "cand")
    write_manifest(tmp_path / "cand", task="text-classification", fmt="safetensors", source=tmp_path / "adapter")
    r = verify(model=tmp_path / "base", candidate=tmp_path / "cand", progress=False)
    assert r.passed, r.to_markdown()
    by = {(x.output, x.metric): x for x in r.records}
    assert by[("logits", "label_agreement")].value == 1.0 and by[("logits", "label_agreement")].passed
    assert by[("logits", "max_abs")].value < 1e-5
    # the base model without the adapter must not pass as the merged one
    write_manifest(tmp_path / "cand", task="text-classification", fmt="safetensors", name=None)
    assert not verify(model=tmp_path / "base", candidate=tmp_path / "cand", progress=False).passed


# ---------------------------------------------------------------- precision profiles


def test_fp16_export_passes_fp16_and_fails_fp32(opt, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(opt / "merged_hf").to(torch.float16).save_pretrained(tmp_path / "fp16")
    write_manifest(
        tmp_path / "fp16", task="text-generation-with-past", fmt="safetensors", source=opt / "adapter", dtype="fp16"
    )
    kwargs = dict(model=opt / "base", candidate=tmp_path / "fp16", progress=False)
    r16 = verify(profile="fp16", **kwargs)
    assert r16.passed, r16.to_markdown()
    max_abs = next(x.value for x in r16.records if x.metric == "max_abs")
    assert 1e-4 < max_abs < 1e-2  # real fp16 rounding, far inside fp16's atol
    r32 = verify(profile="fp32", **kwargs)
    assert [(f.metric, f.value) for f in r32.failures] == [("max_abs", max_abs)]


def test_int8_quantization_judged_by_agreement(opt, tmp_path):
    from shira_export.export.quantize import quantize_onnx_model

    cand = tmp_path / "int8"
    quantize_onnx_model(opt / "onnx", cand, mode="int8")
    r = verify(model=opt / "base", candidate=cand, progress=False)  # the profile from the manifest: int8
    assert r.profile["name"] == "int8" and r.profile["greedy_tokens"] == 32
    assert r.passed, r.to_markdown()
    by = {x.metric: x for x in r.records}
    assert by["max_abs"].value > 1e-3 and by["max_abs"].passed is None  # large, and not judged in int8
    assert by["cosine"].value > 0.99 and by["top1_agreement"].value >= 0.9
    assert by["greedy_prefix_mean"].passed and 0 < by["greedy_prefix_mean"].value <= 1
    assert not verify(model=opt / "base", candidate=cand, profile="fp32", progress=False).passed


def test_classifier_adapter_with_its_own_label_count(tmp_path):
    """Base config has 2 labels; the adapter saved a fresh 3-label head (modules_to_save)."""
    tiny_bert_cls(num_labels=2).save_pretrained(tmp_path / "base")
    merged = make_adapter(
        lambda: tiny_bert_cls(num_labels=3),
        tmp_path / "adapter",
        targets=["query", "value"],
        seed=4,
        modules_to_save=["classifier"],
    )
    merged.save_pretrained(tmp_path / "cand")
    write_manifest(tmp_path / "cand", task="text-classification", fmt="safetensors", source=tmp_path / "adapter")
    r = verify(model=tmp_path / "base", candidate=tmp_path / "cand", progress=False)
    assert r.passed, r.to_markdown()
    assert next(x for x in r.records if x.metric == "max_abs").value < 1e-5
