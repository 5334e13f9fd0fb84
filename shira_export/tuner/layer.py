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

from dataclasses import dataclass
from typing import Iterable, Optional, cast

import torch
from torch import nn
from torch.autograd.graph import increment_version

from shira_export import _native
from shira_export.tuner.masks import layer_shape
from shira_export.tuner.mixed import current_rows, mixed_layer_forward
from shira_export.tuner.sparse_ops import (
    SparsePlan,
    gather_flat,
    merged_weight_linear,
    scatter_flat_,
    sparse_linear_delta,
    storage_index,
)


@dataclass(frozen=True)
class _Resident:
    """An adapter merged by training: what was written, and what W held before."""

    name: str
    weight: torch.Tensor  # the tensor written (.to() or a reassignment makes another one)
    version: int  # weight._version after our write: anything else moves it
    base: torch.Tensor  # W's entries at the support before the merge
    values: torch.Tensor  # a copy of the values merged (W holds base + scale * values)
    scale: float


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


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
        self._plans: dict[str, SparsePlan] = {}
        self._resident: Optional[_Resident] = None
        # A weight shared with another module (a tied head) must never hold W + S between
        # calls: train such a layer with the delta on the activations instead.
        self.weight_shared = False
        self.resident = True  # False: train on the delta path too (ShiraModel.resident_training)
        self.train(base_layer.training)  # a new wrapper follows the model's train/eval mode
        self.register_state_dict_pre_hook(_settle_hook)
        self.register_load_state_dict_pre_hook(_settle_hook)
        self._flat: dict[str, torch.Tensor] = {}  # per adapter: positions in the weight's storage
        self._saved_entries: dict[str, torch.Tensor] = {}
        # Base entries at each adapter's support, read once, so that a switch only writes.
        # Valid while the weight's version is the one our own last write left.
        self._base_entries: dict[str, torch.Tensor] = {}
        # name -> (base entries, values, (values' version, scale), base + scale * values)
        self._merged_cache: dict[str, tuple] = {}
        self._flat32: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._own_version: Optional[int] = None

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
        self._plans.pop(name, None)
        self._flat.pop(name, None)
        self._base_entries.pop(name, None)
        self._merged_cache.pop(name, None)
        self._flat32.pop(name, None)
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def nnz(self, name: str) -> int:
        return int(self.shira_weight[name].numel())

    def plan(self, name: str) -> SparsePlan:
        indices = self.shira_indices[name]
        plan = self._plans.get(name)
        if plan is None or plan.rows.device != indices.device:
            plan = SparsePlan.build(indices, (self.out_features, self.in_features))
            self._plans[name] = plan
        return plan

    # ---- merge / unmerge ------------------------------------------------------------
    def _storage_index(self, name: str) -> torch.Tensor:
        """Flat positions of the adapter's entries in the weight's storage (1-D scatter
        and index_select are 3-5x faster on CPU than 2-D advanced indexing)."""
        indices = self.shira_indices[name]
        flat = self._flat.get(name)
        if flat is None or flat.device != indices.device:
            flat = storage_index(indices, (self.out_features, self.in_features), transposed=self.transposed_storage)
            self._flat[name] = flat
        return flat

    def _storage_index32(self, name: str) -> torch.Tensor:
        """The same positions as int32, for the native switch (half the bytes to read)."""
        flat = self._storage_index(name)
        cached = self._flat32.get(name)
        if cached is None or cached[0] is not flat:
            cached = self._flat32[name] = (flat, flat.to(torch.int32))
        return cached[1]

    def _scaled_values(self, name: str) -> torch.Tensor:
        """scale * values for forward, differentiable (scale 1: the parameter itself, no op)."""
        scale = self.scaling[name]
        return self.shira_weight[name] if scale == 1.0 else self.shira_weight[name] * scale

    def delta_values(self, name: str) -> torch.Tensor:
        scale = self.scaling[name]
        return self.shira_weight[name].detach() if scale == 1.0 else self.shira_weight[name].detach() * scale

    @torch.no_grad()
    def merge(self, adapter_names: Optional[Iterable[str]] = None, *, safe_merge: bool = False) -> None:
        self.settle()
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        weight = self.weight
        for name in names:
            if name in self.merged_adapters or name not in self.shira_weight:
                continue
            index = self._storage_index(name)
            if self.merged_adapters:  # stacked on another adapter: W's current entries
                saved = gather_flat(weight, index)
                merged = self._merged_entries(name, saved)
            else:
                saved = self._base_entries_of(name)
                merged = self._cached_merged_entries(name, saved)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights: the adapter is broken")
            scatter_flat_(weight, index, merged)
            self._own_version = weight._version
            self._saved_entries[name] = saved
            self.merged_adapters.append(name)

    def _merged_entries(self, name: str, saved: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        return (saved.to(torch.float32) + self.delta_values(name).to(torch.float32)).to(weight.dtype)

    def _cached_merged_entries(self, name: str, base_entries: torch.Tensor) -> torch.Tensor:
        """base + scale * values at the support. For frozen values, kept while neither
        the cached base entries nor the values (their version) nor the scale changed."""
        values, state = self.shira_weight[name], (self.shira_weight[name]._version, self.scaling[name])
        if values.requires_grad:  # trainable: optimizers writing p.data change it with no new version
            return self._merged_entries(name, base_entries)
        # Kept with the tensors themselves (compared with `is`): an id() could be reused
        # by a new tensor once the old one is freed.
        cached = self._merged_cache.get(name)
        if cached is None or cached[0] is not base_entries or cached[1] is not values or cached[2] != state:
            cached = self._merged_cache[name] = (base_entries, values, state, self._merged_entries(name, base_entries))
        return cached[3]

    def _base_entries_of(self, name: str) -> torch.Tensor:
        """The base weight's entries at the adapter's support (no adapter merged now).
        Cached: a switch then costs two scatters. Anything else that writes the weight
        bumps its version, which drops the cache."""
        weight = self.weight
        if weight._version != self._own_version:
            self._base_entries.clear()
        entries = self._base_entries.get(name)
        if entries is None:
            entries = self._base_entries[name] = gather_flat(weight, self._storage_index(name))
            self._own_version = weight._version
        return entries

    @torch.no_grad()
    def switch_merged(self, name: str) -> None:
        """Unmerge what is merged and merge `name` if this layer has it. With one adapter
        merged and the native kernels available, both happen in one blocked pass over
        the weight (the new support's entries are written right after the old one's are
        restored, block by block, while the block's cache lines are still in L1/L2)."""
        self.settle()
        weight = self.weight
        old = self.merged_adapters[0] if len(self.merged_adapters) == 1 else None
        # The new adapter's base entries must be cached already: read now, they would
        # include the old adapter's values where the supports overlap.
        if (old is not None and old != name and name in self._base_entries and not self.transposed_storage
                and weight._version == self._own_version and weight.numel() < 2**31 and _native.available(weight)):
            base = self._base_entries[name]
            merged = self._cached_merged_entries(name, base)
            _native.switch_(weight.view(-1), self._storage_index32(old), self._saved_entries.pop(old),
                            self._storage_index32(name), merged)
            increment_version(weight)  # W changed: autograd and our caches must see a write
            self._own_version = weight._version
            self._saved_entries[name] = base
            self.merged_adapters = [name]
            self.active_adapters = [name]
            return
        self.unmerge()
        self.active_adapters = [name] if name in self.shira_weight else []
        self.merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take merged adapters out. Normally the saved entries are written back (bit for
        bit); if something else wrote the weight while merged (its version moved), the
        deltas are subtracted instead, as PEFT does, so that the other write survives."""
        self.settle()
        weight = self.weight
        cache_valid = weight._version == self._own_version
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            index = self._storage_index(name)
            saved = self._saved_entries.pop(name)
            if not cache_valid:
                current = gather_flat(weight, index).to(torch.float32)
                saved = (current - self.delta_values(name).to(torch.float32)).to(weight.dtype)
            scatter_flat_(weight, index, saved)
        if cache_valid:  # our own restore: the cached base entries still hold
            self._own_version = weight._version

    # ---- training: the trained adapter stays merged between steps ---------------------
    @torch.no_grad()
    def _make_resident(self, name: str) -> None:
        """W holds base + scale * values of `name` at its support, for the current
        values: rewritten (O(nnz), no read of W) when they differ from what W holds.
        Compared by content, not by version: optimizers that write p.data (fused
        AdamW, the Trainer's default) leave the version as it was."""
        weight = self.weight
        res = self._resident
        if res is not None and (res.name != name or res.weight is not weight or weight._version != res.version):
            self.settle()
            res = None
        values, scale = self.shira_weight[name].detach(), self.scaling[name]
        if res is not None and res.scale == scale and torch.equal(values, res.values):
            return  # unchanged: no write, so graphs built since the last write stay valid
        base = res.base if res is not None else self._base_entries_of(name)
        scatter_flat_(weight, self._storage_index(name), self._merged_entries(name, base))
        if res is not None:
            res.values.copy_(values)
            values = res.values
        else:
            values = values.clone()
        self._resident = _Resident(name, weight, weight._version, base, values, scale)

    @torch.no_grad()
    def settle(self) -> None:
        """Put back the base entries that training left merged (no-op when none are).
        If the support no longer holds what we wrote (something else wrote there), only
        our delta is taken out, as unmerge does, so that the other write survives."""
        res, self._resident = self._resident, None
        if res is None:
            return
        weight = self.weight
        index = self._storage_index(res.name)
        base = res.base.to(weight.device)
        if res.weight is weight and weight._version == res.version:  # only our writes since the merge
            scatter_flat_(weight, index, base)  # bit for bit
            self._own_version = weight._version  # the cached base entries hold again
            return
        # Compared by content: a deep copy or .to() gives W a new version but the same entries.
        merged = (base.to(torch.float32) + res.values.to(weight.device, torch.float32) * res.scale).to(weight.dtype)
        current = gather_flat(weight, index)
        if torch.equal(current, merged):
            scatter_flat_(weight, index, base)
        else:  # remove only what our write added
            scatter_flat_(weight, index, current.to(torch.float32) - (merged.to(torch.float32) - base.to(torch.float32)))

    def train(self, mode: bool = True) -> "ShiraLayer":
        if not mode and self._resident is not None:
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
        if (not self.training or not self.resident or self.merged_adapters or self.weight_shared
                or len(self.active_adapters) != 1 or _has_hooks(self.base_layer)):
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
            return merged_weight_linear(x, self.weight, self.bias, self._scaled_values(name), self.plan(name),
                                        transposed=self.transposed_storage)
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
