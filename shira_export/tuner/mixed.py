"""Mixed-adapter batches: `model(..., adapter_names=["a", "b", "__base__"])` runs each row
of the batch with its own adapter (or none), as PEFT offers for LoRA.

The names live in a context variable for the duration of one call, so concurrent calls
from several threads (each has its own context) do not see each other's rows. Each
SHiRA layer adds, per adapter, the delta of that adapter's rows only (a sub-batch
through the sparse product, scattered back with index_add); each modules_to_save head
runs each group of rows through that adapter's copy. A batch that is a multiple of the
names (beam search, num_return_sequences: transformers repeats each row in place) gets
each name repeated as many times.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Optional, Sequence, cast

import torch

from shira_export.errors import ShiraInputError
from shira_export.tuner.sparse_ops import sparse_linear_delta

__all__ = ["BASE_ROW", "current_rows", "mixed_batch", "mixed_head_forward", "mixed_layer_forward"]

BASE_ROW = "__base__"  # a row without any adapter (PEFT's name)
_ROWS: ContextVar[Optional[tuple[str, ...]]] = ContextVar("shira_adapter_names", default=None)


def current_rows() -> Optional[tuple[str, ...]]:
    """The adapter of each row for the call in progress, or None (no mixed batch)."""
    return _ROWS.get()


@contextmanager
def mixed_batch(adapter_names: Sequence[str]) -> Iterator[None]:
    token = _ROWS.set(tuple(adapter_names))
    try:
        yield
    finally:
        _ROWS.reset(token)


def _groups(batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    names = current_rows() or ()
    if batch != len(names):
        if not names or batch % len(names):
            raise ShiraInputError(
                f"adapter_names has {len(names)} entries but a layer got a batch of {batch} rows "
                f"(expected one name per row, or a batch that is a multiple of them)"
            )
        names = tuple(n for n in names for _ in range(batch // len(names)))
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        rows.setdefault(name, []).append(i)
    return {name: torch.tensor(idx, dtype=torch.int64, device=device) for name, idx in rows.items()}


def mixed_layer_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Base output for every row, plus each adapter's delta on its own rows."""
    result = layer.base_layer(x, *args, **kwargs)
    if x.dim() < 2:
        raise ShiraInputError(f"adapter_names needs batched inputs, a SHiRA layer got shape {tuple(x.shape)}")
    for name, rows in _groups(x.shape[0], x.device).items():
        if name == BASE_ROW or name not in layer.shira_weight:
            continue
        delta = sparse_linear_delta(x.index_select(0, rows), layer._scaled_values(name), layer.plan(name))
        result = result.index_add(0, rows, delta.to(result.dtype))
    return result


def mixed_head_forward(wrapper, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Each group of rows through its adapter's copy of the head (the original for
    "__base__" and for adapters without a copy here)."""
    groups = _groups(x.shape[0], x.device)
    if not groups:  # an empty batch: no rows to route
        return wrapper.original_module(x, *args, **kwargs)
    result: Optional[torch.Tensor] = None
    for name, rows in groups.items():
        module = wrapper.modules_to_save[name] if name in wrapper.modules_to_save else wrapper.original_module
        out = module(x.index_select(0, rows), *args, **kwargs)
        if not isinstance(out, torch.Tensor):
            raise ShiraInputError(
                f"adapter_names: a modules_to_save module returned {type(out).__name__}, "
                f"expected a tensor (mixed batches need per-row outputs)"
            )
        if result is None:
            result = out.new_empty((x.shape[0], *out.shape[1:]))
        result[rows] = out
    return cast(torch.Tensor, result)  # set by the first of the (non-empty) groups
