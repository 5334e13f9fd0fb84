"""Weighted fusion of SHiRA adapters: the union of their supports, values summed
where they overlap. The result is padded with explicit zeros to r*(in+out) entries
per layer (one r for all layers) because PEFT sizes each layer's values from r."""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import nn

from shira_export.tuner.checkpoint import AdapterCheckpoint, SparseDelta
from shira_export.tuner.config import MaskType
from shira_export.tuner.masks import layer_shape


def _union(parts: list[tuple[torch.Tensor, torch.Tensor]], in_features: int) -> SparseDelta:
    flat = torch.cat([idx[0] * in_features + idx[1] for idx, _ in parts])
    vals = torch.cat([v.to(torch.float32) for _, v in parts])
    keys, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    summed = torch.zeros(keys.numel(), dtype=torch.float32).index_add_(0, inverse, vals)
    return SparseDelta(torch.stack([keys // in_features, keys % in_features]), summed)


def _pad(delta: SparseDelta, target_nnz: int, out_f: int, in_f: int) -> SparseDelta:
    """Add zero-valued positions (lowest free flat indices) until nnz == target_nnz."""
    extra = target_nnz - delta.nnz
    if extra <= 0:
        return delta
    taken = torch.zeros(out_f * in_f, dtype=torch.bool)
    taken[delta.indices[0] * in_f + delta.indices[1]] = True
    free = torch.nonzero(~taken).flatten()[:extra]
    flat = torch.cat([delta.indices[0] * in_f + delta.indices[1], free])
    vals = torch.cat([delta.values, torch.zeros(extra)])
    order = torch.argsort(flat)
    flat = flat[order]
    return SparseDelta(torch.stack([flat // in_f, flat % in_f]), vals[order])


def fuse_deltas(
    ckpts: Sequence[AdapterCheckpoint], weights: Sequence[float], name: str, model: nn.Module
) -> AdapterCheckpoint:
    modules: dict[str, nn.Module] = dict(model.named_modules())
    shapes: dict[str, tuple[int, int]] = {}
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for ckpt, weight in zip(ckpts, weights):
        for path, delta in ckpt.deltas.items():
            shapes[path] = layer_shape(getattr(modules[path], "base_layer", modules[path]))
            parts.setdefault(path, []).append((delta.indices, delta.values * float(weight)))
    fused = {path: _union(p, shapes[path][1]) for path, p in parts.items()}
    r = max(math.ceil(d.nnz / sum(shapes[p])) for p, d in fused.items())
    r = min(r, min(o * i // (o + i) for o, i in shapes.values()))
    deltas = {p: _pad(d, r * sum(shapes[p]), *shapes[p]) for p, d in fused.items()}
    config = copy.copy(ckpts[0].config)
    config.r = r
    config.mask_type = MaskType.CUSTOM
    config.mask_fn = None
    config.inference_mode = True
    config.target_modules = sorted(deltas)
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for ckpt in ckpts:  # a head (modules_to_save) cannot be fused: take the first adapter's
        for path, state in ckpt.modules_to_save.items():
            heads.setdefault(path, state)
    return AdapterCheckpoint(config=config, deltas=deltas, modules_to_save=heads, name=name)
