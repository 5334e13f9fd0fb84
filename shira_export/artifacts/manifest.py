"""`OUT_DIR/shira_export.json`: what an export folder holds and how to run it, for every
kind of folder (merged ONNX or safetensors, fp32 / fp16, quantized or not, genai builder
folders; sparse fp32 or quantized). The one module that reads and writes it.

Every manifest has `schema` (SCHEMA_VERSION), `kind`, `format`, `task`, `package_version`,
`exporter` and `base_fingerprint`; later stages add keys (quantize: `quantization`,
`quantization_details`), which a rewrite keeps. What each fingerprint covers:

- sparse: `graph_fingerprint` over the targeted modules (name, shape, layout, weight
  bytes as the graph holds them); adapter files carry it, and loading checks it.
- merged: `weights_fingerprint` over every tensor of the base model's state dict as loaded
  in fp32 for the task, before the adapter is merged (name, dtype, shape, bytes), the same
  for every exporter (torch, optimum, genai, safetensors). Folders written before it was
  recorded read with `base_fingerprint` None.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Union

from shira_export._io import atomic_write_text, confined, describe_path, sha256_file
from shira_export.artifacts.naming import DEFAULT_TOKEN_THRESHOLD, TargetSite
from shira_export.artifacts.tasks import spec_for
from shira_export.errors import ShiraInputError

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "MODEL_NAME",
    "ADAPTER_DIR",
    "Kind",
    "AdapterEntry",
    "MergedManifest",
    "SparseManifest",
    "Manifest",
    "read_manifest",
    "read_sparse_manifest",
    "load_manifest_json",
    "adapter_entry",
    "weights_fingerprint",
]

MANIFEST_NAME = "shira_export.json"
SCHEMA_VERSION = 1
MODEL_NAME = "model.onnx"
ADAPTER_DIR = "adapters"
QUANTIZATIONS = ("int8", "int4")
FORMATS = ("onnx", "safetensors")
PathLike = Union[str, os.PathLike]
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Kind(str, Enum):
    MERGED = "merged"
    SPARSE = "sparse"


@dataclass(frozen=True)
class AdapterEntry:
    """One adapter of a folder as verify and the runtime address it."""

    name: str
    source: Optional[str]  # adapter dir it was built from (None: the base model, no adapter)
    file: Optional[str] = None  # sparse: relative path of its .onnx_adapter


def _write(folder: Path, data: dict, atomic: bool) -> Path:
    text = json.dumps(data, indent=2) + "\n"
    path = folder / MANIFEST_NAME
    if atomic:
        return atomic_write_text(path, text)
    path.write_text(text)  # a folder not yet published: no reader can see a partial file
    return path


@dataclass
class MergedManifest:
    """A plain model folder: the adapter merged into the base weights."""

    kind: ClassVar[Kind] = Kind.MERGED
    folder: Path
    task: str
    format: str = "onnx"
    dtype: str = "fp32"
    exporter: Optional[str] = None  # the ONNX exporter that ran (None: safetensors)
    package_version: str = ""
    base_model: Optional[str] = None
    base_fingerprint: Optional[str] = None
    adapter: Optional[dict] = None  # {"name", "source"}; None: the base model alone
    extra: dict = field(default_factory=dict)  # precision, builder_options, quantization, ... kept on rewrite
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # the JSON as read

    @property
    def quantization(self) -> Optional[str]:
        return self.extra.get("quantization")

    @property
    def adapter_entries(self) -> tuple[AdapterEntry, ...]:
        if self.adapter is None:
            return (AdapterEntry("base", None),)
        return (AdapterEntry(self.adapter["name"], self.adapter.get("source")),)

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA_VERSION,
            "kind": self.kind.value,
            "format": self.format,
            "task": self.task,
            "dtype": self.dtype,
            "exporter": self.exporter,
            "package_version": self.package_version,
            "base_model": self.base_model,
            "base_fingerprint": self.base_fingerprint,
            "adapter": self.adapter,
            **self.extra,
        }

    def write(self, folder: Optional[PathLike] = None, *, atomic: bool = True) -> Path:
        return _write(Path(folder or self.folder), self.to_json(), atomic)


_SPARSE_KEYS = {
    "schema",
    "kind",
    "format",
    "task",
    "package_version",
    "base_fingerprint",
    "model",
    "token_threshold",
    "adapters",
    "targets",
    "unused_targets",
}
_MERGED_KEYS = {
    "schema",
    "kind",
    "format",
    "task",
    "dtype",
    "exporter",
    "package_version",
    "base_model",
    "base_fingerprint",
    "adapter",
}


@dataclass
class SparseManifest:
    """One base graph with a sparse-delta site per target, one .onnx_adapter per adapter."""

    kind: ClassVar[Kind] = Kind.SPARSE
    format: ClassVar[str] = "onnx"
    folder: Path
    task: str
    base_fingerprint: str
    targets: list[TargetSite]
    adapters: dict[str, dict] = field(default_factory=dict)  # name -> {"file", "source", "nnz", "sha256"}
    token_threshold: int = DEFAULT_TOKEN_THRESHOLD
    package_version: str = ""
    unused_targets: list[str] = field(default_factory=list)  # targeted, but no exported output depends on them
    extra: dict = field(default_factory=dict)  # "exporter", "quantization", ... kept on rewrite
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # the JSON as read

    @property
    def quantization(self) -> Optional[str]:
        return self.extra.get("quantization")

    @property
    def exporter(self) -> Optional[str]:
        return self.extra.get("exporter")

    @property
    def dtype(self) -> Optional[str]:
        return self.extra.get("dtype")

    @property
    def model_path(self) -> Path:
        return self.folder / MODEL_NAME

    @property
    def adapter_entries(self) -> tuple[AdapterEntry, ...]:
        return tuple(AdapterEntry(n, e.get("source"), e["file"]) for n, e in self.adapters.items())

    def adapter_path(self, name: str) -> Path:
        """The adapter's file; a path that leaves the folder is refused (ShiraInputError)."""
        return confined(
            self.folder, self.adapters[name]["file"], what=f"{self.folder / MANIFEST_NAME}: adapters.{name}.file"
        )

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA_VERSION,
            "kind": self.kind.value,
            "format": self.format,
            "task": self.task,
            "package_version": self.package_version,
            "base_fingerprint": self.base_fingerprint,
            "model": MODEL_NAME,
            "token_threshold": self.token_threshold,
            "adapters": self.adapters,
            "targets": [dict(t.to_json(), digest=t.digest) for t in self.targets],
            "unused_targets": self.unused_targets,
            **self.extra,
        }

    def write(self, folder: Optional[PathLike] = None, *, atomic: bool = True) -> Path:
        return _write(Path(folder or self.folder), self.to_json(), atomic)


Manifest = Union[MergedManifest, SparseManifest]


def adapter_entry(folder: PathLike, rel: str, source: str, nnz: int) -> dict:
    """The manifest's record of an adapter file written at `folder/rel`: its sha256 is what
    loading checks (a changed or damaged file is refused, naming it)."""
    return {"file": rel, "source": source, "nnz": int(nnz), "sha256": sha256_file(Path(folder) / rel)}


def weights_fingerprint(model: "nn.Module") -> str:
    """sha256 over every tensor of `model.state_dict()` (name, dtype, shape, bytes), in name
    order: the merged manifest's base fingerprint, taken before the adapter is merged."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(tensor.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def load_manifest_json(folder: PathLike, *, expected: str) -> tuple[Path, dict]:
    """(path, parsed JSON object) of `folder/shira_export.json`; `expected` says what
    should have written it, for the error when it is missing."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ShiraInputError(f"{path}: manifest {describe_path(path, want='file')} (expected {expected})")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise ShiraInputError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError as exc:
        raise ShiraInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}): not a manifest") from None
    except RecursionError:
        raise ShiraInputError(f"{path}: JSON nested too deeply to be a manifest") from None
    if not isinstance(raw, dict):
        raise ShiraInputError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return path, raw


def _check_adapters(path: Path, folder: Path, adapters: object) -> dict[str, dict]:
    if not isinstance(adapters, dict):
        raise ShiraInputError(f"{path}: key 'adapters' expected an object, found {type(adapters).__name__}")
    for name, entry in adapters.items():
        where = f"{path}: adapters.{name}"
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise ShiraInputError(f"{where}: expected an object with 'file' (a str), found {entry!r}")
        confined(folder, entry.get("file"), what=f"{where}.file")
        digest = entry.get("sha256")
        if digest is not None and not (isinstance(digest, str) and _SHA256.match(digest)):
            raise ShiraInputError(f"{where}.sha256: expected 64 lowercase hex digits, found {digest!r}")
        nnz = entry.get("nnz")
        if nnz is not None and (isinstance(nnz, bool) or not isinstance(nnz, int) or nnz < 0):
            raise ShiraInputError(f"{where}.nnz: expected a non-negative integer, found {nnz!r}")
    return dict(adapters)


def _parse_sparse(path: Path, folder: Path, raw: dict) -> SparseManifest:
    if raw.get("schema") != SCHEMA_VERSION or raw.get("kind") != Kind.SPARSE.value:
        raise ShiraInputError(
            f"{path}: expected schema {SCHEMA_VERSION} and kind 'sparse', found schema "
            f"{raw.get('schema')!r}, kind {raw.get('kind')!r}"
        )
    try:
        targets = [
            TargetSite(
                t["module"],
                t["node"],
                t["initializer"],
                int(t["out_features"]),
                int(t["in_features"]),
                t["weight_layout"] == "out_in",
                t["digest"],
            )
            for t in raw["targets"]
        ]
        adapters = _check_adapters(path, folder, raw.get("adapters", {}))
        return SparseManifest(
            folder,
            str(raw["task"]),
            str(raw["base_fingerprint"]),
            targets,
            adapters,
            int(raw.get("token_threshold", DEFAULT_TOKEN_THRESHOLD)),
            str(raw.get("package_version", "")),
            list(raw.get("unused_targets", [])),
            {k: v for k, v in raw.items() if k not in _SPARSE_KEYS},
            raw=raw,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ShiraInputError(f"{path}: malformed sparse manifest ({type(exc).__name__}: {exc})") from None


def _parse_merged(path: Path, folder: Path, raw: dict) -> MergedManifest:
    fmt = raw.get("format")
    if fmt not in FORMATS:
        raise ShiraInputError(f"{path}: key 'format' expected 'onnx' or 'safetensors', found {fmt!r}")
    adapter = raw.get("adapter")
    if adapter is not None and not (isinstance(adapter, dict) and isinstance(adapter.get("name"), str)):
        raise ShiraInputError(
            f"{path}: key 'adapter' expected {{'name': str, 'source': str}} or null, found {adapter!r}"
        )
    for key in ("dtype", "exporter", "package_version", "base_model", "base_fingerprint"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ShiraInputError(f"{path}: key {key!r} expected a string, found {raw[key]!r}")
    return MergedManifest(
        folder,
        raw["task"],
        fmt,
        raw.get("dtype") or "fp32",
        raw.get("exporter"),
        raw.get("package_version") or "",
        raw.get("base_model"),
        raw.get("base_fingerprint"),
        adapter,
        {k: v for k, v in raw.items() if k not in _MERGED_KEYS},
        raw=raw,
    )


def read_sparse_manifest(folder: PathLike) -> SparseManifest:
    """Parse `folder/shira_export.json` of a sparse export; errors name the file and key."""
    folder = Path(folder)
    path, raw = load_manifest_json(folder, expected="a folder written by `shira-export sparse`")
    return _parse_sparse(path, folder, raw)


def read_manifest(folder: PathLike) -> Manifest:
    """Parse and check the manifest of any export folder (merged or sparse): the task must be
    one of the task table's, the adapter files of a sparse folder must exist."""
    folder = Path(folder)
    path, raw = load_manifest_json(folder, expected=f"the {MANIFEST_NAME} an export writes")

    def need(key: str, kind: type) -> Any:
        if not isinstance(raw.get(key), kind):
            raise ShiraInputError(f"{path}: key {key!r} expected {kind.__name__}, found {raw.get(key)!r}")
        return raw[key]

    if raw.get("schema") != SCHEMA_VERSION:
        raise ShiraInputError(f"{path}: key 'schema' expected {SCHEMA_VERSION}, found {raw.get('schema')!r}")
    try:
        kind = Kind(need("kind", str))
    except ValueError:
        raise ShiraInputError(
            f"{path}: key 'kind' expected one of {[k.value for k in Kind]}, found {raw['kind']!r}"
        ) from None
    spec_for(need("task", str), where=f"{path}: key 'task'")
    if raw.get("quantization") not in (None, *QUANTIZATIONS):
        raise ShiraInputError(f"{path}: key 'quantization' expected 'int8' or 'int4', found {raw['quantization']!r}")
    if kind is Kind.MERGED:
        return _parse_merged(path, folder, raw)
    need("adapters", dict)
    manifest = _parse_sparse(path, folder, raw)
    for name in manifest.adapters:
        if not manifest.adapter_path(name).is_file():
            raise ShiraInputError(
                f"{path}: adapters.{name}.file {manifest.adapters[name]['file']!r} not found in {folder}"
            )
    return manifest
