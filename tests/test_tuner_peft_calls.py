"""PEFT's model-level calls on a ShiraModel: enable/disable adapter layers,
set_requires_grad, several active adapters, base-model state dicts, the model card,
from_pretrained's options, inject_adapter_in_model, the version in saved configs; and a
failed load that must leave the model exactly as it was (issue 16, item 5)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import shira_export
from shira_export import ShiraConfig, ShiraModel, get_shira_model
from shira_export.errors import ShiraInputError
from shira_export.tuner import inject_adapter_in_model
from shira_export.tuner.layer import ShiraLayer
from tiny_models import VOCAB, tiny_opt

X = {"input_ids": torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))}
Q = "model.decoder.layers.0.self_attn.q_proj"


def _two_adapters(base=None):
    torch.manual_seed(0)
    model = get_shira_model(copy.deepcopy(base or tiny_opt()), ShiraConfig(r=2, init_weights=False, random_seed=1))
    model.add_adapter("b", ShiraConfig(r=1, init_weights=False, random_seed=2))
    return model


def _logits(model, **kw):
    with torch.no_grad():
        return model(**X, **kw).logits


def test_enable_disable_adapter_layers():
    base = tiny_opt()
    model = _two_adapters(base)
    adapted = _logits(model)
    model.merge_adapter()
    model.disable_adapter_layers()
    assert torch.equal(_logits(model), _logits(base))
    assert not any(p.requires_grad for _, layer in model.shira_layers() for p in layer.shira_weight.values())
    assert not any(layer.merged for _, layer in model.shira_layers())  # unmerged, as PEFT does
    model.enable_adapter_layers()
    torch.testing.assert_close(_logits(model), adapted, rtol=0, atol=1e-6)
    assert dict(model.shira_layers())[Q].shira_weight["default"].requires_grad


def test_set_requires_grad():
    model = _two_adapters()
    layer = dict(model.shira_layers())[Q]
    model.set_requires_grad("b")
    assert layer.shira_weight["b"].requires_grad and layer.shira_weight["default"].requires_grad
    model.set_requires_grad(["default", "b"], requires_grad=False)
    assert not layer.shira_weight["b"].requires_grad and not layer.shira_weight["default"].requires_grad
    with pytest.raises(ShiraInputError, match="no adapter 'nope'"):
        model.set_requires_grad("nope")


def test_several_active_adapters_add_their_deltas(tmp_path):
    base = tiny_opt()
    model = _two_adapters(base)
    model.set_adapter(["default", "b"])
    assert model.active_adapter == ["default", "b"] and model.active_adapters == ["default", "b"]
    ref = copy.deepcopy(base)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for path, layer in model.shira_layers():
            modules[path].weight += layer.dense_delta("default") + layer.dense_delta("b")
    torch.testing.assert_close(_logits(model), _logits(ref), rtol=0, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith(".b") for n in trainable) and any(n.endswith(".default") for n in trainable)
    model.merge_adapter()  # both merged, then both out again
    torch.testing.assert_close(_logits(model), _logits(ref), rtol=0, atol=1e-5)
    model.unmerge_adapter()
    peft = pytest.importorskip("peft")
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
        theirs.base_model.set_adapter(["default", "b"])
    torch.testing.assert_close(_logits(theirs.eval()), _logits(model), rtol=0, atol=1e-5)


def test_base_model_state_dict_under_its_own_keys():
    base = tiny_opt()
    model = _two_adapters(base).train()
    model(**X, labels=X["input_ids"]).loss.backward()  # resident: W + S in place
    state = {k: v.clone() for k, v in model.get_base_model_state_dict().items()}
    assert state.keys() == base.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in base.state_dict().items())  # settled base weights
    peft = pytest.importorskip("peft")
    save_and_load = pytest.importorskip("peft.utils.save_and_load")
    if hasattr(save_and_load, "get_base_model_state_dict"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.get_peft_model(copy.deepcopy(base), peft.ShiraConfig(r=2))
        assert save_and_load.get_base_model_state_dict(theirs).keys() == state.keys()
    changed = {k: v + 1.0 if k == f"{Q}.weight" else v for k, v in state.items()}
    result = model.set_base_model_state_dict(changed)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(dict(model.shira_layers())[Q].base_layer.weight, state[f"{Q}.weight"] + 1.0)
    with pytest.raises(RuntimeError, match="unexpected keys \\['nope'\\]"):
        model.set_base_model_state_dict({**state, "nope": torch.zeros(1)})


def test_model_card_and_version_in_the_config(tmp_path):
    model = _two_adapters()
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in card and f"- shira_export {shira_export.__version__}" in card
    assert "`b` (`b/`)" in card
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_version"] == f"0.21.2@shira_export-{shira_export.__version__}"
    assert config["auto_mapping"]["base_model_class"] == "OPTForCausalLM"
    (tmp_path / "README.md").write_text("# my notes\n")
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("# my notes") and f"- shira_export {shira_export.__version__}" in card
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.PeftModel.from_pretrained(tiny_opt(), tmp_path)
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)]  # PEFT reads our config cleanly


def test_from_pretrained_options(tmp_path):
    base = tiny_opt()
    model = _two_adapters(base)
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    expected = _logits(model)
    (tmp_path / "adapter_config.json").write_text("{not json")  # config= replaces the file
    loaded = ShiraModel.from_pretrained(
        copy.deepcopy(base), tmp_path, config=copy.copy(model.peft_config["default"]), low_cpu_mem_usage=True
    )
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=1e-6)
    model.peft_config["default"].save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file(
        {k: v.half() if k.endswith("shira_weight") else v for k, v in tensors.items()},
        str(tmp_path / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    cast = ShiraModel.from_pretrained(copy.deepcopy(base), tmp_path)
    kept = ShiraModel.from_pretrained(copy.deepcopy(base), tmp_path, autocast_adapter_dtype=False)
    assert dict(cast.shira_layers())[Q].shira_weight["default"].dtype == torch.float32
    assert dict(kept.shira_layers())[Q].shira_weight["default"].dtype == torch.float16


def test_inject_adapter_in_model():
    base = tiny_opt()
    target = copy.deepcopy(base)
    out = inject_adapter_in_model(ShiraConfig(r=2, init_weights=False), target)
    assert out is target
    paths = sorted(p for p, m in out.named_modules() if isinstance(m, ShiraLayer))
    assert paths == sorted(f"model.decoder.layers.{i}.self_attn.{n}_proj" for i in (0, 1) for n in "qv")
    with torch.no_grad():
        assert (out(**X).logits - base(**X).logits).abs().max() > 1e-4
    from_keys = inject_adapter_in_model(
        ShiraConfig(r=1), copy.deepcopy(base), state_dict={f"base_model.model.{Q}.shira_weight": torch.zeros(1)}
    )
    assert [p for p, m in from_keys.named_modules() if isinstance(m, ShiraLayer)] == [Q]
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.inject_adapter_in_model(peft.ShiraConfig(r=2), copy.deepcopy(base))
    assert sorted(n for n, m in theirs.named_modules() if hasattr(m, "shira_indices")) == paths


# ---- a failed load leaves the model as it was (issue 16, item 5) ----------------------


def _bad_adapter(tmp_path, base):
    """An adapter whose file holds a module weight adapter_config.json does not declare."""
    good = get_shira_model(copy.deepcopy(base), ShiraConfig(r=1, init_weights=False, random_seed=7))
    good.save_pretrained(tmp_path / "good")
    good.save_pretrained(tmp_path / "bad")
    tensors = load_file(tmp_path / "bad" / "adapter_model.safetensors")
    tensors["base_model.model.model.decoder.layers.0.fc1.weight"] = torch.zeros(64, 32)
    save_file(tensors, str(tmp_path / "bad" / "adapter_model.safetensors"), metadata={"format": "pt"})
    return tmp_path / "good", tmp_path / "bad"


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        [(n, m.training, type(m).__name__) for n, m in model.named_modules()],
    )


def test_a_failed_load_changes_nothing_and_a_retry_works(tmp_path):
    base = tiny_opt()
    good, bad = _bad_adapter(tmp_path, base)
    model = get_shira_model(copy.deepcopy(base), ShiraConfig(r=2, init_weights=False, random_seed=1))
    before, logits = _snapshot(model), _logits(model)
    with pytest.raises(ShiraInputError, match=r"base_model\.model\.model\.decoder\.layers\.0\.fc1\.weight"):
        model.load_adapter(bad, "b")
    after = _snapshot(model)
    assert after[1:] == before[1:] and after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][k], v) for k, v in before[0].items())
    assert sorted(model.peft_config) == ["default"] and torch.equal(_logits(model), logits)
    model.load_adapter(good, "b")  # the retry
    assert sorted(model.peft_config) == ["b", "default"]
    model.set_adapter("b")
    torch.testing.assert_close(
        _logits(model), _logits(ShiraModel.from_pretrained(copy.deepcopy(base), good)), rtol=0, atol=1e-6
    )


def test_a_failed_from_pretrained_gives_the_plain_model_back(tmp_path):
    base = tiny_opt().train()
    _, bad = _bad_adapter(tmp_path, base)
    flags = [p.requires_grad for p in base.parameters()]
    assert all(flags)
    with pytest.raises(ShiraInputError, match="fc1.weight"):
        ShiraModel.from_pretrained(base, bad)
    assert [p.requires_grad for p in base.parameters()] == flags
    assert all(m.training for m in base.modules())
    assert not any(isinstance(m, ShiraLayer) for m in base.modules())


def test_an_install_that_fails_half_way_is_rolled_back(tmp_path, monkeypatch):
    base = tiny_opt()
    good, _ = _bad_adapter(tmp_path, base)
    model = get_shira_model(copy.deepcopy(base), ShiraConfig(r=2, target_modules=["q_proj"]))
    before = _snapshot(model)
    calls = {"n": 0}
    original = ShiraLayer.add_adapter

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the adapter's q_proj layers went in, v_proj's first one fails
            raise MemoryError("simulated")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ShiraLayer, "add_adapter", flaky)
    with pytest.raises(MemoryError):
        model.load_adapter(good, "b")
    after = _snapshot(model)
    assert after[1:] == before[1:] and sorted(model.peft_config) == ["default"]
    assert [p for p, _ in model.shira_layers()] == [
        p for p, m in model.model.named_modules() if isinstance(m, ShiraLayer)
    ]
    monkeypatch.setattr(ShiraLayer, "add_adapter", original)
    model.load_adapter(good, "b")
    assert sorted(model.peft_config) == ["b", "default"]
