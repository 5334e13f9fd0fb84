"""Calibration for the gradient-based masks ("gradient" and "snip"): accumulate |dL/dW|
of every targeted base weight over a few batches, before the adapter exists.

    grads = compute_mask_grads(model, dataloader, config=config, num_batches=8)
    model = get_shira_model(model, config, mask_grads=grads)

Only the targeted weights get gradients (everything else is frozen for the duration),
so memory grows by one weight-sized buffer per targeted layer, not by the whole model.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Optional, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from shira_export.errors import ShiraInputError
from shira_export.tuner.config import ShiraConfig
from shira_export.tuner.targets import resolve_target_modules

__all__ = ["compute_mask_grads"]


def _target_weights(model: nn.Module, config: ShiraConfig) -> dict[str, tuple[nn.Parameter, bool]]:
    """path -> (weight, stored transposed) for each targeted layer; a layer already
    wrapped by SHiRA contributes its base layer's weight."""
    modules: dict[str, nn.Module] = dict(model.named_modules())
    found: dict[str, tuple[nn.Parameter, bool]] = {}
    for path in resolve_target_modules(model, config):
        base = getattr(modules[path], "base_layer", modules[path])
        # Conv1D stores (in, out); the cast: torch types a Module attribute as Tensor | Module
        found[path] = (cast(nn.Parameter, base.weight), not isinstance(base, nn.Linear))
    return found


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def compute_mask_grads(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    *,
    config: ShiraConfig,
    num_batches: Optional[int] = 8,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Sum over batches of |grad| of each weight targeted by `config`, in (out, in)
    orientation, fp32, keyed by module path (the `mask_grads=` of get_shira_model).

    Each batch is a mapping passed as `model(**batch)`; the output's `.loss` is
    back-propagated (give `labels`). The model runs in eval mode (no dropout noise);
    its training mode, `requires_grad` flags and existing `.grad`s are restored after.
    """
    if num_batches is not None and num_batches <= 0:
        raise ShiraInputError(f"compute_mask_grads: num_batches must be positive or None, got {num_batches}")
    targets = _target_weights(model, config)
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = {path: w.grad for path, (w, _) in targets.items()}
    was_training = model.training
    device = next(iter(targets.values()))[0].device
    grads: dict[str, torch.Tensor] = {}
    seen = 0
    try:
        model.requires_grad_(False)
        for weight, _ in targets.values():
            weight.requires_grad_(True)
            weight.grad = None
        model.eval()
        bar = tqdm(total=num_batches, desc="calibration", file=sys.stderr, disable=not progress)
        for batch in dataloader:
            if num_batches is not None and seen >= num_batches:
                break
            if not isinstance(batch, Mapping):
                raise ShiraInputError(
                    f"compute_mask_grads: batch {seen} is a {type(batch).__name__}, expected a mapping of "
                    "model inputs (input_ids, attention_mask, labels, ...)"
                )
            loss = getattr(model(**_to_device(batch, device)), "loss", None)
            if loss is None:
                raise ShiraInputError(
                    f"compute_mask_grads: batch {seen} gave no loss (keys {sorted(batch)}): include `labels`"
                )
            loss.backward()
            for path, (weight, transposed) in targets.items():
                if weight.grad is None:
                    raise ShiraInputError(
                        f"compute_mask_grads: batch {seen}'s loss gave no gradient to the weight of targeted "
                        f"module {path!r} (the forward does not use it): leave it out of target_modules"
                    )
                g = weight.grad.detach().abs().to(torch.float32)
                g = g.t() if transposed else g
                grads[path] = g.clone() if path not in grads else grads[path].add_(g)
                weight.grad = None
            seen += 1
            bar.update(1)
        bar.close()
    finally:
        for p, flag in zip(params, saved_flags):
            p.requires_grad_(flag)
        for path, (weight, _) in targets.items():
            weight.grad = saved_grads[path]
        model.train(was_training)
    if seen == 0:
        raise ShiraInputError("compute_mask_grads: the dataloader yielded no batches")
    return {path: g.contiguous() for path, g in grads.items()}
