"""The tuner as PEFT's users and PEFT's own tests use it (issue 17): eval mode after a
load, custom masks set after construction, base-layer hooks, RoBERTa heads, config
validation, merge/delete rules, resident training made visible, reentrant checkpointing."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from shira_export import ShiraConfig, ShiraModel, get_shira_model
from shira_export.errors import ShiraInputError
from shira_export.tuner.masks import structured_mask
from tiny_models import VOCAB, tiny_llama, tiny_opt

X = {"input_ids": torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))}
Q = "model.decoder.layers.0.self_attn.q_proj"


def _quiet_peft():
    peft = pytest.importorskip("peft")
    return peft


def test_loaded_adapters_are_in_eval_mode(tmp_path):
    base = tiny_opt(dropout=0.5)
    model = get_shira_model(copy.deepcopy(base), ShiraConfig(r=2, init_weights=False)).eval()
    with torch.no_grad():
        expected = model(**X).logits
    model.save_pretrained(tmp_path)
    loaded = ShiraModel.from_pretrained(copy.deepcopy(base).train(), tmp_path)
    assert not any(m.training for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**X).logits, expected, rtol=0, atol=1e-6)
    other = get_shira_model(copy.deepcopy(base), ShiraConfig(r=1)).train()
    other.load_adapter(tmp_path, "b", is_trainable=False)
    assert not other.training and not any(m.training for m in other.modules())
    trainable = ShiraModel.from_pretrained(copy.deepcopy(base).train(), tmp_path, is_trainable=True)
    assert trainable.training  # is_trainable keeps the caller's mode, as in PEFT


def _peft_style_mask(base_layer, r):  # PEFT's documented signature, no **kwargs
    return structured_mask(base_layer, r, random_seed=5).to(base_layer.weight.dtype)


def test_custom_mask_the_peft_way():
    config = ShiraConfig(r=1, mask_type="custom")  # no mask_fn yet: accepted, as PEFT does
    with pytest.raises(ShiraInputError, match="needs mask_fn"):
        get_shira_model(tiny_opt(), config)
    config.mask_fn = _peft_style_mask
    model = get_shira_model(tiny_opt(), config)
    layer = dict(model.shira_layers())[Q]
    expected = torch.stack(torch.where(_peft_style_mask(layer.base_layer, 1) == 1))
    assert torch.equal(layer.shira_indices["default"], expected)
    seen = {}

    def with_kwargs(base_layer, r, **kwargs):
        seen.update(kwargs)
        return _peft_style_mask(base_layer, r)

    config = ShiraConfig(r=1, mask_type="custom", random_seed=9)
    config.mask_fn = with_kwargs
    ours = get_shira_model(tiny_opt(), config)
    assert seen == {"random_seed": 9}
    peft = _quiet_peft()
    theirs_cfg = peft.ShiraConfig(r=1, mask_type="custom")
    theirs_cfg.mask_fn = with_kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_opt(), theirs_cfg)
    mine = dict(ours.shira_layers())
    compared = 0
    for name, module in theirs.base_model.model.named_modules():
        if name in mine:
            assert torch.equal(module.shira_indices["default"].long(), mine[name].shira_indices["default"])
            compared += 1
    assert compared == 4


def test_base_layer_hooks_run_in_train_mode():
    torch.manual_seed(0)
    plain = get_shira_model(tiny_opt(), ShiraConfig(r=2, init_weights=False)).train()
    hooked = copy.deepcopy(plain)
    q1 = "model.decoder.layers.1.self_attn.q_proj"  # its input carries a gradient (layer 0 adapts)
    base_layer = dict(hooked.shira_layers())[q1].base_layer
    calls = {"pre": 0, "fwd": 0, "bwd": 0}
    base_layer.register_forward_pre_hook(lambda m, a: calls.__setitem__("pre", calls["pre"] + 1))
    base_layer.register_forward_hook(lambda m, a, o: calls.__setitem__("fwd", calls["fwd"] + 1))
    base_layer.register_full_backward_hook(lambda m, gi, go: calls.__setitem__("bwd", calls["bwd"] + 1))
    losses = []
    for model in (plain, hooked):
        torch.manual_seed(1)
        loss = model(**X, labels=X["input_ids"]).loss
        loss.backward()
        losses.append(loss.detach())
    assert calls == {"pre": 1, "fwd": 1, "bwd": 1}
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    grads = [dict(m.shira_layers())[Q].shira_weight["default"].grad for m in (plain, hooked)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def _tiny_roberta_cls():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_labels=3,
    )
    return RobertaForSequenceClassification(cfg).eval()


def test_roberta_classification_head_keys_match_peft(tmp_path):
    peft = _quiet_peft()
    base = _tiny_roberta_cls()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            copy.deepcopy(base), peft.ShiraConfig(r=2, init_weights=False, task_type="SEQ_CLS")
        )
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].out_proj.weight.add_(0.3)
    theirs.eval().save_pretrained(tmp_path)
    ours = ShiraModel.from_pretrained(copy.deepcopy(base), tmp_path)
    keys = {k for k in ours.model.state_dict() if k.startswith("classifier.")}
    their_keys = {k for k in theirs.base_model.model.state_dict() if k.startswith("classifier.")}
    assert "classifier.original_module.dense.weight" in keys and keys == their_keys
    x = {"input_ids": X["input_ids"] % 60 + 3}
    with torch.no_grad():
        assert (ours(**x).logits - theirs(**x).logits).abs().max() <= 1e-6
        assert (ours(**x).logits - base(**x).logits).abs().max() > 1e-3


def test_config_validation_like_peft(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"foo": "bar"}))
    with pytest.raises(ShiraInputError, match=r"adapter_config.json: no 'peft_type'"):
        ShiraConfig.from_pretrained(tmp_path)
    data = ShiraConfig(r=2).to_dict()
    data["knob_from_the_future"] = 1
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"unexpected keys \['knob_from_the_future'\]"):
        config = ShiraConfig.from_pretrained(tmp_path, subfolder="sub")
    assert config.r == 2
    assert ShiraConfig.from_json_file(tmp_path / "sub" / "adapter_config.json")["knob_from_the_future"] == 1


def test_merge_and_delete_rules_match_peft():
    model = get_shira_model(tiny_opt(), ShiraConfig(r=2, init_weights=False))
    model.add_adapter("b", ShiraConfig(r=1, init_weights=False))
    model.merge_adapter()
    w = dict(model.shira_layers())[Q].base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.merge_adapter()
    assert torch.equal(dict(model.shira_layers())[Q].base_layer.weight, w)  # not merged twice
    with pytest.warns(UserWarning, match="Already following adapters were merged default"):
        model.merge_adapter(["b"])
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['default'\] while they are merged"):
        model.delete_adapter("default")
    model.unmerge_adapter()
    model.delete_adapter("default")
    assert sorted(model.peft_config) == ["b"] and model.active_adapter == "b"


def _train_steps(model, steps=2):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        model(**X, labels=X["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()


def test_resident_training_is_visible_and_can_be_turned_off():
    base = tiny_opt()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    torch.manual_seed(0)  # the same random values, and the same dropout masks, for both models
    fast = get_shira_model(copy.deepcopy(base), ShiraConfig(r=2, init_weights=False)).train()
    _train_steps(fast)
    with pytest.warns(UserWarning, match="stays merged in the base weights"):
        params = dict(fast.named_parameters())
    assert not torch.equal(params[f"model.{Q}.base_layer.weight"], before[f"{Q}.weight"])
    fast.settle()
    assert torch.equal(params[f"model.{Q}.base_layer.weight"], before[f"{Q}.weight"])
    torch.manual_seed(0)
    safe = get_shira_model(copy.deepcopy(base), ShiraConfig(r=2, init_weights=False), resident_training=False).train()
    _train_steps(safe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing merged: nothing to warn about
        state = {n.replace(".base_layer", "").removeprefix("model."): p for n, p in safe.named_parameters()}
    assert all(torch.equal(state[n], p) for n, p in before.items())
    values = [dict(m.shira_layers())[Q].shira_weight["default"] for m in (fast, safe)]
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-6)  # the same training


def test_reentrant_checkpointing_computes_both_passes_the_same_way():
    grads = []
    for checkpointing in (False, True):
        model = get_shira_model(tiny_llama(), ShiraConfig(r=2, init_weights=False)).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        model(**X, labels=X["input_ids"], use_cache=False).loss.backward()  # no cache: the same ops either way
        grads.append([layer.shira_weight["default"].grad.clone() for _, layer in model.shira_layers()])
    assert all(g.abs().sum() > 0 for g in grads[1])
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1]))  # bit for bit
