"""Sparse-delta export: parity per adapter on tiny OPT / Llama / GPT-2 (Conv1D) / BERT,
the plain-onnxruntime recipe, adapter files, `add_adapter_file`, bad input, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sparse_models import make_adapter, make_adapters, make_base  # noqa: E402

from shira_export.errors import ShiraInputError  # noqa: E402
from shira_export.export.adapter_file import read_adapter_file  # noqa: E402
from shira_export.export.manifest import read_sparse_manifest  # noqa: E402
from shira_export.export.sparse import add_adapter_file  # noqa: E402
from shira_export.export.site_layout import MAX_BYTES_PER_NONZERO  # noqa: E402
from shira_export.pipeline import export_sparse  # noqa: E402
from shira_export.verify.reference import merged_reference  # noqa: E402

ARCHS = ["opt", "llama", "gpt2", "bert"]


@pytest.fixture(scope="module", params=ARCHS)
def exported(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    base = make_base(arch, root)
    adapters = make_adapters(arch, base, root)
    result = export_sparse(base, adapters, root / "out")
    return arch, root, base, adapters, result


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    root = tmp_path_factory.mktemp("opt_bad")
    base = make_base("opt", root)
    adapters = make_adapters("opt", base, root)
    return root, base, adapters, export_sparse(base, adapters, root / "out", verify=False)


def _base_model(arch, base):
    import transformers as tf

    cls = tf.AutoModel if arch == "bert" else tf.AutoModelForCausalLM
    return cls.from_pretrained(base).eval()


def _feeds(session, ids):
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in session.get_inputs():
        if i.name == "position_ids":
            feeds[i.name] = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
        elif i.name == "token_type_ids":
            feeds[i.name] = np.zeros_like(ids)
        elif i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), np.float32)
    return feeds


def test_parity_report_every_adapter_and_base(exported):
    arch, _, _, adapters, result = exported
    report = json.loads(result.parity_path.read_text())
    assert report["verdict"] == "pass" and result.report.passed
    records = report["records"]
    checked = {(r["adapter"], r["output"]) for r in records if r["metric"] == "max_abs"}
    main = "logits" if arch != "bert" else "last_hidden_state"
    assert checked == {(a, main + v) for a in ["base", *adapters] for v in ("", "@lean")}
    assert max(r["value"] for r in records if r["metric"] == "max_abs") <= 1e-4
    shapes = {tuple(i["shape"]) for i in report["inputs"]}
    assert {(1, 1), (1, 11), (3, 7), (3, 21)} <= shapes  # batch 1 and 3, odd lengths, one token; both branches
    greedy = [r for r in records if r["metric"] == "greedy_prefix"]
    assert (len(greedy) > 0) == (arch != "bert") and all(r["value"] == 1.0 for r in greedy)
    assert all(r["details"]["greedy_tokens"] == 32 for r in greedy)


def test_plain_onnxruntime_recipe_matches_pytorch(exported):
    """What a C#/Java/C++/JS user runs: LoraAdapter().Load + RunOptions.add_active_adapter."""
    arch, _, base, adapters, result = exported
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    base_model = _base_model(arch, base)
    ids = np.random.default_rng(1).integers(0, 100, (2, 13), dtype=np.int64)
    out_name = session.get_outputs()[0].name
    for name in [None, *adapters]:
        options = ort.RunOptions()
        if name is not None:
            adapter = ort.LoraAdapter()
            adapter.Load(str(result.adapter_paths[name]))
            options.add_active_adapter(adapter)
        got = session.run([out_name], _feeds(session, ids), options)[0]
        ref_model = merged_reference(base_model, None if name is None else adapters[name])
        with torch.no_grad():
            ref = getattr(ref_model(input_ids=torch.from_numpy(ids)), out_name)
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-4, rtol=0)
    if arch != "bert":  # the delta is not a no-op: adapter outputs differ from the base
        plain = session.run([out_name], _feeds(session, ids))[0]
        assert np.abs(got - plain).max() > 1e-3


def test_adapter_files_and_manifest(exported):
    arch, _, _, adapters, result = exported
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["schema"] == 1 and manifest["kind"] == "sparse"
    assert len(manifest["base_fingerprint"]) == 64
    parsed = read_sparse_manifest(result.output_dir)
    for name in adapters:
        entry = manifest["adapters"][name]
        assert entry["file"] == f"adapters/{name}.onnx_adapter"
        params = ort.AdapterFormat.read_adapter(str(result.output_dir / entry["file"])).get_parameters()
        # both parts (export.site_layout): ELL slots (padding included) + scattered entries
        stored = sum(v.numpy().size for k, v in params.items() if k.endswith("values"))
        assert entry["nnz"] > 0 and entry["nnz"] <= stored <= MAX_BYTES_PER_NONZERO / 8 * entry["nnz"]
        assert {v.numpy().dtype for k, v in params.items() if k.endswith("indices")} == {np.dtype(np.int32)}
        # 8 bytes per slot or entry + a fixed ~100-byte header + the parameter names
        size = (result.output_dir / entry["file"]).stat().st_size
        assert size <= 8 * stored + 128 + sum(2 * len(k) + 64 for k in params)
        arrays = read_adapter_file(
            result.output_dir / entry["file"], parsed.targets, fingerprint=parsed.base_fingerprint
        )
        assert arrays.nnz == entry["nnz"]
    modules = {t["module"] for t in manifest["targets"]} | set(manifest["unused_targets"])
    assert modules == set(result.targets)


def test_add_adapter_file_without_reexport(opt):
    root, base, adapters, result = opt
    new_dir = make_adapter("opt", base, root, "c", seed=7, r=3, target_modules=["v_proj", "fc1"])
    before = {p.name: p.read_bytes() for p in (result.output_dir / "adapters").iterdir()}
    path = add_adapter_file(result.output_dir, new_dir, name="c")
    assert path == result.output_dir / "adapters" / "c.onnx_adapter"
    assert {p.name: p.read_bytes() for p in (result.output_dir / "adapters").iterdir() if p.name != path.name} == before
    manifest = read_sparse_manifest(result.output_dir)
    assert set(manifest.adapters) == {"a", "b", "c"}
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    lora = ort.LoraAdapter()
    lora.Load(str(path))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    ids = np.random.default_rng(2).integers(0, 100, (1, 9), dtype=np.int64)
    got = session.run(["logits"], _feeds(session, ids), options)[0]
    ref = merged_reference(_base_model("opt", base), new_dir)(input_ids=torch.from_numpy(ids)).logits
    np.testing.assert_allclose(got, ref.detach().numpy(), atol=1e-4, rtol=0)
    with pytest.raises(ShiraInputError, match="exists"):
        add_adapter_file(result.output_dir, new_dir, name="c")


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_input_leaves_folder_untouched(opt, tmp_path):
    root, base, adapters, result = opt
    out = result.output_dir
    before = _snapshot(out)
    outside = sorted(p.name for p in out.parent.iterdir())
    # a name that would escape OUT_DIR/adapters/
    for bad in ("../x", "a/b", ".hidden", "..", "x" * 101):
        with pytest.raises(ShiraInputError, match="adapter name"):
            add_adapter_file(out, adapters["a"], name=bad)
    # a module the graph has no site for (k_proj of layer 1 is targeted by b; fc2 by nobody)
    other = make_adapter("opt", base, tmp_path, "fc2", seed=3, r=2, target_modules=["fc2"])
    with pytest.raises(ShiraInputError, match="no sparse-delta site"):
        add_adapter_file(out, other, name="fc2")
    # indices out of range: an adapter for a wider model
    from shira_export.tuner.checkpoint import read_adapter_dir, write_adapter_dir

    ckpt = read_adapter_dir(adapters["a"])
    module = next(iter(ckpt.deltas))
    ckpt.deltas[module].indices[1, -1] = 10_000
    bad_dir = write_adapter_dir(ckpt, tmp_path / "wide")
    with pytest.raises(ShiraInputError):
        add_adapter_file(out, bad_dir, name="wide")
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == outside


def test_runtime_refuses_foreign_corrupt_and_out_of_range_files(opt, tmp_path):
    from shira_export.export.adapter_file import AdapterArrays, short_fingerprint, write_adapter_file
    from shira_export.export.site_layout import SiteArrays
    from shira_export.runtime import ShiraSession

    _, _, _, result = opt
    session = ShiraSession(result.output_dir, adapters=None)
    manifest = read_sparse_manifest(result.output_dir)
    site = manifest.targets[0]
    own = short_fingerprint(manifest.base_fingerprint)
    # same parameter names and shapes, made for another graph
    shapes = {site.module: (site.out_features, site.in_features)}
    foreign = AdapterArrays.from_flat({site.module: (np.array([0], np.int32), np.ones(1, np.float32))}, shapes, own ^ 1)
    write_adapter_file(tmp_path / "foreign.onnx_adapter", foreign)
    with pytest.raises(ShiraInputError, match="another graph"):
        session.load_adapter("foreign", tmp_path / "foreign.onnx_adapter")
    good = result.adapter_paths["a"].read_bytes()
    for i, blob in enumerate([good[: len(good) // 2], b"\0" * 64, b"not a flatbuffer"]):
        path = tmp_path / f"bad{i}.onnx_adapter"
        path.write_bytes(blob)
        with pytest.raises(ShiraInputError):
            session.load_adapter("bad", path)
    empty_ell = np.zeros((0, site.out_features), np.int32), np.zeros((0, site.out_features), np.float32)
    flat_past_end = SiteArrays(
        *empty_ell, np.array([site.out_features * site.in_features], np.int32), np.ones(1, np.float32)
    )
    ell = np.zeros((1, site.out_features), np.int32)
    ell[0, 3] = site.in_features  # slot of output 3 reads an input feature past the end
    ell_past_end = SiteArrays(ell, np.ones(ell.shape, np.float32), np.zeros(0, np.int32), np.zeros(0, np.float32))
    for i, part in enumerate([flat_past_end, ell_past_end]):
        arrays = AdapterArrays({site.module: part}, {site.module: site.in_features}, own)
        write_adapter_file(tmp_path / f"range{i}.onnx_adapter", arrays)
        with pytest.raises(ShiraInputError, match="out of range"):
            session.load_adapter("range", tmp_path / f"range{i}.onnx_adapter")
    assert session.adapters == []


def test_cli_sparse_adapter_and_exit_codes(opt, tmp_path):
    from shira_export.cli import main

    root, base, adapters, _ = opt
    out = tmp_path / "cli_out"
    assert (
        main(
            ["sparse", "--model", str(base), "--adapter", f"first={adapters['a']}", "--output", str(out), "--no-verify"]
        )
        == 0
    )
    assert (out / "adapters" / "first.onnx_adapter").is_file()
    assert main(["adapter", "--graph", str(out), "--adapter", str(adapters["a"]), "--name", "second"]) == 0
    assert main(["adapter", "--graph", str(out), "--adapter", str(adapters["b"]), "--name", "third"]) == 2  # no sites
    assert set(read_sparse_manifest(out).adapters) == {"first", "second"}
    assert main(["adapter", "--graph", str(out), "--adapter", str(adapters["b"]), "--name", "../x"]) == 2
    assert not (tmp_path / "x.onnx_adapter").exists()
    assert main(["sparse", "--model", str(base), "--adapter", str(adapters["a"]), "--output", str(out)]) == 2
    assert main(["run", "--graph", str(out), "--adapter", "first", "--prompt", "hi"]) == 2  # no tokenizer
    assert (
        main(
            [
                "sparse",
                "--model",
                str(base),
                "--adapter",
                str(adapters["a"]),
                "--output",
                str(tmp_path / "o"),
                "--opset",
                "14",
            ]
        )
        == 2
    )
    shutil.rmtree(out)
