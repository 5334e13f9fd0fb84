"""Tuner behaviour: adapters, merge/unmerge, switching, scale, fusion, dtypes, GPT-2 Conv1D."""

from __future__ import annotations

import copy
import io
import warnings
from contextlib import redirect_stdout

import pytest
import torch

from shira_export import ShiraConfig, ShiraModel, get_shira_model
from tiny_models import VOCAB, tiny_gpt2, tiny_llama, tiny_opt

X = {"input_ids": torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))}


def _dense_reference(base, shira: ShiraModel, adapter: str, scale: float = 1.0):
    """base weights + scale * S computed independently of the layer code."""
    ref = copy.deepcopy(base)
    modules = dict(ref.named_modules())
    for path, layer in shira.shira_layers():
        if adapter not in layer.shira_weight:
            continue
        rows, cols = layer.shira_indices[adapter]
        delta = torch.zeros(layer.out_features, layer.in_features)
        delta[rows, cols] = layer.shira_weight[adapter].detach() * scale
        w = modules[path].weight
        with torch.no_grad():
            w += delta if isinstance(modules[path], torch.nn.Linear) else delta.T
    return ref


def _weights(module):
    return {k.replace(".base_layer", ""): v.clone() for k, v in module.state_dict().items() if "shira" not in k}


@pytest.mark.parametrize("factory", [tiny_opt, tiny_llama, tiny_gpt2], ids=["opt", "llama", "gpt2"])
def test_forward_equals_dense_reference_and_merge_roundtrip(factory):
    base = factory()
    model = get_shira_model(copy.deepcopy(base), ShiraConfig(r=2, init_weights=False, random_seed=1))
    before = _weights(model.model)
    ref = _dense_reference(base, model, "default")
    with torch.no_grad():
        expected = ref(**X).logits
        assert (model(**X).logits - expected).abs().max().item() < 1e-5
        assert (model(**X).logits - base(**X).logits).abs().max().item() > 1e-3
        model.merge_adapter()
        assert (model(**X).logits - expected).abs().max().item() < 1e-5
        model.unmerge_adapter()
    after = _weights(model.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-exact restore


def test_gpt2_conv1d_targets_c_attn_by_default():
    model = get_shira_model(tiny_gpt2(), ShiraConfig(r=2))
    paths = [p for p, _ in model.shira_layers()]
    assert paths == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    layer = dict(model.shira_layers())[paths[0]]
    assert (layer.out_features, layer.in_features) == (96, 32)
    assert layer.nnz("default") == 2 * (96 + 32)


def test_only_values_train_and_print_trainable():
    model = get_shira_model(tiny_opt(), ShiraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("shira_weight" in n for n in trainable)
    assert all(not b.requires_grad for n, b in model.named_buffers())
    buf = io.StringIO()
    with redirect_stdout(buf):
        model.print_trainable_parameters()
    assert f"trainable params: {4 * 2 * 64:,d}" in buf.getvalue()


def test_training_keeps_the_adapter_merged_and_reaches_values_only():
    model = get_shira_model(tiny_opt(), ShiraConfig(r=2, init_weights=False))
    layer = dict(model.shira_layers())["model.decoder.layers.0.self_attn.q_proj"]
    w = layer.base_layer.weight
    before, merged = w.detach().clone(), w.detach() + layer.dense_delta("default")
    with torch.no_grad():
        version = w._version
        model(**X)  # inference: the weight is only read
        assert w._version == version
    with torch.enable_grad():
        model(**X)  # eval mode with grad enabled: still only read (concurrent inference is safe)
        assert w._version == version
    model.train()
    model(**X, labels=X["input_ids"]).loss.backward()
    assert torch.equal(w, merged) and w.grad is None  # W + S in place, no gradient for W ...
    assert layer.shira_weight["default"].grad is not None
    assert layer.shira_weight["default"].grad.abs().sum() > 0  # ... only for the values
    model.eval()
    assert torch.equal(w, before)  # eval mode: the base weight, bit for bit


def test_multiple_adapters_set_disable_delete():
    base = tiny_opt()
    model = get_shira_model(copy.deepcopy(base), ShiraConfig(r=2, init_weights=False, random_seed=1))
    model.add_adapter("task2", ShiraConfig(r=1, random_seed=7, init_weights=False))
    assert model.active_adapter == "default"
    with torch.no_grad():
        y_default = model(**X).logits
        model.set_adapter("task2")
        y_task2 = model(**X).logits
        assert (y_default - y_task2).abs().max() > 1e-4
        ref2 = _dense_reference(base, model, "task2")(**X).logits
        assert (y_task2 - ref2).abs().max() < 1e-5
        with model.disable_adapter():
            assert torch.allclose(model(**X).logits, base(**X).logits, atol=0, rtol=0)
        assert torch.equal(model(**X).logits, y_task2)
        model.delete_adapter("task2")
        assert model.active_adapter == "default"
        assert torch.equal(model(**X).logits, y_default)
    with pytest.raises(ValueError, match="no adapter 'task2'"):
        model.set_adapter("task2")


def test_switch_adapter_is_exact_after_many_switches():
    base = tiny_llama()
    model = get_shira_model(copy.deepcopy(base), ShiraConfig(r=3, init_weights=False, random_seed=1))
    model.add_adapter("b", ShiraConfig(r=2, random_seed=2, init_weights=False))
    model.add_adapter("c", ShiraConfig(r=4, target_modules=["k_proj", "o_proj", "q_proj"], init_weights=False))
    model.merge_adapter()
    refs = {n: _weights(_dense_reference(base, model, n)) for n in ("default", "b", "c")}
    for name in ["b", "c", "default", "c", "b", "b", "default"] * 3:
        model.switch_adapter(name)
        got = _weights(model.model)
        assert max((got[k] - refs[name][k]).abs().max().item() for k in got) <= 1e-6
    model.unmerge_adapter()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in _weights(model.model).items())


def test_set_scale_merged_and_unmerged():
    base = tiny_opt()
    model = get_shira_model(copy.deepcopy(base), ShiraConfig(r=2, init_weights=False))
    model.set_scale("default", 0.5)
    ref = _dense_reference(base, model, "default", scale=0.5)
    with torch.no_grad():
        assert (model(**X).logits - ref(**X).logits).abs().max() < 1e-5
        model.merge_adapter()
        model.set_scale("default", 0.25)
        ref = _dense_reference(base, model, "default", scale=0.25)
        assert (model(**X).logits - ref(**X).logits).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_bases(dtype):
    base = tiny_opt().to(dtype)
    model = get_shira_model(copy.deepcopy(base), ShiraConfig(r=2, init_weights=False))
    assert model.shira_layers().__next__()[1].shira_weight["default"].dtype == torch.float32
    out = model(**X, labels=X["input_ids"])
    assert out.logits.dtype == dtype
    out.loss.backward()
    ref = _dense_reference(base.float(), model, "default").to(dtype)
    with torch.no_grad():
        tol = 2e-2 if dtype == torch.float16 else 1e-1
        assert (model(**X).logits.float() - ref(**X).logits.float()).abs().max() < tol
        merged = model.merge_and_unload()
        assert merged.model.decoder.layers[0].self_attn.q_proj.weight.dtype == dtype


@pytest.mark.parametrize("overlap", [True, False])
def test_add_weighted_adapter(overlap, tmp_path):
    base = tiny_opt()
    model = get_shira_model(copy.deepcopy(base), ShiraConfig(r=2, init_weights=False, random_seed=1))
    model.add_adapter("b", ShiraConfig(r=2, init_weights=False, random_seed=1 if overlap else 2))
    model.add_weighted_adapter(["default", "b"], weights=[0.7, 0.3], adapter_name="ab")
    expected = {}
    for path, layer in model.shira_layers():
        expected[path] = 0.7 * layer.dense_delta("default") + 0.3 * layer.dense_delta("b")
        fused = layer.dense_delta("ab")
        assert torch.allclose(fused, expected[path], atol=1e-7)
        rows, cols = layer.shira_indices["ab"]
        covered = torch.zeros(layer.out_features, layer.in_features, dtype=torch.bool)
        covered[rows, cols] = True
        for part in ("default", "b"):
            r, c = layer.shira_indices[part]
            assert bool(covered[r, c].all())  # the union of the supports
        same = torch.equal(layer.shira_indices["default"], layer.shira_indices["b"])
        assert same == overlap
        assert layer.nnz("ab") == model.peft_config["ab"].r * 64
    model.save_pretrained(tmp_path, selected_adapters=["ab"])
    loaded = ShiraModel.from_pretrained(copy.deepcopy(base), tmp_path / "ab")
    for path, layer in loaded.shira_layers():
        assert torch.allclose(layer.dense_delta("default"), expected[path], atol=1e-7)
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ab").eval()
    model.set_adapter("ab")
    with torch.no_grad():
        assert (theirs(**X).logits - model(**X).logits).abs().max() <= 1e-6


def test_merge_and_unload_returns_plain_model(tmp_path):
    base = tiny_opt()
    model = get_shira_model(copy.deepcopy(base), ShiraConfig(r=2, init_weights=False))
    with torch.no_grad():
        expected = model(**X).logits
    dense = model.merge_and_unload()
    assert type(dense) is type(base)
    assert not any("shira" in k or "base_layer" in k for k in dense.state_dict())
    dense.save_pretrained(tmp_path)
    reloaded = type(base).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (reloaded(**X).logits - expected).abs().max() < 1e-5


def test_switch_sees_base_weight_written_elsewhere():
    """Switching reuses cached base entries; a write to the weight by anything else must
    invalidate them, or the old base value would be scattered back."""
    base = tiny_opt()
    model = get_shira_model(copy.deepcopy(base), ShiraConfig(r=3, init_weights=False, random_seed=1))
    model.add_adapter("b", ShiraConfig(r=3, init_weights=False, random_seed=2))
    model.merge_adapter()
    model.switch_adapter("b")
    model.switch_adapter("default")
    model.unmerge_adapter()
    layer = dict(model.shira_layers())["model.decoder.layers.0.self_attn.q_proj"]
    row, col = (int(v) for v in layer.shira_indices["b"][:, 0])
    with torch.no_grad():
        layer.base_layer.weight[row, col] += 1.0  # e.g. a user's edit or load_state_dict
        base.model.decoder.layers[0].self_attn.q_proj.weight[row, col] += 1.0
    model.merge_adapter()
    model.switch_adapter("b")
    expected = _weights(_dense_reference(base, model, "b"))
    got = _weights(model.model)
    assert max((got[k] - expected[k]).abs().max().item() for k in got) <= 1e-6
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, base.model.decoder.layers[0].self_attn.q_proj.weight)
