"""Bad adapters and configs: clear errors naming the file/key/module, model untouched."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from shira_export import ShiraConfig, ShiraModel, get_shira_model
from shira_export.errors import ShiraInputError
from tiny_models import tiny_llama, tiny_opt

Q0 = "base_model.model.model.decoder.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    get_shira_model(tiny_opt(), ShiraConfig(r=2, init_weights=False)).save_pretrained(path)
    return path


def _variant(saved, tmp_path, edit):
    tensors = load_file(saved / "adapter_model.safetensors")
    edit(tensors)
    (tmp_path / "adapter_config.json").write_text((saved / "adapter_config.json").read_text())
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        tmp_path / "adapter_model.safetensors",
        metadata={"format": "pt"},
    )
    return tmp_path


def _set(key, fn):
    def edit(t):
        t[key] = fn(t[key])

    return edit


CASES = {
    "missing_indices": (lambda t: t.pop(f"{Q0}.shira_indices"), [f"{Q0}.shira_indices is missing"]),
    "out_of_range": (
        _set(f"{Q0}.shira_indices", lambda i: i.clone().index_fill_(1, torch.tensor([0]), 999)),
        ["q_proj", "(999, 999)", "out=32, in=32"],
    ),
    "duplicate": (_set(f"{Q0}.shira_indices", lambda i: torch.cat([i[:, :1], i[:, :-1]], 1)), ["duplicate index pair"]),
    "count_mismatch": (_set(f"{Q0}.shira_weight", lambda v: v[:-3]), ["128 index pairs but 125 values"]),
    "nan_values": (
        _set(f"{Q0}.shira_weight", lambda v: v.clone().index_fill_(0, torch.tensor([3]), float("nan"))),
        [f"{Q0}.shira_weight", "NaN/Inf"],
    ),
    "float_indices": (_set(f"{Q0}.shira_indices", lambda i: i.float()), ["expected an integer tensor"]),
    "negative": (
        _set(f"{Q0}.shira_indices", lambda i: i.clone().index_fill_(1, torch.tensor([0]), -1)),
        ["negative index"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupt_adapter_is_refused_and_model_untouched(case, saved, tmp_path):
    edit, fragments = CASES[case]
    folder = _variant(saved, tmp_path, edit)
    model = get_shira_model(tiny_opt(), ShiraConfig(r=1, init_weights=False))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ShiraInputError) as info:
        model.load_adapter(folder, adapter_name="bad")
    message = str(info.value)
    assert str(folder) in message
    for fragment in fragments:
        assert fragment in message, message
    assert list(model.peft_config) == ["default"]
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_adapter_for_another_base_model(saved):
    with pytest.raises(ShiraInputError, match="not found in LlamaForCausalLM"):
        ShiraModel.from_pretrained(tiny_llama(), saved)


def test_shape_mismatch_names_module(saved):
    from transformers import OPTConfig, OPTForCausalLM

    small = OPTForCausalLM(
        OPTConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=32,
            vocab_size=128,
            word_embed_proj_dim=16,
        )
    )
    base = copy.deepcopy(small)
    with pytest.raises(ShiraInputError, match=r"model.decoder.layers.0.self_attn.q_proj.*\(out=16, in=16\)"):
        ShiraModel.from_pretrained(small, saved)
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), base.state_dict().values()))
    assert not any("shira" in k for k in small.state_dict())


def test_pickle_file_is_never_loaded(tmp_path, saved):
    (tmp_path / "adapter_config.json").write_text((saved / "adapter_config.json").read_text())
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ShiraInputError, match="adapter_model.bin.*pickle"):
        ShiraModel.from_pretrained(tiny_opt(), tmp_path)


def test_truncated_safetensors(tmp_path, saved):
    (tmp_path / "adapter_config.json").write_text((saved / "adapter_config.json").read_text())
    data = (saved / "adapter_model.safetensors").read_bytes()
    (tmp_path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ShiraInputError, match="not a readable safetensors file"):
        ShiraModel.from_pretrained(tiny_opt(), tmp_path)


def test_missing_folder_and_wrong_peft_type(tmp_path):
    with pytest.raises(ShiraInputError, match="adapter folder not found"):
        ShiraModel.from_pretrained(tiny_opt(), tmp_path / "nope")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(ValueError, match="peft_type is 'LORA'"):
        ShiraModel.from_pretrained(tiny_opt(), tmp_path)


def test_r_too_large_and_unknown_target():
    with pytest.raises(ShiraInputError, match=r"self_attn.[qv]_proj.*r=17.*use r <= 16"):
        get_shira_model(tiny_opt(), ShiraConfig(r=17))
    with pytest.raises(ShiraInputError, match=r"\['qq_proj'\] match no module.*'q_proj'"):
        get_shira_model(tiny_opt(), ShiraConfig(r=1, target_modules=["q_proj", "qq_proj"]))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": 2.5}, "r must be a positive integer"),
        ({"mask_type": "magic"}, "mask_type must be one of"),
        ({"target_modules": []}, "non-empty list"),
        ({"target_modules": 3}, "list of names or a regex"),
        ({"task_type": "CAUSAL"}, "task_type must be one of"),
    ],
)
def test_config_validation(kwargs, fragment):
    with pytest.raises((ValueError, TypeError), match=fragment):
        ShiraConfig(**kwargs)


def test_custom_mask_without_mask_fn_is_refused_when_used():
    config = ShiraConfig(r=1, mask_type="custom")  # as in PEFT, mask_fn may be set after construction
    with pytest.raises(ShiraInputError, match="needs mask_fn"):
        get_shira_model(tiny_opt(), config)


def test_config_json_round_trip(tmp_path):
    cfg = ShiraConfig(r=4, random_seed=3, target_modules=["q_proj"], task_type="CAUSAL_LM")
    cfg.save_pretrained(tmp_path)
    back = ShiraConfig.from_pretrained(tmp_path)
    assert back == cfg
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "SHIRA"


def test_regex_target_modules():
    model = get_shira_model(tiny_opt(), ShiraConfig(r=1, target_modules=r".*layers\.1\.self_attn\.(k|out)_proj"))
    assert [p for p, _ in model.shira_layers()] == [
        "model.decoder.layers.1.self_attn.k_proj",
        "model.decoder.layers.1.self_attn.out_proj",
    ]
