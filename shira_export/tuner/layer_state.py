"""Everything a ShiraLayer derives from its adapters and its weight, behind one object.

One rule for all derived data: a value is reused only while its key is unchanged, and
keys are compared in one place (`LayerState._get`). A key holds the ids of the tensors
the value was computed from (held with it, so no other tensor can take those ids), and
the weight's *generation*, which moves whenever the weight is not as this layer's
last write left it (another tensor, or its version moved: an optimizer, a load, a DDP
broadcast, a user's in-place edit). Derived, rebuilt on a miss:

- `support(name)`: the SparsePlan and the flat positions in W's storage (int64; int32
  for the native switch); key: the adapter's indices buffer (`.to()` replaces it).
- `base_entries(name)`: W's entries at the support, read with no adapter merged; key:
  the indices, the generation, W's device and dtype.
- `merged_entries(name)`: base + scale * values, for frozen values; key: the base
  entries, the values tensor and its version, the scale. (Trainable values are not
  cached: optimizers writing p.data leave the version as it was.)

Remembered, not derivable (what undoes this layer's own writes): the entries W held
before each merge (`save` / `take_saved`: given back only in the generation they were
read in; otherwise the caller subtracts the delta instead) and the adapter that
training keeps merged (`resident`).

Each cache is kept because dropping it costs measurably (tools/bench_layer_state.py:
median CPU time per switch, one thread, OPT-shaped 24 x 768x768 / LLaMA-shaped
8 x 4096x4096): the support 4.0x / 2.8x, the base entries 1.9x / 2.1x, the int32
positions 1.28x / 1.18x, the merged entries 1.13x / 1.07x; the support also costs a
training step 5 % and every inference call a rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar, cast

import torch

from shira_export.tuner.sparse_ops import SparsePlan, gather_flat, scatter_flat_, storage_index

__all__ = ["LayerState", "Resident", "Support", "merged_values", "scaled_delta"]

_T = TypeVar("_T")


def scaled_delta(values: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * values, detached (scale 1: the values themselves, no op)."""
    return values.detach() if scale == 1.0 else values.detach() * scale


def merged_values(base: torch.Tensor, values: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """base + scale * values, summed in fp32, in `dtype`."""
    return (base.to(torch.float32) + scaled_delta(values, scale).to(torch.float32)).to(dtype)


@dataclass
class Support:
    """What an adapter's indices give on their device."""

    plan: SparsePlan
    flat: torch.Tensor  # int64 positions in the weight's storage (1-D scatter and
    # index_select run 3-5x faster on CPU than 2-D advanced indexing)
    _flat32: Optional[torch.Tensor] = field(default=None, repr=False)

    def flat32(self) -> torch.Tensor:
        """The positions as int32, for the native switch (half the bytes to read)."""
        if self._flat32 is None:
            self._flat32 = self.flat.to(torch.int32)
        return self._flat32


@dataclass(frozen=True)
class Resident:
    """An adapter merged by training: W holds base + scale * values at its support."""

    name: str
    generation: int  # the weight's generation after our write
    base: torch.Tensor  # W's entries at the support before the merge
    values: torch.Tensor  # a copy of the values merged
    scale: float


class LayerState:
    """Derived data and undo memory of one ShiraLayer (shape and storage layout fixed)."""

    def __init__(self, shape: tuple[int, int], *, transposed: bool) -> None:
        self.shape = shape
        self.transposed = transposed
        # (kind, adapter) -> (key, value, the tensors whose ids the key holds: kept alive
        # here, so that no other tensor can take one of those ids)
        self._entries: dict[tuple[str, str], tuple[tuple, Any, tuple]] = {}
        self._stamp: Optional[tuple[torch.Tensor, int]] = None  # (W, W._version) after our last write
        self._generation = 0
        self._saved: dict[str, tuple[torch.Tensor, int]] = {}  # adapter -> (entries before its merge, generation)
        self.resident: Optional[Resident] = None

    # ---- the one invalidation rule ------------------------------------------------------
    def _get(self, kind: str, name: str, key: tuple) -> Any:
        """The value stored under (kind, name) if it was stored with this key, else None."""
        entry = self._entries.get((kind, name))
        return entry[1] if entry is not None and entry[0] == key else None

    def _lookup(self, kind: str, name: str, key: tuple, refs: tuple, build: Callable[[], _T]) -> _T:
        value = self._get(kind, name, key)
        if value is None:
            value = build()
            self._entries[(kind, name)] = (key, value, refs)
        return cast(_T, value)

    def generation(self, weight: torch.Tensor) -> int:
        """Moves whenever `weight` is not as our last write left it."""
        stamp = self._stamp
        if stamp is None or stamp[0] is not weight or stamp[1] != weight._version:
            self._generation += 1
            self._stamp = (weight, weight._version)
        return self._generation

    def wrote(self, weight: torch.Tensor) -> None:
        """Our own write to `weight` just happened (`generation` was read before it): the
        generation stays."""
        self._stamp = (weight, weight._version)

    def write(self, weight: torch.Tensor, flat: torch.Tensor, src: torch.Tensor) -> None:
        """weight[flat] = src (in place), recorded as our own write."""
        self.generation(weight)  # a write by someone else before ours still moves it
        scatter_flat_(weight, flat, src.to(weight.device))
        self.wrote(weight)

    def drop(self, name: str) -> None:
        """Forget everything about adapter `name` (deleted)."""
        for key in [k for k in self._entries if k[1] == name]:
            del self._entries[key]
        self._saved.pop(name, None)

    # ---- derived data -----------------------------------------------------------------
    def support(self, name: str, indices: torch.Tensor) -> Support:
        def build() -> Support:
            return Support(
                SparsePlan.build(indices, self.shape), storage_index(indices, self.shape, transposed=self.transposed)
            )

        return self._lookup("support", name, (id(indices),), (indices,), build)

    def _base_key(self, indices: torch.Tensor, weight: torch.Tensor) -> tuple:
        return (id(indices), self.generation(weight), weight.device, weight.dtype)

    def base_entries(self, name: str, indices: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """W's entries at the support. Call only while no adapter is merged: read then,
        they would include its values where the supports overlap."""
        flat = self.support(name, indices).flat
        return self._lookup(
            "base", name, self._base_key(indices, weight), (indices,), lambda: gather_flat(weight, flat)
        )

    def cached_base_entries(self, name: str, indices: torch.Tensor, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """The base entries if they were read in this generation, else None (not read now)."""
        return self._get("base", name, self._base_key(indices, weight))

    def merged_entries(
        self, name: str, base: torch.Tensor, values: torch.Tensor, scale: float, dtype: torch.dtype
    ) -> torch.Tensor:
        """base + scale * values at the support, in `dtype` (summed in fp32)."""

        def build() -> torch.Tensor:
            return merged_values(base, values, scale, dtype)

        if values.requires_grad:  # trainable: optimizers writing p.data change it with no new version
            return build()
        key = (id(base), id(values), values._version, scale, dtype)
        return self._lookup("merged", name, key, (base, values), build)

    # ---- undo memory ------------------------------------------------------------------
    def save(self, name: str, entries: torch.Tensor, weight: torch.Tensor) -> None:
        """Entries W held at `name`'s support before `name` was merged."""
        self._saved[name] = (entries, self.generation(weight))

    def saved(self, name: str, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """The saved entries (on W's device, in its dtype) if nothing but us wrote W since."""
        entries, generation = self._saved[name]
        if generation != self.generation(weight):
            return None
        return (
            entries
            if entries.dtype == weight.dtype and entries.device == weight.device
            else entries.to(weight.device, weight.dtype)
        )

    def take_saved(self, name: str, weight: torch.Tensor) -> Optional[torch.Tensor]:
        entries = self.saved(name, weight)
        del self._saved[name]
        return entries
