"""Drawing a new adapter's masks: one sparse delta per targeted layer, validated
against the budget r*(in+out) and the layer's shape."""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import nn

from shira_export.errors import ShiraInputError
from shira_export.tuner.checkpoint import SparseDelta
from shira_export.tuner.config import MaskType, ShiraConfig
from shira_export.tuner.masks import layer_shape, mask_to_indices, num_shira_weights, random_mask
from shira_export.tuner.targets import resolve_target_modules


def _mask_fn_for(config: ShiraConfig):
    if config.mask_fn is not None:
        return config.mask_fn
    if config.mask_type is MaskType.RANDOM:
        return random_mask
    from shira_export.tuner.masks import get_mask_fn

    return get_mask_fn(config.mask_type)


def _accepted(fn, kwargs: dict) -> dict:
    """The keyword arguments `fn` takes (all of them if it has **kwargs): a PEFT-style
    mask_fn(base_layer, r) without **kwargs must not get random_seed=."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: pass everything
        return kwargs
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in kwargs.items() if k in names}


def draw_deltas(
    model: nn.Module, config: ShiraConfig, mask_grads: Optional[dict[str, torch.Tensor]] = None
) -> dict[str, SparseDelta]:
    mask_fn = _mask_fn_for(config)
    modules: dict[str, nn.Module] = dict(model.named_modules())
    deltas: dict[str, SparseDelta] = {}
    for path in resolve_target_modules(model, config):
        base = getattr(modules[path], "base_layer", modules[path])
        out_f, in_f = layer_shape(base)
        nnz = num_shira_weights(config.r, out_f, in_f)
        if nnz > out_f * in_f:
            raise ShiraInputError(
                f"module {path!r}: r={config.r} asks for {nnz} weights but the layer has only "
                f"{out_f}x{in_f}={out_f * in_f} (use r <= {out_f * in_f // (out_f + in_f)})"
            )
        kwargs: dict[str, Any] = {"random_seed": config.random_seed}
        if mask_grads is not None and path in mask_grads:
            kwargs["grad"] = mask_grads[path]
        mask = mask_fn(base, config.r, **_accepted(mask_fn, kwargs))
        if tuple(mask.shape) != (out_f, in_f):
            raise ShiraInputError(f"module {path!r}: mask has shape {tuple(mask.shape)}, expected ({out_f}, {in_f})")
        ones = int((mask != 0).sum())
        if ones != nnz or not bool(((mask == 0) | (mask == 1)).all()):
            raise ShiraInputError(
                f"module {path!r}: mask must be 0/1 with exactly r*(in+out)={nnz} ones, found {ones} nonzeros"
            )
        values = torch.zeros(nnz) if config.init_weights else torch.randn(nnz)
        deltas[path] = SparseDelta(indices=mask_to_indices(mask), values=values)
    return deltas
