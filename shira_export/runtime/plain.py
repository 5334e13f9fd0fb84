"""One onnxruntime session over a merged export folder (or any folder with model.onnx and
the standard input names): the same calls as `ShiraSession`, with no adapters, so
`ShiraORTModelForCausalLM` generates from merged graphs of every exporter alike."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from shira_export.errors import ShiraInputError

__all__ = ["PlainSession"]

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class _Folder:
    folder: Path  # what `ShiraSession.manifest` offers its readers


class PlainSession:
    """`PlainSession(folder)`; `.run(feeds)` -> {output: array}. `adapter` must be None (or
    a list of None per row)."""

    def __init__(
        self,
        folder: PathLike,
        *,
        file_name: str = "model.onnx",
        providers: Optional[Sequence[str]] = None,
        session_options: Optional[object] = None,
    ) -> None:
        import onnxruntime as ort

        folder = Path(folder)
        path = folder / file_name
        if not path.is_file():
            raise ShiraInputError(f"{path}: ONNX model not found (expected an export folder with {file_name})")
        self.manifest = _Folder(folder)
        try:
            self.session = ort.InferenceSession(str(path), session_options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own classes for unreadable models
            raise ShiraInputError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:300]})") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def adapters(self) -> list[str]:
        return []

    def run_ort_values(
        self, feeds: Mapping[str, object], *, adapter: object = None, output_names: Optional[Sequence[str]] = None
    ) -> list:
        """Run with OrtValue (or numpy) feeds; returns OrtValues (no copies, for KV caches)."""
        import onnxruntime as ort

        if adapter is not None and not (isinstance(adapter, (list, tuple)) and all(a is None for a in adapter)):
            raise ShiraInputError(
                f"{self.manifest.folder}: a merged export has no adapters to choose (found adapter={adapter!r})"
            )
        unknown = sorted(set(feeds) - set(self.input_names))
        if unknown:
            raise ShiraInputError(f"unknown inputs {unknown}; the graph takes {self.input_names}")
        values = {
            k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))
            for k, v in feeds.items()
        }
        return self.session.run_with_ort_values(list(output_names or self.output_names), values, ort.RunOptions())

    def run(
        self, feeds: Mapping[str, np.ndarray], *, adapter: object = None, output_names: Optional[Sequence[str]] = None
    ) -> dict[str, np.ndarray]:
        names = list(output_names or self.output_names)
        outs = self.run_ort_values(feeds, adapter=adapter, output_names=names)
        return {n: o.numpy() for n, o in zip(names, outs)}
