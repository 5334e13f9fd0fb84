"""One onnxruntime session over a sparse export folder; the adapter is chosen per call.

Three modes over the same folder:

- `Mode.LEAN` (default): `model.onnx` as written; each loaded adapter is kept as its own
  arrays (8 bytes per nonzero, about its file's size) and fed per call as the graph's
  `shira.<m>.indices` / `shira.<m>.values` inputs, exactly the tensors an onnxruntime
  `LoraAdapter` adds to a run. Memory per adapter: its file. A call may give one adapter
  per row (`adapter=["a", "b", None]`: mixed batches, see `runtime.batching`).
- `Mode.PORTABLE`: the same graph with the adapters as onnxruntime `LoraAdapter`s
  activated per call through `RunOptions`, which is exactly what a C#/Java/C++/JS user of
  plain onnxruntime runs. Memory per adapter: the file mapped by onnxruntime plus the
  arrays (mixed batches are stacked from them): about twice its file.
- `Mode.DENSE` (opt-in): a variant of `model.onnx` in which each targeted weight is an
  input `shira.<module>.weight`; loading an adapter builds merged copies of the targeted
  weights, a call feeds them. Decode as fast as a merged model, but one copy of every
  targeted weight per loaded adapter (OPT-125m, q/k/v/out: 108 MB): for a few hot
  adapters. One adapter per call (no mixed batches); fp32 bases only.

Calls never share mutable state: concurrent calls with different adapters are safe, and
loading or unloading an adapter while calls use it is safe (a running call keeps what it
uses alive; a later call with an unloaded name gets a `ShiraInputError`).
"""

from __future__ import annotations

import enum
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union, cast

import numpy as np

from shira_export.errors import ShiraInputError
from shira_export.artifacts.adapter_io import AdapterArrays, read_adapter_file
from shira_export.artifacts.manifest import SparseManifest, read_sparse_manifest
from shira_export.artifacts.naming import (
    PREFIX,
    TargetSite,
    check_graph_contract,
    weight_name,
)
from shira_export.runtime.dense_variant import to_dense_variant
from shira_export.runtime.batching import DEFAULT_BYTES, DEFAULT_ENTRIES, MixedCache, check_adapter_list

__all__ = ["Mode", "ShiraSession", "AdapterChoice"]

PathLike = Union[str, os.PathLike]
# adapter per call: a name, None (the base model), or one of those per row of the batch
AdapterChoice = Union[str, None, Sequence[Optional[str]]]


class Mode(str, enum.Enum):
    LEAN = "lean"
    PORTABLE = "portable"
    DENSE = "dense"


@dataclass
class _Loaded:
    name: str
    arrays: AdapterArrays
    feeds: dict  # per-call OrtValue feeds: lean: its own arrays; dense: merged weights
    keep: list = field(default_factory=list)  # dense: the merged weights behind `feeds`
    lora: object = None  # portable: onnxruntime.LoraAdapter
    file_bytes: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes this adapter holds: its arrays, merged weights (dense), the mapped file (portable)."""
        own = self.arrays.nbytes
        return int(own + sum(a.nbytes for a in self.keep) + (self.file_bytes if self.lora is not None else 0))


class ShiraSession:
    """Open a sparse export folder once; run it with any loaded adapter (None = base model).

    >>> s = ShiraSession("out")                              # lean mode, every adapter of the manifest
    >>> s.run({"input_ids": ids, ...}, adapter="a")          # dict of outputs (numpy)
    >>> s.run({"input_ids": ids3, ...}, adapter=["a", "b", None])  # one adapter per row

    `mode`: "lean" (default), "portable" or "dense" (module docstring). `mixed_cache`:
    how many adapter combinations of mixed batches keep their stacked feeds (0: none).
    """

    def __init__(
        self,
        folder: PathLike,
        *,
        mode: Union[Mode, str, None] = None,
        adapters: Union[str, Sequence[str], None] = "all",
        providers: Optional[Sequence[str]] = None,
        session_options: Optional[object] = None,
        mixed_cache: int = DEFAULT_ENTRIES,
        mixed_cache_bytes: int = DEFAULT_BYTES,
    ) -> None:
        import onnx
        import onnxruntime as ort

        self.manifest: SparseManifest = read_sparse_manifest(folder)
        quantized = self.manifest.quantization
        try:
            self.mode = Mode(mode) if mode is not None else Mode.LEAN
        except ValueError:
            raise ShiraInputError(f"mode: expected one of {[m.value for m in Mode]}, found {mode!r}") from None
        if quantized and self.mode is Mode.DENSE:
            raise ShiraInputError(
                f"{self.manifest.folder}: the base weights are quantized ({quantized}); mode "
                f"'dense' feeds fp32 merged weights: use mode='lean' (the default) or 'portable'"
            )
        if not self.manifest.model_path.is_file():
            raise ShiraInputError(f"{self.manifest.model_path}: model file not found")
        options: Any = session_options or ort.SessionOptions()
        if session_options is None:
            options.log_severity_level = 3  # overridable initializers are intended: silence ORT's warning
        providers = list(providers or ["CPUExecutionProvider"])
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self._base: dict[str, np.ndarray] = {}
        self._base_feeds: dict = {}
        if self.mode is Mode.DENSE:
            model = onnx.load(str(self.manifest.model_path))
            dense, self._base = to_dense_variant(model, self.manifest.targets, defaults=False)
            del model
            # base weights are fed like any adapter's: one copy in memory, no default to override
            self._base_feeds = {weight_name(m): ort.OrtValue.ortvalue_from_numpy(a) for m, a in self._base.items()}
            self.session = ort.InferenceSession(self._serialize(dense), options, providers=providers)
        else:
            self.session = ort.InferenceSession(str(self.manifest.model_path), options, providers=providers)
        graph_inputs = self.session.get_inputs()
        hidden = {i.name for i in graph_inputs if i.name.startswith(PREFIX + ".")}
        self.input_names = [i.name for i in graph_inputs if i.name not in hidden]
        self.output_names = [o.name for o in self.session.get_outputs()]
        if self.mode is not Mode.DENSE:  # inputs with a default are overridable initializers, not get_inputs()
            overridable = {i.name for i in self.session.get_overridable_initializers()}
            check_graph_contract(self.manifest.model_path, self.manifest.targets, overridable)
        self._lock = threading.RLock()
        self._mixed = MixedCache(mixed_cache, mixed_cache_bytes, lock=self._lock)
        self._loaded: dict[str, _Loaded] = {}
        names = list(self.manifest.adapters) if adapters == "all" else list(adapters or [])
        for name in names:
            self.load_adapter(name)

    def _serialize(self, model) -> Union[bytes, str]:
        from shira_export.artifacts.onnx_io import needs_external_data, save_onnx

        if not needs_external_data(model):
            return model.SerializeToString()
        self._tmp = tempfile.TemporaryDirectory(prefix="shira_dense_")
        return str(save_onnx(model, Path(self._tmp.name) / "model.onnx"))  # tensors in model.onnx_data

    # adapters ---------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        return list(self._loaded)

    def load_adapter(self, name: str, path: Optional[PathLike] = None) -> None:
        """Load adapter `name` (its file from the manifest, or `path`); validated against this
        graph's fingerprint and sites (and the manifest's sha256 and size bound for its own
        files). Replaces a loaded adapter of the same name atomically: calls already running
        with the old one keep it alive until they return."""
        import onnxruntime as ort

        if not isinstance(name, str):
            raise ShiraInputError(f"adapter name: expected a str, found {name!r}")
        entry: Mapping = {}
        if path is None:
            if name not in self.manifest.adapters:
                raise ShiraInputError(
                    f"adapter {name!r}: not in {self.manifest.folder}/shira_export.json "
                    f"(known: {sorted(self.manifest.adapters)}); pass its file as path"
                )
            path = self.manifest.adapter_path(name)
            entry = self.manifest.adapters[name]
        arrays = read_adapter_file(
            path,
            self.manifest.targets,
            fingerprint=self.manifest.base_fingerprint,
            sha256=entry.get("sha256"),
            nnz=entry.get("nnz"),
        )
        loaded = _Loaded(name, arrays, dict(self._base_feeds))
        if self.mode is Mode.DENSE:
            sites = {s.module: s for s in self.manifest.targets}
            for module, (idx, vals) in arrays.deltas.items():
                merged = _merge(self._base[module], sites[module], idx, vals)
                loaded.keep.append(merged)
                loaded.feeds[weight_name(module)] = ort.OrtValue.ortvalue_from_numpy(merged)
        elif self.mode is Mode.PORTABLE:
            lora = ort.LoraAdapter()
            lora.Load(str(path))
            loaded.lora, loaded.file_bytes = lora, Path(path).stat().st_size
        else:  # views of the adapter's arrays: no copy
            loaded.feeds.update({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.parameters().items()})
        with self._lock:
            self._loaded[name] = loaded
            self._mixed.forget(name)

    def unload_adapter(self, name: str) -> None:
        """Forget adapter `name`; calls running with it finish with it, later ones are refused."""
        with self._lock:
            if self._loaded.pop(name, None) is None:
                raise ShiraInputError(f"adapter {name!r}: not loaded (loaded: {sorted(self._loaded)})")
            self._mixed.forget(name)

    def adapter_nbytes(self, name: str) -> int:
        """Memory adapter `name` holds in this session: its arrays (8 bytes per nonzero), plus
        the merged weights in dense mode, plus the file onnxruntime maps in portable mode.
        Stacked mixed-batch feeds are counted apart (`mixed_cache_nbytes`)."""
        return self._get(name).nbytes

    @property
    def mixed_cache_nbytes(self) -> int:
        return self._mixed.nbytes

    def _get(self, name: str) -> _Loaded:
        if not isinstance(name, str):
            raise ShiraInputError(
                f"adapter: expected a name (str), None (the base model) or a list of those per row, found {name!r}"
            )
        try:
            return self._loaded[name]
        except KeyError:
            raise ShiraInputError(
                f"adapter {name!r}: not loaded (loaded: {sorted(self._loaded)}; None = base model)"
            ) from None

    # running ----------------------------------------------------------------------------

    def prepare(self, adapter: AdapterChoice, batch: Optional[int] = None) -> tuple[dict, object]:
        """(extra OrtValue feeds, RunOptions) that select `adapter` for one call: the whole
        cost of switching. `adapter` may be a list, one name (or None) per row of a batch of
        `batch` rows. Nothing is shared between calls, so this is thread-safe. The options
        hold what the call uses (onnxruntime's RunOptions keeps only a raw pointer to a
        LoraAdapter): keep them until the call returns, and a concurrent load_adapter or
        unload_adapter of that name cannot free it under the call."""
        if isinstance(adapter, (list, tuple)):
            names = check_adapter_list(adapter, batch)
            if len(set(names)) > 1:
                return self._prepare_rows(names)
            adapter = names[0]  # one adapter for every row: the R = 1 path
        options = _RunOptions()
        if adapter is None:
            return self._base_feeds, options
        loaded = self._get(cast(str, adapter))  # _get names anything else in its error
        options.hold = loaded
        if loaded.lora is not None:
            options.add_active_adapter(loaded.lora)
        return loaded.feeds, options

    def _prepare_rows(self, names: tuple) -> tuple[dict, object]:
        if self.mode is Mode.DENSE:
            raise ShiraInputError(
                f"adapter list {list(names)}: mode 'dense' feeds one set of merged weights per call; "
                f"mixed-adapter batches run in mode 'lean' (the default) or 'portable'"
            )
        sources = tuple(None if n is None else self._get(n) for n in names)

        def current() -> bool:  # called under the lock: no adapter of the rows was unloaded or replaced since
            return all(s is None or self._loaded.get(s.name) is s for s in sources)

        entry = self._mixed.get(names, sources, current)
        options = _RunOptions()
        options.hold = entry  # the stacked arrays and the rows' adapters stay alive through the run
        return entry.feeds, options

    def run_ort_values(
        self,
        feeds: Mapping[str, object],
        *,
        adapter: AdapterChoice = None,
        output_names: Optional[Sequence[str]] = None,
    ) -> list:
        """Run with OrtValue (or numpy) feeds; returns OrtValues (no copies, for KV caches).
        `adapter`: a name, None (base model), or a list with one of those per row."""
        import onnxruntime as ort

        values = {
            k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))
            for k, v in feeds.items()
        }
        unknown = sorted(set(values) - set(self.input_names))
        if unknown:
            raise ShiraInputError(f"unknown inputs {unknown}; the graph takes {self.input_names}")
        extra, options = self.prepare(adapter, _batch(values))  # `options` keeps the adapter alive through the run
        values.update(extra)
        return self.session.run_with_ort_values(list(output_names or self.output_names), values, options)

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        *,
        adapter: AdapterChoice = None,
        output_names: Optional[Sequence[str]] = None,
    ) -> dict[str, np.ndarray]:
        """Run once with `adapter` (None = base model; a list: one per row); returns {output name: array}."""
        names = list(output_names or self.output_names)
        outs = self.run_ort_values(feeds, adapter=adapter, output_names=names)
        return {n: o.numpy() for n, o in zip(names, outs)}


def _batch(values: Mapping[str, Any]) -> Optional[int]:
    """Rows of the call: input_ids' first dimension (else the first input's)."""
    value = values.get("input_ids", next(iter(values.values()), None))
    if value is None:
        return None
    shape = value.shape()
    return int(shape[0]) if len(shape) else None


def _run_options_class() -> type:
    import onnxruntime as ort

    class RunOptions(ort.RunOptions):
        """onnxruntime.RunOptions that also references what it activates."""

        hold: object = None

    return RunOptions


def _RunOptions():  # noqa: N802  (a class, built on first use so importing this module stays light)
    global _RUN_OPTIONS
    if _RUN_OPTIONS is None:
        _RUN_OPTIONS = _run_options_class()
    return _RUN_OPTIONS()


_RUN_OPTIONS: Optional[type] = None


def _merge(base: np.ndarray, site: TargetSite, idx: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """base + delta in the graph's layout; duplicates add up, as in the graph's ScatterND."""
    merged = base.copy()
    rows, cols = np.divmod(idx.astype(np.int64), site.in_features)  # (out, in)
    if site.transposed:
        np.add.at(merged, (rows, cols), vals.astype(merged.dtype))
    else:
        np.add.at(merged, (cols, rows), vals.astype(merged.dtype))
    return merged
