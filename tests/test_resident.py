"""Training keeps the trained adapter merged in the base weight between steps: every
change of the values reaches W (whatever optimizer wrote them), every other reader of
W sees the base weight, and a gradient is never computed against a stale W."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from shira_export import ShiraConfig, get_shira_model
from shira_export.tuner.layer import ShiraLayer
from tiny_models import VOCAB, tiny_gpt2, tiny_opt

X = {"input_ids": torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))}
Q = "model.decoder.layers.0.self_attn.q_proj"


def _model(factory=tiny_opt):
    model = get_shira_model(factory(), ShiraConfig(r=2, init_weights=False, random_seed=1)).train()
    return model


def _logits(model) -> torch.Tensor:
    torch.manual_seed(0)  # the same dropout masks on every call
    return model(**X).logits


def _no_grad_logits(model) -> torch.Tensor:
    """The delta on the activations, over the base weight (in train mode a no-grad
    forward takes the resident path too, for gradient checkpointing: turn it off)."""
    model.resident_training = False
    try:
        with torch.no_grad():
            return _logits(model)
    finally:
        model.resident_training = True


@pytest.mark.parametrize("factory", [tiny_opt, tiny_gpt2], ids=["linear", "conv1d"])
@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused_adamw"])
def test_each_step_reaches_the_merged_weight(factory, fused):
    """Fused AdamW (transformers.Trainer's default) writes p.data: no new version."""
    model = _model(factory)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=fused)
    for _ in range(3):
        logits = _logits(model)  # grad enabled, train mode: the merged weight
        torch.testing.assert_close(logits, _no_grad_logits(model), rtol=1e-5, atol=1e-5)
        model(**X, labels=X["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(_logits(model), _no_grad_logits(model), rtol=1e-5, atol=1e-5)


def test_two_forwards_then_one_backward():
    model = _model()
    for m in model.modules():  # the same graph twice: no dropout
        m.training = isinstance(m, ShiraLayer)
    loss = model(**X, labels=X["input_ids"]).loss + model(**X, labels=X["input_ids"]).loss
    loss.backward()  # the second forward found W already merged: the first graph holds
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    (2 * model(**X, labels=X["input_ids"]).loss).backward()
    for got, want in zip(grads, (p.grad for p in model.parameters() if p.requires_grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_backward_after_the_values_changed_and_a_new_forward_is_refused():
    model = _model()
    first = model(**X, labels=X["input_ids"]).loss
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.data.add_(0.1)  # an optimizer step before the backward
    model(**X, labels=X["input_ids"])  # rewrites W for the new values
    with pytest.raises(RuntimeError, match="modified in place between this forward and its backward"):
        first.backward()


def test_state_dict_and_load_state_dict_see_the_base_weight():
    model = _model()
    w = dict(model.shira_layers())[Q].base_layer.weight
    before = w.detach().clone()
    model(**X, labels=X["input_ids"]).loss.backward()
    assert not torch.equal(w, before)  # merged while training
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.equal(state[f"model.{Q}.base_layer.weight"], before)
    expected = _logits(model)  # merged again for this forward
    model.load_state_dict(state)  # e.g. resuming from a checkpoint mid-training
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)
    model.eval()
    assert torch.equal(w, before)


def test_other_writes_while_merged_survive_and_the_delta_leaves():
    model = _model()
    layer = dict(model.shira_layers())[Q]
    w = layer.base_layer.weight
    before = w.detach().clone()
    model(**X)  # merged
    with torch.no_grad():
        w.add_(1.0)  # someone else's write (autograd sees it)
    model.eval()
    torch.testing.assert_close(w, before + 1.0, rtol=0, atol=1e-6)


def test_a_deep_copy_made_while_merged_restores_its_base_exactly():
    model = _model()
    before = dict(model.shira_layers())[Q].base_layer.weight.detach().clone()
    model(**X)  # merged
    clone = copy.deepcopy(model)  # new tensors, new version counters, same entries
    clone.eval(), model.eval()
    assert torch.equal(dict(clone.shira_layers())[Q].base_layer.weight, before)
    torch.testing.assert_close(_no_grad_logits(clone), _no_grad_logits(model), rtol=0, atol=0)


def test_adding_an_adapter_reads_the_base_weight():
    model = _model()
    layer = dict(model.shira_layers())[Q]
    with torch.no_grad():
        layer.shira_weight["default"].fill_(100.0)  # merged, these would be the largest |W|
    model(**X)
    model.add_adapter("wm", ShiraConfig(r=2, mask_type="weight_magnitude"))
    base = layer.base_layer.weight.detach().abs()
    rows, cols = layer.shira_indices["wm"]
    assert base.max() < 100 and torch.equal(
        base[rows, cols].sort().values, base.flatten().sort().values[-rows.numel() :]
    )


def test_a_tied_weight_is_never_left_merged():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(16, 8)
            self.head = nn.Linear(8, 16, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.embed(ids))

    torch.manual_seed(0)
    model = get_shira_model(Tied(), ShiraConfig(r=1, target_modules=["head"], init_weights=False)).train()
    layer = dict(model.shira_layers())["head"]
    before = model.model.embed.weight.detach().clone()
    out = model(torch.arange(6))
    assert layer.weight_shared and torch.equal(model.model.embed.weight, before)
    out.square().sum().backward()
    assert layer.shira_weight["default"].grad.abs().sum() > 0


def test_merge_after_values_changed_through_data_uses_the_new_values():
    """Optimizers writing p.data leave the version: a merge must not reuse old entries."""
    model = _model().eval()
    layer = dict(model.shira_layers())[Q]
    w = layer.base_layer.weight
    before = w.detach().clone()
    model.merge_adapter()
    model.unmerge_adapter()
    layer.shira_weight["default"].data.add_(0.5)  # as fused AdamW does
    model.merge_adapter()
    assert torch.equal(w, before + layer.dense_delta("default"))
