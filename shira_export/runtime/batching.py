"""Feeds for one call whose rows use different adapters (mixed batches).

The sparse graph takes per site two parts (export.site_layout): `shira.<m>.ell_indices` /
`.ell_values` [R, 1, K * out] and `shira.<m>.indices` / `.values` [R, 1, nnz]: R == 1 applies one
adapter to every row (what an `.onnx_adapter` feeds), R == batch applies row b of the arrays
to row b of the batch. Rows are padded to the site's largest K (at least 1) and nnz with
index 0 / value 0.0 (adds nothing); a base-model row (None) and a row whose adapter does not touch the site
are all padding. A site no row touches is not fed at all (its empty defaults are "no adapter").

Stacking copies every row's arrays, so the stacked OrtValues are cached per adapter
combination (a decode loop asks for the same one every step) in a small cache bounded by
entries and bytes. An entry records which loaded adapter objects it was built from: a
name that was unloaded or loaded again no longer matches and the entry is rebuilt.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from shira_export.errors import ShiraInputError
from shira_export.artifacts.adapter_io import AdapterArrays, batch_parameters

__all__ = ["MixedFeeds", "MixedCache", "check_adapter_list", "stack_rows"]

# A stacked entry costs about batch x (largest adapter's bytes); 8 combinations of 8 rows
# over OPT-125m r=8 adapters (4.7 MB each) take ~300 MB, the byte bound below keeps less.
DEFAULT_ENTRIES = 8
DEFAULT_BYTES = 256 * 2**20


@dataclass
class MixedFeeds:
    """The stacked OrtValues of one adapter combination and what they were built from."""

    names: tuple  # adapter name (or None) per row
    sources: tuple  # the loaded-adapter objects the rows used (None for base rows)
    feeds: dict  # input name -> OrtValue [batch, nnz_max]
    arrays: list  # numpy arrays behind the OrtValues
    nbytes: int


def check_adapter_list(adapter: Sequence[Any], batch: Optional[int]) -> tuple:
    """A per-row adapter list as a tuple of names (None = base model), checked against the batch."""
    names = tuple(adapter)
    bad = [(i, a) for i, a in enumerate(names) if a is not None and not isinstance(a, str)]
    if bad:
        raise ShiraInputError(
            f"adapter list: row {bad[0][0]} is {bad[0][1]!r}; expected an adapter name (str) "
            f"or None (the base model) per row"
        )
    if not names:
        raise ShiraInputError("adapter list: empty; give one adapter name (or None) per row")
    if batch is not None and len(names) != batch:
        raise ShiraInputError(
            f"adapter list: {len(names)} entries for a batch of {batch} rows; give one adapter name (or None) per row"
        )
    return names


def stack_rows(rows: Sequence[Optional[AdapterArrays]]) -> tuple[dict[str, Any], list[np.ndarray], int]:
    """({input name: OrtValue [batch, ...]} for every site some row touches, both parts padded
    with 0 / 0.0 (adapter_io.batch_parameters); the numpy arrays behind them; their bytes)."""
    import onnxruntime as ort

    modules = sorted({m for r in rows if r is not None for m in r.parts})
    params = batch_parameters(rows, modules)
    feeds = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in params.items()}
    return feeds, list(params.values()), int(sum(a.nbytes for a in params.values()))


class MixedCache:
    """LRU cache of stacked feeds per adapter combination, bounded by entries and bytes."""

    def __init__(
        self, entries: int = DEFAULT_ENTRIES, max_bytes: int = DEFAULT_BYTES, *, lock: Optional[Any] = None
    ) -> None:
        if entries < 0 or max_bytes < 0:
            raise ShiraInputError(f"mixed-batch cache: entries and bytes must be >= 0, found {entries}, {max_bytes}")
        self.entries, self.max_bytes = entries, max_bytes
        # the session's lock: an entry is stored only while its adapters are still the loaded
        # ones, and unloading forgets entries under the same lock (no stale entry survives)
        self._lock = lock if lock is not None else threading.RLock()
        self._items: OrderedDict[tuple, MixedFeeds] = OrderedDict()
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def get(self, names: tuple, sources: tuple, current: Callable[[], bool]) -> MixedFeeds:
        """The stacked feeds of rows `names` whose loaded adapters are `sources` (same order);
        a new entry is kept only if `current()` (called under the lock) is still true."""
        with self._lock:
            entry = self._items.get(names)
            if entry is not None and all(a is b for a, b in zip(entry.sources, sources)):
                self._items.move_to_end(names)
                self.hits += 1
                return entry
        feeds, keep, nbytes = stack_rows([None if s is None else s.arrays for s in sources])
        entry = MixedFeeds(names, sources, feeds, keep, nbytes)
        with self._lock:
            self.misses += 1
            if self.entries and nbytes <= self.max_bytes and current():
                self._items[names] = entry
                self._items.move_to_end(names)
                while len(self._items) > self.entries or sum(e.nbytes for e in self._items.values()) > self.max_bytes:
                    self._items.popitem(last=False)
        return entry

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def forget(self, name: str) -> None:
        """Drop every entry with a row of adapter `name` (it was unloaded or replaced)."""
        with self._lock:
            for key in [k for k in self._items if name in k]:
                del self._items[key]
