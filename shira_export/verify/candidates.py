"""The candidate side: an export folder described by `OUT_DIR/shira_export.json`.

Merged ONNX folders run in plain ONNX Runtime (`runtime.PlainSession`; greedy generation
with the KV cache through the runtime's loop); merged safetensors folders load with
transformers; sparse folders run through `shira_export.runtime` with the adapter chosen
per call.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Union

import numpy as np

from shira_export._io import confined
from shira_export.errors import ShiraInputError
from shira_export.export.manifest import MANIFEST_NAME, load_manifest_json
from shira_export.verify.inputs import InputBatch
from shira_export.verify.reference import OUTPUTS, TaskFamily, TorchRunner, task_family

__all__ = ["MANIFEST_NAME", "Kind", "Manifest", "AdapterEntry", "read_manifest", "open_candidate", "session_options", "CandidateRunner"]



class Kind(str, enum.Enum):
    MERGED = "merged"
    SPARSE = "sparse"


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    source: Optional[str]  # adapter dir it was built from (None: base model, no adapter)
    file: Optional[str] = None  # sparse: relative path of its .onnx_adapter


@dataclass(frozen=True)
class Manifest:
    folder: Path
    kind: Kind
    task: str
    family: TaskFamily
    format: str = "onnx"
    dtype: Optional[str] = None
    quantization: Optional[str] = None
    adapters: tuple[AdapterEntry, ...] = ()
    raw: dict = field(default_factory=dict)


def read_manifest(folder: Union[str, "os.PathLike[str]"]) -> Manifest:
    """Parse and check `folder/shira_export.json`; errors name the file and key."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShiraInputError(f"{folder}: --candidate must be an export folder (not found or not a folder)")
    path, raw = load_manifest_json(folder, expected=f"the {MANIFEST_NAME} an export writes")

    def need(key: str, kind: type):
        if not isinstance(raw.get(key), kind):
            raise ShiraInputError(f"{path}: key {key!r} expected {kind.__name__}, found {raw.get(key)!r}")
        return raw[key]

    if raw.get("schema") != 1:
        raise ShiraInputError(f"{path}: key 'schema' expected 1, found {raw.get('schema')!r}")
    try:
        kind = Kind(need("kind", str))
    except ValueError:
        raise ShiraInputError(f"{path}: key 'kind' expected one of {[k.value for k in Kind]}, found {raw['kind']!r}") from None
    task = need("task", str)
    family = task_family(task, where=f"{path}: key 'task'")
    quantization = raw.get("quantization")
    if quantization not in (None, "int8", "int4"):
        raise ShiraInputError(f"{path}: key 'quantization' expected 'int8' or 'int4', found {quantization!r}")
    if kind is Kind.MERGED:
        fmt = need("format", str)
        if fmt not in ("onnx", "safetensors"):
            raise ShiraInputError(f"{path}: key 'format' expected 'onnx' or 'safetensors', found {fmt!r}")
        adapter = raw.get("adapter")
        if adapter is None:
            entries: tuple[AdapterEntry, ...] = (AdapterEntry("base", None),)
        elif isinstance(adapter, dict) and isinstance(adapter.get("name"), str):
            entries = (AdapterEntry(adapter["name"], adapter.get("source")),)
        else:
            raise ShiraInputError(f"{path}: key 'adapter' expected {{'name': str, 'source': str}} or null, found {adapter!r}")
    else:
        fmt = "onnx"
        adapters = need("adapters", dict)
        found: list[AdapterEntry] = []
        for name, entry in adapters.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise ShiraInputError(f"{path}: key 'adapters.{name}' expected {{'file': str, 'source': str}}, found {entry!r}")
            if not confined(folder, entry["file"], what=f"{path}: adapters.{name}.file").is_file():
                raise ShiraInputError(f"{path}: adapters.{name}.file {entry['file']!r} not found in {folder}")
            found.append(AdapterEntry(name, entry.get("source"), entry["file"]))
        entries = tuple(found)
    return Manifest(folder, kind, task, family, fmt, raw.get("dtype"), quantization, entries, raw)


class CandidateRunner(Protocol):
    """Runs the candidate. `variants` are suffixes of the ways it runs (e.g. "" and "@dense"):
    `forward` returns each output under `name + suffix`, `generate` new tokens per suffix."""

    variants: tuple[str, ...]

    def forward(self, batch: InputBatch, adapter: AdapterEntry) -> dict[str, np.ndarray]: ...

    def generate(self, batch: InputBatch, n_tokens: int, adapter: AdapterEntry) -> dict[str, np.ndarray]: ...


def session_options(threads: Optional[int]):
    """ORT session options with `threads` intra-op threads (None: ORT's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # overridable initializers are intended in sparse graphs
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


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
        self.family = manifest.family
        self.session = PlainSession(manifest.folder, file_name=name, session_options=session_options(threads))
        self.lm = None
        if self.family is TaskFamily.CAUSAL_LM and any(n.startswith("past_key_values.") for n in self.session.input_names):
            self.lm = ShiraORTModelForCausalLM(self.session)

    def forward(self, batch: InputBatch, adapter: AdapterEntry) -> dict[str, np.ndarray]:
        return self._forward(batch.input_ids.numpy(), batch.attention_mask.numpy())

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        if self.lm is not None:
            return {"logits": np.asarray(self.lm.forward(ids, mask).logits, np.float32)}
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids), "position_ids": positions}
        feeds = {k: v for k, v in feeds.items() if k in self.session.input_names}
        names = list(OUTPUTS[self.family])
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
        out = self.lm.generate(batch.input_ids, batch.attention_mask, max_new_tokens=n_tokens,
                               min_new_tokens=n_tokens, do_sample=False, pad_token_id=pad)
        return {"": np.asarray(out)[:, batch.input_ids.shape[1]:]}


class _MergedTorch:
    variants: tuple[str, ...] = ("",)

    def __init__(self, manifest: Manifest) -> None:
        from shira_export.verify.reference import load_base_model

        # the export's own dtype (fp16 stays fp16), unlike the fp32 reference
        self._runner = TorchRunner(load_base_model(manifest.folder, manifest.family, dtype="auto"), manifest.family)

    def forward(self, batch: InputBatch, adapter: AdapterEntry) -> dict[str, np.ndarray]:
        return self._runner.forward(batch)

    def generate(self, batch: InputBatch, n_tokens: int, adapter: AdapterEntry) -> dict[str, np.ndarray]:
        return {"": self._runner.generate(batch, n_tokens)}


def open_candidate(manifest: Manifest, *, threads: Optional[int] = None) -> CandidateRunner:
    """A runner for the export described by `manifest` (`threads`: ORT intra-op threads)."""
    if manifest.raw.get("exporter") == "genai":  # builder graphs: packed q|k|v, no fixed head size
        from shira_export.runtime.genai import open_genai

        return open_genai(manifest, threads=threads)
    if manifest.kind is Kind.MERGED:
        return _MergedOrt(manifest, threads) if manifest.format == "onnx" else _MergedTorch(manifest)
    from shira_export.verify.sparse import open_sparse

    return open_sparse(manifest, threads=threads)
