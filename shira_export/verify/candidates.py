"""The candidate side: an export folder described by `OUT_DIR/shira_export.json`.

Merged ONNX folders run in plain ONNX Runtime (`runtime.PlainSession`; greedy generation
with the KV cache through the runtime's loop); merged safetensors folders load with
transformers; sparse folders run through `shira_export.runtime` with the adapter chosen
per call.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Protocol, Union

import numpy as np

from shira_export.artifacts.hf_folder import load_base_model
from shira_export.artifacts.manifest import MANIFEST_NAME, AdapterEntry, Kind, Manifest, SparseManifest
from shira_export.artifacts.manifest import read_manifest as read_any_manifest
from shira_export.artifacts.tasks import Family, graph_feeds, spec_for
from shira_export.errors import ShiraInputError
from shira_export.verify.inputs import InputBatch
from shira_export.verify.reference import TorchRunner
from shira_export.verify.sessions import session_options
from shira_export.verify.sparse import open_sparse

__all__ = [
    "MANIFEST_NAME",
    "Kind",
    "Manifest",
    "AdapterEntry",
    "read_manifest",
    "open_candidate",
    "session_options",
    "CandidateRunner",
]


def read_manifest(folder: Union[str, "os.PathLike[str]"]) -> Manifest:
    """The candidate folder's manifest (the contract's reader); errors name the file and key."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShiraInputError(f"{folder}: --candidate must be an export folder (not found or not a folder)")
    return read_any_manifest(folder)


class CandidateRunner(Protocol):
    """Runs the candidate. `variants` are suffixes of the ways it runs (e.g. "" and "@lean"):
    `forward` returns each output under `name + suffix`, `generate` new tokens per suffix."""

    variants: tuple[str, ...]

    def forward(self, batch: InputBatch, adapter: AdapterEntry) -> dict[str, np.ndarray]: ...

    def generate(self, batch: InputBatch, n_tokens: int, adapter: AdapterEntry) -> dict[str, np.ndarray]: ...


class _MergedOrt:
    """A merged ONNX folder in plain onnxruntime (whichever exporter wrote it); causal LMs
    generate with the KV cache through the runtime's generation loop."""

    variants: tuple[str, ...] = ("",)

    def __init__(self, manifest: Manifest, threads: Optional[int] = None) -> None:
        from shira_export.runtime import PlainSession, ShiraORTModelForCausalLM

        onnx_files = sorted(manifest.folder.glob("*.onnx"))
        if not onnx_files:
            raise ShiraInputError(f"{manifest.folder}: merged ONNX export without a .onnx file")
        name = "model.onnx" if (manifest.folder / "model.onnx").is_file() else onnx_files[0].name
        self.spec = spec_for(manifest.task)
        self.session = PlainSession(manifest.folder, file_name=name, session_options=session_options(threads))
        self.lm = None
        if self.spec.family is Family.CAUSAL_LM and any(
            n.startswith("past_key_values.") for n in self.session.input_names
        ):
            self.lm = ShiraORTModelForCausalLM(self.session)

    def forward(self, batch: InputBatch, adapter: AdapterEntry) -> dict[str, np.ndarray]:
        return self._forward(batch.input_ids.numpy(), batch.attention_mask.numpy())

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        if self.lm is not None:
            return {"logits": np.asarray(self.lm.forward(ids, mask).logits, np.float32)}
        feeds = graph_feeds(self.spec, ids, mask, self.session.input_names)
        names = list(self.spec.outputs)
        result = self.session.run(feeds, output_names=names)
        return {n: np.asarray(result[n], np.float32) for n in names}

    def generate(self, batch: InputBatch, n_tokens: int, adapter: AdapterEntry) -> dict[str, np.ndarray]:
        if self.lm is None:  # a graph without a cache: each step runs the whole sequence again
            ids, mask = batch.input_ids.numpy(), batch.attention_mask.numpy()
            new = []
            for _ in range(n_tokens):
                token = self._forward(ids, mask)["logits"][:, -1].argmax(-1)[:, None]
                new.append(token)
                ids, mask = np.concatenate([ids, token], 1), np.concatenate([mask, np.ones_like(token)], 1)
            return {"": np.concatenate(new, axis=1)}
        config = self.lm.config
        pad = getattr(config, "pad_token_id", None) if config is not None else None
        out = self.lm.generate(
            batch.input_ids,
            batch.attention_mask,
            max_new_tokens=n_tokens,
            min_new_tokens=n_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        return {"": np.asarray(out)[:, batch.input_ids.shape[1] :]}


class _MergedTorch:
    variants: tuple[str, ...] = ("",)

    def __init__(self, manifest: Manifest) -> None:
        # the export's own dtype (fp16 stays fp16), unlike the fp32 reference
        self._runner = TorchRunner(
            load_base_model(manifest.folder, manifest.task, dtype="auto"), spec_for(manifest.task)
        )

    def forward(self, batch: InputBatch, adapter: AdapterEntry) -> dict[str, np.ndarray]:
        return self._runner.forward(batch)

    def generate(self, batch: InputBatch, n_tokens: int, adapter: AdapterEntry) -> dict[str, np.ndarray]:
        return {"": self._runner.generate(batch, n_tokens)}


def open_candidate(manifest: Manifest, *, threads: Optional[int] = None) -> CandidateRunner:
    """A runner for the export described by `manifest` (`threads`: ORT intra-op threads)."""
    if manifest.exporter == "genai":  # builder graphs: packed q|k|v, no fixed head size
        from shira_export.runtime.genai import open_genai

        return open_genai(manifest, threads=threads)
    if isinstance(manifest, SparseManifest):
        return open_sparse(manifest, threads=threads)
    return _MergedOrt(manifest, threads) if manifest.format == "onnx" else _MergedTorch(manifest)
