"""Both directions of PEFT's SHiRA format, with PEFT as the oracle."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors import safe_open

from shira_export import ShiraConfig, ShiraModel, get_shira_model
from tiny_models import VOCAB, main_output, tiny_bert, tiny_bert_cls, tiny_llama, tiny_opt

peft = pytest.importorskip("peft")

ARCHS = {"opt": tiny_opt, "llama": tiny_llama, "bert": tiny_bert}


def _inputs(batch: int = 2, length: int = 9) -> dict:
    g = torch.Generator().manual_seed(3)
    return {"input_ids": torch.randint(0, VOCAB, (batch, length), generator=g)}


def _peft_model(base, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, path, **kw).eval()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_ours_loads_in_peft_with_equal_outputs(arch, tmp_path):
    base = ARCHS[arch]()
    ours = get_shira_model(copy.deepcopy(base), ShiraConfig(r=2, init_weights=False, random_seed=4))
    ours.add_adapter("second", ShiraConfig(r=1, init_weights=False, random_seed=5))
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()
    theirs = _peft_model(copy.deepcopy(base), tmp_path)
    x = _inputs()
    with torch.no_grad():
        diff = (main_output(ours(**x)) - main_output(theirs(**x))).abs().max().item()
        assert diff <= 1e-6
        theirs.load_adapter(str(tmp_path / "second"), adapter_name="second")
        theirs.set_adapter("second")
        ours.set_adapter("second")
        assert (main_output(ours(**x)) - main_output(theirs(**x))).abs().max().item() <= 1e-6
        # the adapter really changes the model: the check above is not base == base
        assert (main_output(ours(**x)) - main_output(base(**x))).abs().max().item() > 1e-4


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_peft_adapter_loads_here_with_equal_outputs_and_merge(arch, tmp_path):
    base = ARCHS[arch]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.ShiraConfig(r=2, init_weights=False, random_seed=8))
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ours = ShiraModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = _inputs(batch=3, length=5)
    with torch.no_grad():
        assert (main_output(ours(**x)) - main_output(theirs(**x))).abs().max().item() <= 1e-6
    dense_theirs = theirs.merge_and_unload().state_dict()
    dense_ours = ours.merge_and_unload().state_dict()
    assert dense_theirs.keys() == dense_ours.keys()
    for key in dense_theirs:
        assert torch.allclose(dense_theirs[key], dense_ours[key], rtol=0, atol=1e-7), key


@pytest.mark.parametrize("seed", [None, 0, 123])
def test_random_mask_equals_peft(seed):
    base = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.ShiraConfig(r=3, random_seed=seed))
    ours = get_shira_model(copy.deepcopy(base), ShiraConfig(r=3, random_seed=seed))
    layers = dict(ours.shira_layers())
    count = 0
    for name, module in theirs.base_model.model.named_modules():
        if hasattr(module, "shira_indices") and "default" in getattr(module, "shira_indices", {}):
            mine = layers[name].shira_indices["default"]
            assert torch.equal(module.shira_indices["default"].long(), mine), name
            count += 1
    assert count == 4  # q_proj and v_proj of 2 layers


def test_file_layout_matches_peft(tmp_path):
    ours = get_shira_model(tiny_opt(), ShiraConfig(r=2, random_seed=1))
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_opt(), peft.ShiraConfig(r=2, random_seed=1))
    theirs.save_pretrained(tmp_path / "peft")
    mine = json.loads((tmp_path / "adapter_config.json").read_text())
    ref = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("peft_type", "r", "mask_type", "random_seed", "fan_in_fan_out", "init_weights", "task_type"):
        assert mine[key] == ref[key], key
    assert sorted(mine["target_modules"]) == sorted(ref["target_modules"])
    with (
        safe_open(tmp_path / "adapter_model.safetensors", "pt") as a,
        safe_open(tmp_path / "peft" / "adapter_model.safetensors", "pt") as b,
    ):
        assert a.metadata() == {"format": "pt"}
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            ta, tb = a.get_tensor(key), b.get_tensor(key)
            assert ta.dtype == tb.dtype and ta.shape == tb.shape, key
            if key.endswith("shira_indices"):
                assert torch.equal(ta, tb), key


def test_modules_to_save_round_trip_with_peft(tmp_path):
    base = tiny_bert_cls()
    ours = get_shira_model(copy.deepcopy(base), ShiraConfig(r=2, init_weights=False, task_type="SEQ_CLS"))
    head = ours.model.classifier.modules_to_save["default"]
    assert head.weight.requires_grad
    with torch.no_grad():
        head.weight.add_(0.5)
    ours.save_pretrained(tmp_path)
    theirs = _peft_model(copy.deepcopy(base), tmp_path)
    x = _inputs()
    with torch.no_grad():
        assert (ours(**x).logits - theirs(**x).logits).abs().max().item() <= 1e-6
        back = ShiraModel.from_pretrained(copy.deepcopy(base), tmp_path)
        assert (back(**x).logits - ours(**x).logits).abs().max().item() <= 1e-6
        assert (back(**x).logits - base(**x).logits).abs().max().item() > 1e-3
