"""Mask strategies: each selection rule checked on a small layer, the calibration
gradients against a hand-written loop, and adapters of every mask type loaded by PEFT."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

from shira_export import ShiraConfig, get_shira_model
from shira_export.errors import ShiraInputError
from shira_export.tuner.calibration import compute_mask_grads
from shira_export.tuner.config import MaskType
from shira_export.tuner.masks import (
    get_mask_fn,
    gradient_mask,
    num_shira_weights,
    random_mask,
    snip_mask,
    structured_mask,
    weight_magnitude_mask,
)

OUT, IN, R = 40, 48, 3
K = R * (OUT + IN)


@pytest.fixture(scope="module")
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(IN, OUT)


def _assert_top_k(mask: torch.Tensor, score: torch.Tensor) -> None:
    assert mask.shape == score.shape and int(mask.sum()) == K
    assert score[mask].min() >= score[~mask].max()


def test_random_matches_peft_bit_for_bit(linear):
    from peft.tuners.shira.mask_functions import random_mask as peft_random

    for seed in (None, 0, 7):
        ours = random_mask(linear, R, random_seed=seed)
        theirs = peft_random(linear, R, random_seed=seed)
        assert torch.equal(ours, theirs.bool())


def test_weight_magnitude_selects_largest(linear):
    _assert_top_k(weight_magnitude_mask(linear, R, random_seed=3, unused=1), linear.weight.detach().abs())


def test_weight_magnitude_on_conv1d_uses_out_in_orientation():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    conv = Conv1D(OUT, IN)  # weight stored (in, out)
    conv.weight.data.normal_()
    _assert_top_k(weight_magnitude_mask(conv, R), conv.weight.detach().t().abs())


def test_gradient_and_snip_rules(linear):
    torch.manual_seed(2)
    grad = torch.rand(OUT, IN)
    g_mask = gradient_mask(linear, R, grad=grad, random_seed=0)
    s_mask = snip_mask(linear, R, grad=grad)
    _assert_top_k(g_mask, grad)
    _assert_top_k(s_mask, (linear.weight.detach() * grad).abs())
    assert not torch.equal(g_mask, s_mask)


def test_gradient_masks_need_a_well_shaped_grad(linear):
    with pytest.raises(ShiraInputError, match="compute_mask_grads"):
        gradient_mask(linear, R)
    with pytest.raises(ShiraInputError, match=r"expected the layer's \(out, in\) = \(40, 48\)"):
        snip_mask(linear, R, grad=torch.ones(IN, OUT))


@pytest.mark.parametrize("shape", [(40, 48), (96, 32), (32, 32)])
def test_structured_rows_columns_diagonal(shape):
    out_f, in_f = shape
    layer = nn.Linear(in_f, out_f)
    mask = structured_mask(layer, R, random_seed=5)
    assert mask.shape == shape and int(mask.sum()) == num_shira_weights(R, out_f, in_f)
    d = torch.arange(min(shape))
    assert bool(mask[d, d].all())
    full_rows, full_cols = int(mask.all(1).sum()), int(mask.all(0).sum())
    assert full_rows >= R - 1 and full_cols >= R - 1
    # Off the diagonal, every entry lies on a full row or column, except the last line taken (cut short).
    rest = mask.clone()
    rest[d, d] = False
    rest &= ~(mask.all(1, keepdim=True) | mask.all(0, keepdim=True))
    rows_left, cols_left = torch.nonzero(rest).unbind(1)
    assert rows_left.unique().numel() <= 1 or cols_left.unique().numel() <= 1
    # High rank: generic values on this support are full rank (the diagonal sees to it).
    values = torch.zeros(shape)
    values[mask] = torch.randn(int(mask.sum()))
    assert int(torch.linalg.matrix_rank(values)) == min(shape)
    assert torch.equal(mask, structured_mask(layer, R, random_seed=5))
    assert not torch.equal(mask, structured_mask(layer, R, random_seed=6))


def test_registry():
    assert get_mask_fn("snip") is snip_mask
    assert get_mask_fn(MaskType.STRUCTURED) is structured_mask
    with pytest.raises(ShiraInputError, match="custom"):
        get_mask_fn("custom")
    with pytest.raises(ShiraInputError, match="unknown mask_type"):
        get_mask_fn("topk")


def _tiny_opt() -> OPTForCausalLM:
    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
    )
    return OPTForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def calib_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 96, (2, 10), generator=g)
        batches.append({"input_ids": ids, "labels": ids})
    return batches


def test_calibration_grads_match_a_manual_loop(calib_batches):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    config = ShiraConfig(r=2, mask_type="snip", target_modules=["c_attn", "c_fc"])
    grads = compute_mask_grads(gpt2, calib_batches, config=config, num_batches=2, progress=False)
    assert not any(p.requires_grad for p in gpt2.parameters() if p.grad is not None)
    assert all(p.requires_grad for p in gpt2.parameters())  # flags restored

    expected: dict[str, torch.Tensor] = {}
    for batch in calib_batches[:2]:
        gpt2.zero_grad()
        gpt2(**batch).loss.backward()
        for path, module in gpt2.named_modules():
            if path.endswith(("c_attn", "c_fc")):
                g = module.weight.grad.abs().t()  # Conv1D: (in, out) -> (out, in)
                expected[path] = expected.get(path, 0) + g
    gpt2.zero_grad(set_to_none=True)
    assert sorted(grads) == sorted(expected)
    for path, g in grads.items():
        torch.testing.assert_close(g, expected[path], rtol=1e-5, atol=1e-8)
        assert g.shape == (3 * 32 if path.endswith("c_attn") else 4 * 32, 32)


def test_calibration_rejects_batches_without_loss():
    model = _tiny_opt()
    with pytest.raises(ShiraInputError, match="labels"):
        compute_mask_grads(
            model, [{"input_ids": torch.ones(1, 4, dtype=torch.long)}], config=ShiraConfig(r=2), progress=False
        )


@pytest.mark.parametrize("mask_type", ["random", "weight_magnitude", "gradient", "snip", "structured", "custom"])
def test_every_mask_type_trains_saves_and_loads_in_peft(mask_type, calib_batches, tmp_path):
    from peft import PeftModel

    base = _tiny_opt()
    extra = {}
    if mask_type == "custom":
        # A custom callable with extra keyword arguments (PEFT's custom path rejects those).
        extra["mask_fn"] = lambda layer, r, *, random_seed=None, **kw: structured_mask(layer, r, random_seed=1).float()
    config = ShiraConfig(
        r=2, mask_type=mask_type, target_modules=["q_proj", "v_proj", "fc1"], init_weights=False, random_seed=4, **extra
    )
    grads = None
    if mask_type in ("gradient", "snip"):
        grads = compute_mask_grads(base, calib_batches, config=config, num_batches=3, progress=False)
    model = get_shira_model(base, config, mask_grads=grads)
    layer = model.model.model.decoder.layers[0].fc1
    indices = layer.shira_indices["default"]
    assert indices.shape[1] == 2 * (64 + 32)
    if mask_type == "gradient":
        score = grads["model.decoder.layers.0.fc1"]
        chosen = torch.zeros_like(score, dtype=torch.bool)
        chosen[indices[0], indices[1]] = True
        assert score[chosen].min() >= score[~chosen].max()
    ids = calib_batches[0]["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    peft_model = PeftModel.from_pretrained(_tiny_opt(), tmp_path).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
