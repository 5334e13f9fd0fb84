"""Mask strategies. A mask is a 0/1 tensor of shape (out, in) with exactly
r * (in + out) ones; the adapter trains the weights where it is 1.

Every strategy has the contract `mask_fn(base_layer, r, **kwargs)`; unknown keyword
arguments are ignored, so one call site can pass `random_seed=` and `grad=` to all.
The paper's strategies (SHiRA, arXiv 2406.13175): random, weight magnitude (top-k |W|),
gradient (top-k |grad| accumulated on calibration data, see tuner/calibration.py),
SNIP (top-k |W * grad|) and structured (whole rows and columns plus the diagonal).
"""

from __future__ import annotations

from typing import Callable, Optional, Union, cast

import torch
from torch import nn

from shira_export.errors import ShiraInputError
from shira_export.tuner.config import MaskType

__all__ = [
    "MaskFn",
    "base_weight_out_in",
    "get_mask_fn",
    "gradient_mask",
    "layer_shape",
    "mask_to_indices",
    "needs_gradient",
    "num_shira_weights",
    "random_mask",
    "snip_mask",
    "structured_mask",
    "weight_magnitude_mask",
]

MaskFn = Callable[..., torch.Tensor]


def _weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight: nn.Linear and Conv1D hold a Parameter (torch's stub types any
    Module attribute as Tensor | Module)."""
    return cast(torch.Tensor, layer.weight)


def layer_shape(base_layer: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or a transformers Conv1D."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.out_features, base_layer.in_features
    if type(base_layer).__name__ == "Conv1D" and hasattr(base_layer, "nf"):
        in_features, out_features = _weight(base_layer).shape  # Conv1D stores (in, out)
        return out_features, in_features
    raise TypeError(f"SHiRA supports nn.Linear and transformers Conv1D, not {type(base_layer).__name__}")


def num_shira_weights(r: int, out_features: int, in_features: int) -> int:
    return r * (out_features + in_features)


def random_mask(base_layer: nn.Module, r: int, random_seed: Optional[int] = None, **kwargs) -> torch.Tensor:
    """PEFT's random mask, bit for bit: the first r*(in+out) entries of a randperm drawn
    from a fresh generator (seeded only when a seed is given, so seed None is
    deterministic too, and same-shaped layers get the same mask)."""
    out_f, in_f = layer_shape(base_layer)
    generator = torch.Generator()
    if random_seed is not None:
        generator.manual_seed(random_seed)
    flat = torch.zeros(out_f * in_f, dtype=torch.bool)
    flat[torch.randperm(out_f * in_f, generator=generator)[: num_shira_weights(r, out_f, in_f)]] = True
    return flat.view(out_f, in_f)


def mask_to_indices(mask: torch.Tensor) -> torch.Tensor:
    """Row-major sorted [2, nnz] int64 indices (row 0 = output, row 1 = input), as
    torch.where returns them, which is the order PEFT stores values in."""
    rows, cols = torch.where(mask.to(torch.bool))
    return torch.stack([rows, cols]).to(torch.int64)


def base_weight_out_in(base_layer: nn.Module) -> torch.Tensor:
    """The base weight as a detached (out, in) fp32 tensor (Conv1D stores (in, out))."""
    weight = _weight(base_layer).detach()
    if not isinstance(base_layer, nn.Linear):
        layer_shape(base_layer)  # raises for unsupported layer types
        weight = weight.t()
    return weight.to(torch.float32)


def _top_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of `score` (out, in)."""
    flat = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    flat[torch.topk(score.reshape(-1), k, sorted=False).indices] = True
    return flat.view(score.shape)


def _checked_grad(base_layer: nn.Module, grad: Optional[torch.Tensor], mask_type: str) -> torch.Tensor:
    out_f, in_f = layer_shape(base_layer)
    if grad is None:
        raise ShiraInputError(
            f"mask_type={mask_type!r} needs the calibration gradient of each targeted weight: "
            "grads = shira_export.tuner.calibration.compute_mask_grads(model, dataloader, config=config), "
            "then get_shira_model(model, config, mask_grads=grads)"
        )
    if tuple(grad.shape) != (out_f, in_f):
        raise ShiraInputError(
            f"mask_type={mask_type!r}: grad has shape {tuple(grad.shape)}, expected the layer's "
            f"(out, in) = ({out_f}, {in_f}) (Conv1D gradients must be transposed to (out, in))"
        )
    return grad.detach().to(device=_weight(base_layer).device, dtype=torch.float32)


def weight_magnitude_mask(base_layer: nn.Module, r: int, **kwargs) -> torch.Tensor:
    """Top-k |W|: train the largest-magnitude weights."""
    out_f, in_f = layer_shape(base_layer)
    return _top_k_mask(base_weight_out_in(base_layer).abs(), num_shira_weights(r, out_f, in_f))


def gradient_mask(base_layer: nn.Module, r: int, *, grad: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
    """Top-k |grad|, grad = |dL/dW| accumulated over calibration batches, (out, in)."""
    out_f, in_f = layer_shape(base_layer)
    return _top_k_mask(_checked_grad(base_layer, grad, "gradient").abs(), num_shira_weights(r, out_f, in_f))


def snip_mask(base_layer: nn.Module, r: int, *, grad: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
    """SNIP: top-k |W * grad| (connection sensitivity)."""
    out_f, in_f = layer_shape(base_layer)
    score = (base_weight_out_in(base_layer) * _checked_grad(base_layer, grad, "snip")).abs()
    return _top_k_mask(score, num_shira_weights(r, out_f, in_f))


def structured_mask(base_layer: nn.Module, r: int, random_seed: Optional[int] = None, **kwargs) -> torch.Tensor:
    """SHiRA-Struct: the diagonal (so the delta is high rank) plus whole rows and columns.

    Rows and columns are drawn by a seeded permutation (deterministic for seed None, like
    random_mask) and added alternately (row, column, row, ...), each contributing its
    entries not yet selected, until exactly r*(in+out) are selected; the last row or
    column taken is cut at that count (its lowest indices are kept). With r rows and r
    columns the count falls short by the overlaps, so about r+1 of each are used.
    """
    out_f, in_f = layer_shape(base_layer)
    k = num_shira_weights(r, out_f, in_f)
    if k > out_f * in_f:
        raise ShiraInputError(f"structured mask: r={r} asks for {k} weights, the layer has {out_f}x{in_f}")
    generator = torch.Generator()
    if random_seed is not None:
        generator.manual_seed(random_seed)
    row_order = torch.randperm(out_f, generator=generator)
    col_order = torch.randperm(in_f, generator=generator)
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    diag = torch.arange(min(out_f, in_f))
    mask[diag, diag] = True  # k >= in + out > min(in, out): the diagonal always fits
    count = int(diag.numel())
    for i in range(max(out_f, in_f)):
        for axis, order in ((0, row_order), (1, col_order)):
            if count == k or i >= order.numel():
                continue
            line = mask[order[i]] if axis == 0 else mask[:, order[i]]
            free = torch.nonzero(~line).flatten()[: k - count]
            if axis == 0:
                mask[order[i], free] = True
            else:
                mask[free, order[i]] = True
            count += int(free.numel())
        if count == k:
            break
    return mask.to(_weight(base_layer).device)


_BUILTIN: dict[MaskType, MaskFn] = {
    MaskType.RANDOM: random_mask,
    MaskType.WEIGHT_MAGNITUDE: weight_magnitude_mask,
    MaskType.GRADIENT: gradient_mask,
    MaskType.SNIP: snip_mask,
    MaskType.STRUCTURED: structured_mask,
}


def get_mask_fn(mask_type: Union[MaskType, str]) -> MaskFn:
    """The built-in strategy for `mask_type` (MaskType or its string value)."""
    try:
        kind = MaskType(mask_type)
    except ValueError:
        raise ShiraInputError(
            f"unknown mask_type {mask_type!r}; built-in: {[m.value for m in _BUILTIN]}, or pass mask_fn=callable"
        ) from None
    if kind not in _BUILTIN:
        raise ShiraInputError("mask_type='custom' has no built-in function: pass ShiraConfig(mask_fn=callable)")
    return _BUILTIN[kind]


def needs_gradient(mask_type: Union[MaskType, str]) -> bool:
    """Whether the strategy needs calibration gradients (grad=...)."""
    return MaskType(mask_type) in (MaskType.GRADIENT, MaskType.SNIP)
