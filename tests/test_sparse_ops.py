"""The sparse delta op: values and gradients against dense references and against
PEFT's SHiRA layer, dtypes, and the cost contract (no weight-sized tensor per call)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import OPTConfig, OPTForCausalLM

from shira_export import ShiraConfig, get_shira_model
from shira_export.tuner.layer import ShiraLayer
from shira_export.tuner.sparse_ops import (
    SparsePlan,
    gather_flat,
    merged_weight_linear,
    scatter_flat_,
    sparse_linear_delta,
    storage_index,
)

OUT, IN, NNZ = 48, 40, 300


def _support(out_f: int = OUT, in_f: int = IN) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    flat = torch.randperm(out_f * in_f, generator=g)[:NNZ].sort().values
    return torch.stack([flat // in_f, flat % in_f])


@pytest.fixture(scope="module")
def support() -> torch.Tensor:
    return _support()


def _dense(indices: torch.Tensor, values: torch.Tensor, shape=(OUT, IN)) -> torch.Tensor:
    return torch.zeros(shape, dtype=values.dtype).index_put((indices[0], indices[1]), values)


# Both orientations of the values' gradient kernel: out >= in and in > out.
@pytest.mark.parametrize("shape", [(OUT, IN), (IN, OUT)], ids=["tall", "wide"])
@pytest.mark.parametrize("shuffle", [False, True], ids=["row_major", "unsorted"])
@pytest.mark.parametrize("lead", [(5,), (2, 1, 4)])
def test_matches_dense_reference(shape, shuffle, lead):
    g = torch.Generator().manual_seed(1)
    out_f, in_f = shape
    indices = _support(out_f, in_f)
    indices = indices[:, torch.randperm(NNZ, generator=g)] if shuffle else indices
    plan = SparsePlan.build(indices, shape)
    values = torch.randn(NNZ, generator=g, requires_grad=True)
    x = torch.randn(*lead, in_f, generator=g, requires_grad=True)
    y = sparse_linear_delta(x, values, plan)
    upstream = torch.randn(y.shape, generator=g)
    (y * upstream).sum().backward()

    values_ref = values.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = x_ref @ _dense(indices, values_ref, shape).t()
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values.grad, values_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(OUT, IN), (IN, OUT)], ids=["tall", "wide"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_merged_linear_equals_clone_and_add(shape, transposed):
    """merged_weight_linear over a weight holding W + S computes what PEFT's clone-and-add
    forward computes, with that forward's gradients, and never writes the weight."""
    g = torch.Generator().manual_seed(2)
    out_f, in_f = shape
    indices = _support(out_f, in_f)
    plan = SparsePlan.build(indices, shape)
    base = torch.randn(shape, generator=g)
    bias = torch.randn(out_f, generator=g)
    values = torch.randn(NNZ, generator=g, requires_grad=True)
    x = torch.randn(3, 4, in_f, generator=g, requires_grad=True)
    merged = base + _dense(indices, values.detach(), shape)
    stored = merged.t().contiguous() if transposed else merged.clone()
    before = stored.clone()
    y = merged_weight_linear(x, stored, bias, values, plan, transposed=transposed)
    upstream = torch.randn(y.shape, generator=g)
    (y * upstream).sum().backward()
    assert torch.equal(stored, before)

    values_ref = values.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    w_ref = base.clone() + torch.sparse_coo_tensor(indices, values_ref, shape)
    y_ref = torch.nn.functional.linear(x_ref, w_ref, bias)
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values.grad, values_ref.grad, rtol=1e-5, atol=1e-6)


def test_merged_linear_refuses_a_backward_after_the_weight_changed():
    indices = _support()
    plan = SparsePlan.build(indices, (OUT, IN))
    weight = torch.randn(OUT, IN)
    values = torch.randn(NNZ, requires_grad=True)
    y = merged_weight_linear(torch.randn(5, IN), weight, None, values, plan)
    scatter_flat_(weight, storage_index(indices, (OUT, IN)), torch.zeros(NNZ))  # e.g. the next step's merge
    with pytest.raises(RuntimeError, match="modified in place between this forward and its backward"):
        y.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(support, dtype):
    plan = SparsePlan.build(support, (OUT, IN))
    values = torch.randn(NNZ, requires_grad=True)
    x = torch.randn(6, IN).to(dtype).requires_grad_()
    y = sparse_linear_delta(x, values, plan)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert x.grad.dtype == dtype and values.grad.dtype == torch.float32
    ref = x.detach().float() @ _dense(support, values.detach()).t()
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)


def test_empty_inputs(support):
    plan = SparsePlan.build(support, (OUT, IN))
    values = torch.randn(NNZ, requires_grad=True)
    y = sparse_linear_delta(torch.zeros(0, 3, IN), values, plan)
    assert y.shape == (0, 3, OUT)
    y.sum().backward()
    assert values.grad is not None and not values.grad.any()
    with pytest.raises(ValueError, match="expects 40"):
        sparse_linear_delta(torch.zeros(2, IN + 1), values, plan)


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
    return OPTForCausalLM(cfg)


@pytest.mark.parametrize("mode", ["train", "eval"], ids=["merged_weight", "delta_on_activations"])
def test_gradients_equal_peft_shira(mode):
    """Same masks, same values, same batch: loss and every value gradient match PEFT, on
    the training path (adapter merged in W) and on the eval path (delta added)."""
    from peft import ShiraConfig as PeftShiraConfig
    from peft import get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    ours = get_shira_model(_tiny_opt(), ShiraConfig(r=3, target_modules=targets, init_weights=False, random_seed=11))
    theirs = get_peft_model(
        _tiny_opt(), PeftShiraConfig(r=3, target_modules=targets, init_weights=False, random_seed=11)
    )
    ours.eval(), theirs.eval()  # no dropout: both see the same function
    if mode == "train":
        for module in ours.modules():
            module.training = isinstance(module, ShiraLayer)  # SHiRA layers only: still no dropout
    ours_layers = dict(ours.shira_layers())
    pairs = []
    for path, module in theirs.base_model.model.named_modules():
        if hasattr(module, "shira_indices") and path in ours_layers:
            layer = ours_layers[path]
            assert torch.equal(layer.shira_indices["default"], module.shira_indices["default"].long())
            module.shira_weight["default"].data.copy_(layer.shira_weight["default"].data)
            pairs.append((layer.shira_weight["default"], module.shira_weight["default"]))
    assert len(pairs) == 12
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 96, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    loss_ours = ours(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss_theirs = theirs(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss_ours.backward(), loss_theirs.backward()
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=0)
    for ours_w, theirs_w in pairs:
        scale = theirs_w.grad.abs().max()
        torch.testing.assert_close(ours_w.grad, theirs_w.grad, rtol=1e-5, atol=1e-5 * float(scale))
    frozen = [p for n, p in ours.named_parameters() if "shira_weight" not in n]
    assert all(p.grad is None for p in frozen)  # no dense weight gradient anywhere
    assert any(layer._resident is not None for layer in ours_layers.values()) == (mode == "train")


def test_no_weight_sized_tensor_is_saved_or_copied():
    """Forward saves for backward only activations and O(nnz) tensors (at most the base
    weight itself, never a copy of it)."""
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    model = get_shira_model(nn.Sequential(base), ShiraConfig(r=4, target_modules=["0"], init_weights=False))
    layer = dict(model.shira_layers())["0"]
    weight_ptr = layer.base_layer.weight.data_ptr()
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x = torch.randn(3, 5, IN, requires_grad=True)  # 15 tokens x 40 = 600 < 48 x 40 = 1920
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    y.sum().backward()
    big = [t for t in saved if not t.is_sparse_csr and t.numel() >= OUT * IN]
    assert all(t.data_ptr() == weight_ptr for t in big)
    assert any(t.numel() == layer.nnz("default") for t in saved)  # the hook did see the op's tensors
    assert base.weight.grad is None and layer.shira_weight["default"].grad is not None


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_flat_gather_scatter_match_2d_indexing(support, transposed, contiguous):
    g = torch.Generator().manual_seed(4)
    weight = torch.randn((IN, OUT) if transposed else (OUT, IN), generator=g)
    if not contiguous:
        weight = weight.t().contiguous().t()
    rows, cols = support
    index_2d = (cols, rows) if transposed else (rows, cols)
    flat = storage_index(support, (OUT, IN), transposed=transposed)
    assert torch.equal(gather_flat(weight, flat), weight[index_2d])
    src = torch.randn(NNZ, generator=g)
    expected = weight.clone()
    expected[index_2d] = src
    scatter_flat_(weight, flat, src)
    assert torch.equal(weight, expected)
