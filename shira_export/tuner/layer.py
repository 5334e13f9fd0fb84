"""The SHiRA layer over nn.Linear or transformers' GPT-2 Conv1D.

Per adapter: values are a dense 1-D Parameter, indices an int64 [2, nnz] buffer in
(out, in) orientation (row 0 = output index), sorted row-major. The unmerged forward
adds the sparse delta on the activations (cost ~ nnz per token): the base weight is
never copied. Merging scatters values into the base weight in place and keeps the
original entries at the support, so unmerging restores the weight bit for bit.

Training keeps the adapter being trained merged the same way ("resident"): its nnz
entries are rewritten when the values change (once per optimizer step), so a step costs
the base layer's matmuls plus the values' sampled gradient. Everything else that reads
the weight (eval mode, a no-grad or disabled forward, merge/unmerge/switch, state_dict,
load_state_dict, adding an adapter) first puts the base entries back (`settle`).
"""

from __future__ import annotations

from typing import Iterable, Optional, cast

import torch
from torch import nn
from torch.autograd.graph import increment_version

from shira_export import _native
from shira_export.tuner.layer_state import LayerState, Resident, merged_values, scaled_delta
from shira_export.tuner.masks import layer_shape
from shira_export.tuner.mixed import current_rows, mixed_layer_forward
from shira_export.tuner.sparse_ops import SparsePlan, gather_flat, merged_weight_linear, sparse_linear_delta


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def _settle_hook(module: "ShiraLayer", *args, **kwargs) -> None:
    module.settle()  # state_dict / load_state_dict see (and write) the base weight


class _BufferDict(nn.Module):
    """Named buffers that follow .to()/.cuda() with the module (indices per adapter)."""

    def __getitem__(self, key: str) -> torch.Tensor:
        return cast(torch.Tensor, self._buffers[key])  # __setitem__ stores tensors only

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value, persistent=False)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def keys(self) -> Iterable[str]:
        return self._buffers.keys()


class ShiraLayer(nn.Module):
    """A base linear layer plus any number of named sparse adapters."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.out_features, self.in_features = layer_shape(base_layer)
        # Conv1D stores its weight as (in, out): index it with (col, row).
        self.transposed_storage = not isinstance(base_layer, nn.Linear)
        self.shira_weight = nn.ParameterDict()
        self.shira_indices = _BufferDict()
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []  # a stack: unmerge pops in reverse order
        self.disable_adapters = False
        # Derived data (plans, storage positions, base and merged entries) and what undoes
        # our own writes (saved entries, the resident adapter), with one invalidation rule.
        self._state = LayerState((self.out_features, self.in_features), transposed=self.transposed_storage)
        # A weight shared with another module (a tied head) must never hold W + S between
        # calls: train such a layer with the delta on the activations instead.
        self.weight_shared = False
        self.resident = True  # False: train on the delta path too (ShiraModel.resident_training)
        self.train(base_layer.training)  # a new wrapper follows the model's train/eval mode
        self.register_state_dict_pre_hook(_settle_hook)
        self.register_load_state_dict_pre_hook(_settle_hook)

    # ---- adapters ----------------------------------------------------------------
    def add_adapter(self, name: str, indices: torch.Tensor, values: torch.Tensor, *, trainable: bool) -> None:
        """Install adapter `name` from validated, row-major sorted (out, in) indices."""
        if name in self.shira_weight:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        weight = self.weight
        indices = indices.to(device=weight.device, dtype=torch.int64).contiguous()
        self.shira_indices[name] = indices
        self.shira_weight[name] = nn.Parameter(
            values.detach().to(device=weight.device, dtype=values.dtype).clone(), requires_grad=trainable
        )
        self.scaling[name] = 1.0

    def delete_adapter(self, name: str) -> None:
        self.settle()
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged: unmerge it before deleting it")
        del self.shira_weight[name]
        del self.shira_indices[name]
        self.scaling.pop(name, None)
        self._state.drop(name)
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def nnz(self, name: str) -> int:
        return int(self.shira_weight[name].numel())

    def plan(self, name: str) -> SparsePlan:
        return self._state.support(name, self.shira_indices[name]).plan

    @property
    def _resident(self) -> Optional[Resident]:  # read by ShiraModel's warning and tests
        return self._state.resident

    # ---- merge / unmerge ------------------------------------------------------------
    def _flat(self, name: str) -> torch.Tensor:
        return self._state.support(name, self.shira_indices[name]).flat

    def _scaled_values(self, name: str) -> torch.Tensor:
        """scale * values for forward, differentiable (scale 1: the parameter itself, no op)."""
        scale = self.scaling[name]
        return self.shira_weight[name] if scale == 1.0 else self.shira_weight[name] * scale

    def delta_values(self, name: str) -> torch.Tensor:
        return scaled_delta(self.shira_weight[name], self.scaling[name])

    def _merged_entries(self, name: str, base: torch.Tensor, *, cached: bool = True) -> torch.Tensor:
        """base + scale * values at the support (cached for frozen values)."""
        values, scale, dtype = self.shira_weight[name], self.scaling[name], self.weight.dtype
        if not cached:
            return merged_values(base, values, scale, dtype)
        return self._state.merged_entries(name, base, values, scale, dtype)

    @torch.no_grad()
    def merge(self, adapter_names: Optional[Iterable[str]] = None, *, safe_merge: bool = False) -> None:
        self.settle()
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        weight, state = self.weight, self._state
        for name in names:
            if name in self.merged_adapters or name not in self.shira_weight:
                continue
            flat = self._flat(name)
            if self.merged_adapters:  # stacked on another adapter: W's current entries
                saved = gather_flat(weight, flat)
                merged = self._merged_entries(name, saved, cached=False)
            else:  # the base entries (cached: a switch then only writes)
                saved = state.base_entries(name, self.shira_indices[name], weight)
                merged = self._merged_entries(name, saved)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights: the adapter is broken")
            state.save(name, saved, weight)
            state.write(weight, flat, merged)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def switch_merged(self, name: str) -> None:
        """Unmerge what is merged and merge `name` if this layer has it. With one adapter
        merged and the native kernels available, both happen in one blocked pass over
        the weight (the new support's entries are written right after the old one's are
        restored, block by block, while the block's cache lines are still in L1/L2)."""
        self.settle()
        weight, state = self.weight, self._state
        old = self.merged_adapters[0] if len(self.merged_adapters) == 1 else None
        if (
            old is not None
            and old != name
            and name in self.shira_weight
            and not self.transposed_storage
            and weight.numel() < 2**31
            and _native.available(weight)
        ):
            # The new adapter's base entries must be cached already: read now, they would
            # include the old adapter's values where the supports overlap.
            base = state.cached_base_entries(name, self.shira_indices[name], weight)
            old_saved = state.saved(old, weight)
            if base is not None and old_saved is not None:
                merged = self._merged_entries(name, base)
                old_flat = state.support(old, self.shira_indices[old]).flat32()
                new_flat = state.support(name, self.shira_indices[name]).flat32()
                _native.switch_(weight.view(-1), old_flat, old_saved, new_flat, merged)
                increment_version(weight)  # W changed: autograd and our state must see a write
                state.wrote(weight)
                state.take_saved(old, weight)
                state.save(name, base, weight)
                self.merged_adapters = [name]
                self.active_adapters = [name]
                return
        self.unmerge()
        self.active_adapters = [name] if name in self.shira_weight else []
        self.merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take merged adapters out. Normally the saved entries are written back (bit for
        bit); if something else wrote the weight since they were saved, the deltas are
        subtracted instead, as PEFT does, so that the other write survives."""
        self.settle()
        weight, state = self.weight, self._state
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            flat = self._flat(name)
            saved = state.take_saved(name, weight)
            if saved is None:
                current = gather_flat(weight, flat).to(torch.float32)
                saved = (current - self.delta_values(name).to(torch.float32)).to(weight.dtype)
            state.write(weight, flat, saved)

    # ---- training: the trained adapter stays merged between steps ---------------------
    @torch.no_grad()
    def _make_resident(self, name: str) -> None:
        """W holds base + scale * values of `name` at its support, for the current
        values: rewritten (O(nnz), no read of W) when they differ from what W holds.
        Compared by content, not by version: optimizers that write p.data (fused
        AdamW, the Trainer's default) leave the version as it was."""
        weight, state = self.weight, self._state
        res = state.resident
        if res is not None and (res.name != name or res.generation != state.generation(weight)):
            self.settle()
            res = None
        values, scale = self.shira_weight[name].detach(), self.scaling[name]
        if res is not None and res.scale == scale and torch.equal(values, res.values):
            return  # unchanged: no write, so graphs built since the last write stay valid
        base = res.base if res is not None else state.base_entries(name, self.shira_indices[name], weight)
        state.write(weight, self._flat(name), self._merged_entries(name, base, cached=False))
        if res is not None:
            res.values.copy_(values)
            values = res.values
        else:
            values = values.clone()
        state.resident = Resident(name, state.generation(weight), base, values, scale)

    @torch.no_grad()
    def settle(self) -> None:
        """Put back the base entries that training left merged (no-op when none are).
        If the support no longer holds what we wrote (something else wrote there), only
        our delta is taken out, as unmerge does, so that the other write survives."""
        state = self._state
        res, state.resident = state.resident, None
        if res is None:
            return
        weight = self.weight
        flat = self._flat(res.name)
        base = res.base.to(weight.device)
        if res.generation == state.generation(weight):  # only our writes since the merge
            state.write(weight, flat, base)  # bit for bit
            return
        # Compared by content: a deep copy or .to() gives W a new version but the same entries.
        merged = (base.to(torch.float32) + res.values.to(weight.device, torch.float32) * res.scale).to(weight.dtype)
        current = gather_flat(weight, flat)
        if torch.equal(current, merged):
            state.write(weight, flat, base)
        else:  # remove only what our write added
            state.write(weight, flat, current.to(torch.float32) - (merged.to(torch.float32) - base.to(torch.float32)))

    def train(self, mode: bool = True) -> "ShiraLayer":
        if not mode and self._state.resident is not None:
            self.settle()  # eval mode reads W as the base weight
        return super().train(mode)

    @property
    def weight(self) -> torch.Tensor:  # models that read `module.weight` (RWKV, tied heads), as PEFT's layers
        # nn.Linear's or Conv1D's Parameter (torch types a Module attribute as Tensor | Module)
        return cast(torch.Tensor, self.base_layer.weight)

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return cast("Optional[torch.Tensor]", self.base_layer.bias)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def dense_delta(self, name: str) -> torch.Tensor:
        """The (out, in) dense delta (for tests and exports; never used in forward)."""
        delta = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=self.weight.device)
        rows, cols = self.shira_indices[name]
        delta[rows, cols] = self.delta_values(name).to(torch.float32)
        return delta

    # ---- forward ----------------------------------------------------------------------
    def _training_adapter(self) -> Optional[str]:
        """The one adapter this call trains, when the fast merged path applies: train mode
        (eval mode never writes W, so concurrent inference stays safe). A no-grad forward
        in train mode takes it too, so that reentrant gradient checkpointing computes its
        first pass (no grad) and its recompute (grad) the same way. Hooks on the base
        layer need its own forward: such a layer uses the delta path, and they run."""
        if (
            not self.training
            or not self.resident
            or self.merged_adapters
            or self.weight_shared
            or len(self.active_adapters) != 1
            or _has_hooks(self.base_layer)
        ):
            return None
        name = self.active_adapters[0]
        if name not in self.shira_weight or not self.shira_weight[name].requires_grad:
            return None
        return name

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.disable_adapters and current_rows() is not None:
            self.settle()
            return mixed_layer_forward(self, x, *args, **kwargs)  # adapter_names=[...]: one per row
        name = None if self.disable_adapters else self._training_adapter()
        if name is not None:
            # Training: W holds W + S (rewritten only when the values changed), so the
            # step costs a base layer plus the values' sampled gradient; W gets none.
            self._make_resident(name)
            return merged_weight_linear(
                x,
                self.weight,
                self.bias,
                self._scaled_values(name),
                self.plan(name),
                transposed=self.transposed_storage,
            )
        self.settle()
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        # Inference (or several adapters): the delta on the activations; W is only read,
        # so concurrent calls on one model are safe.
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self.merged_adapters or name not in self.shira_weight:
                continue
            values = self._scaled_values(name)
            result = result + sparse_linear_delta(x, values, self.plan(name)).to(result.dtype)
        return result

    def extra_repr(self) -> str:
        parts = [f"{n}: nnz={self.nnz(n)}, scale={self.scaling[n]}" for n in self.shira_weight.keys()]
        return "adapters=[" + "; ".join(parts) + "]"
