"""One onnxruntime session over a sparse export folder; the adapter is chosen per call.

Two modes (the folder is the same):

- `Mode.DENSE` (default, fastest): the session runs a variant of `model.onnx` in which
  each targeted weight is an overridable input `shira.<module>.weight`. Loading an adapter
  builds its merged copies of the targeted weights once; a call feeds them. Switching is
  free and calls never share mutable state, so concurrent calls with different adapters
  are safe. Cost: one copy of the targeted weights per loaded adapter (for OPT-125m with
  q/k/v/out targeted, 113 MB per adapter).
- `Mode.PORTABLE`: `model.onnx` as written, adapters as onnxruntime `LoraAdapter`s
  activated per call through `RunOptions`, which is exactly what a C#/Java/C++/JS user
  of plain onnxruntime runs. Memory per adapter: its file (8 bytes per nonzero).
"""

from __future__ import annotations

import enum
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from shira_export.errors import ShiraInputError
from shira_export.export.adapter_file import AdapterArrays, read_adapter_file
from shira_export.export.graph_delta import PREFIX, TargetSite, to_dense_variant, weight_name
from shira_export.export.manifest import SparseManifest, read_sparse_manifest

__all__ = ["Mode", "ShiraSession"]

PathLike = Union[str, os.PathLike]


class Mode(str, enum.Enum):
    DENSE = "dense"
    PORTABLE = "portable"


@dataclass
class _Loaded:
    name: str
    arrays: AdapterArrays
    feeds: dict  # dense: weight input name -> OrtValue
    keep: list  # numpy arrays behind the OrtValues
    lora: object = None  # portable: onnxruntime.LoraAdapter

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.keep))


class ShiraSession:
    """Open a sparse export folder once; run it with any loaded adapter (None = base model).

    >>> s = ShiraSession("out")                       # loads every adapter in the manifest
    >>> s.run({"input_ids": ids, ...}, adapter="a")   # dict of outputs (numpy)
    """

    def __init__(
        self,
        folder: PathLike,
        *,
        mode: Union[Mode, str, None] = None,
        adapters: Union[str, Sequence[str], None] = "all",
        providers: Optional[Sequence[str]] = None,
        session_options: Optional[object] = None,
    ) -> None:
        import onnx
        import onnxruntime as ort

        self.manifest: SparseManifest = read_sparse_manifest(folder)
        quantized = self.manifest.quantization
        try:
            # dense mode feeds merged fp32 weights: a quantized base has none, so it runs portable
            self.mode = Mode(mode) if mode is not None else (Mode.PORTABLE if quantized else Mode.DENSE)
        except ValueError:
            raise ShiraInputError(f"mode: expected one of {[m.value for m in Mode]}, found {mode!r}") from None
        if quantized and self.mode is Mode.DENSE:
            raise ShiraInputError(f"{self.manifest.folder}: the base weights are quantized ({quantized}); mode "
                                  f"'dense' feeds fp32 merged weights: use mode='portable' (the default here)")
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
        hidden = {i.name for i in self.session.get_inputs() if i.name.startswith(PREFIX + ".")}
        self.input_names = [i.name for i in self.session.get_inputs() if i.name not in hidden]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._lock = threading.Lock()
        self._loaded: dict[str, _Loaded] = {}
        names = list(self.manifest.adapters) if adapters == "all" else list(adapters or [])
        for name in names:
            self.load_adapter(name)

    def _serialize(self, model) -> Union[bytes, str]:
        import onnx

        from shira_export.export.onnx_io import needs_external_data

        if not needs_external_data(model):
            return model.SerializeToString()
        self._tmp = tempfile.TemporaryDirectory(prefix="shira_dense_")
        path = Path(self._tmp.name) / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx_data")
        return str(path)

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

        entry: Mapping = {}
        if path is None:
            if name not in self.manifest.adapters:
                raise ShiraInputError(f"adapter {name!r}: not in {self.manifest.folder}/shira_export.json "
                                      f"(known: {sorted(self.manifest.adapters)}); pass its file as path")
            path = self.manifest.adapter_path(name)
            entry = self.manifest.adapters[name]
        arrays = read_adapter_file(path, self.manifest.targets, fingerprint=self.manifest.base_fingerprint,
                                   sha256=entry.get("sha256"), nnz=entry.get("nnz"))
        loaded = _Loaded(name, arrays, dict(self._base_feeds), [])
        if self.mode is Mode.DENSE:
            sites = {s.module: s for s in self.manifest.targets}
            for module, (idx, vals) in arrays.deltas.items():
                merged = _merge(self._base[module], sites[module], idx, vals)
                loaded.keep.append(merged)
                loaded.feeds[weight_name(module)] = ort.OrtValue.ortvalue_from_numpy(merged)
        else:
            lora = ort.LoraAdapter()
            lora.Load(str(path))
            loaded.lora = lora
        with self._lock:
            self._loaded[name] = loaded

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if self._loaded.pop(name, None) is None:
                raise ShiraInputError(f"adapter {name!r}: not loaded (loaded: {sorted(self._loaded)})")

    def adapter_nbytes(self, name: str) -> int:
        """Memory this adapter holds in this session (merged weights in dense mode)."""
        return self._get(name).nbytes

    def _get(self, name: str) -> _Loaded:
        try:
            return self._loaded[name]
        except KeyError:
            raise ShiraInputError(f"adapter {name!r}: not loaded (loaded: {sorted(self._loaded)}; None = base model)") from None

    # running ----------------------------------------------------------------------------

    def prepare(self, adapter: Optional[str]) -> tuple[dict, object]:
        """(extra OrtValue feeds, RunOptions) that select `adapter` for one call: the whole
        cost of switching. Nothing is shared between calls, so this is thread-safe. The
        options hold the adapter (onnxruntime's RunOptions keeps only a raw pointer to a
        LoraAdapter): keep them until the call returns, and a concurrent load_adapter or
        unload_adapter of that name cannot free it under the call."""
        options = _RunOptions()
        if adapter is None:
            return self._base_feeds, options
        loaded = self._get(adapter)
        options.hold = loaded
        if loaded.lora is not None:
            options.add_active_adapter(loaded.lora)
        return loaded.feeds, options

    def run_ort_values(self, feeds: Mapping[str, object], *, adapter: Optional[str] = None,
                       output_names: Optional[Sequence[str]] = None) -> list:
        """Run with OrtValue (or numpy) feeds; returns OrtValues (no copies, for KV caches)."""
        import onnxruntime as ort

        extra, options = self.prepare(adapter)  # `options` keeps the adapter alive through the run
        values = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))
                  for k, v in feeds.items()}
        unknown = sorted(set(values) - set(self.input_names))
        if unknown:
            raise ShiraInputError(f"unknown inputs {unknown}; the graph takes {self.input_names}")
        values.update(extra)
        return self.session.run_with_ort_values(list(output_names or self.output_names), values, options)

    def run(self, feeds: Mapping[str, np.ndarray], *, adapter: Optional[str] = None,
            output_names: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
        """Run once with `adapter` (None = base model); returns {output name: array}."""
        names = list(output_names or self.output_names)
        outs = self.run_ort_values(feeds, adapter=adapter, output_names=names)
        return {n: o.numpy() for n, o in zip(names, outs)}


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
