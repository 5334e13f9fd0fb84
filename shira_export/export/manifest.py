"""`OUT_DIR/shira_export.json` for sparse exports: what the folder holds and how to run it."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from shira_export._io import atomic_write_text, confined, describe_path, sha256_file
from shira_export.errors import ShiraInputError
from shira_export.export.graph_delta import DEFAULT_TOKEN_THRESHOLD, TargetSite

__all__ = ["MANIFEST_NAME", "MODEL_NAME", "ADAPTER_DIR", "SparseManifest", "read_sparse_manifest", "adapter_entry"]

MANIFEST_NAME = "shira_export.json"
MODEL_NAME = "model.onnx"
ADAPTER_DIR = "adapters"
_OWN_KEYS = {"schema", "kind", "format", "task", "package_version", "base_fingerprint", "model", "token_threshold",
             "adapters", "targets", "unused_targets"}


@dataclass
class SparseManifest:
    folder: Path
    task: str
    base_fingerprint: str
    targets: list[TargetSite]
    adapters: dict[str, dict] = field(default_factory=dict)  # name -> {"file", "source", "nnz", "sha256"}
    token_threshold: int = DEFAULT_TOKEN_THRESHOLD
    package_version: str = ""
    unused_targets: list[str] = field(default_factory=list)  # targeted, but no exported output depends on them
    extra: dict = field(default_factory=dict)  # keys later stages add (e.g. "quantization"), kept on rewrite

    @property
    def quantization(self):
        return self.extra.get("quantization")

    @property
    def model_path(self) -> Path:
        return self.folder / MODEL_NAME

    def adapter_path(self, name: str) -> Path:
        """The adapter's file; a path that leaves the folder is refused (ShiraInputError)."""
        return confined(self.folder, self.adapters[name]["file"],
                        what=f"{self.folder / MANIFEST_NAME}: adapters.{name}.file")

    def to_json(self) -> dict:
        return {
            "schema": 1,
            "kind": "sparse",
            "format": "onnx",
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

    def write(self, folder: Union[str, Path, None] = None) -> Path:
        return atomic_write_text(Path(folder or self.folder) / MANIFEST_NAME, json.dumps(self.to_json(), indent=2) + "\n")


def adapter_entry(folder: Union[str, os.PathLike], rel: str, source: str, nnz: int) -> dict:
    """The manifest's record of an adapter file written at `folder/rel`: its sha256 is what
    loading checks (a changed or damaged file is refused, naming it)."""
    return {"file": rel, "source": source, "nnz": int(nnz), "sha256": sha256_file(Path(folder) / rel)}


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _check_adapters(path: Path, folder: Path, adapters: object) -> dict[str, dict]:
    if not isinstance(adapters, dict):
        raise ShiraInputError(f"{path}: key 'adapters' expected an object, found {type(adapters).__name__}")
    for name, entry in adapters.items():
        where = f"{path}: adapters.{name}"
        if not isinstance(entry, dict):
            raise ShiraInputError(f"{where}: expected an object with 'file', found {entry!r}")
        confined(folder, entry.get("file"), what=f"{where}.file")
        digest = entry.get("sha256")
        if digest is not None and not (isinstance(digest, str) and _SHA256.match(digest)):
            raise ShiraInputError(f"{where}.sha256: expected 64 lowercase hex digits, found {digest!r}")
        nnz = entry.get("nnz")
        if nnz is not None and (isinstance(nnz, bool) or not isinstance(nnz, int) or nnz < 0):
            raise ShiraInputError(f"{where}.nnz: expected a non-negative integer, found {nnz!r}")
    return dict(adapters)


def load_manifest_json(folder: Union[str, os.PathLike], *, expected: str) -> tuple[Path, dict]:
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


def read_sparse_manifest(folder: Union[str, os.PathLike]) -> SparseManifest:
    """Parse `folder/shira_export.json` of a sparse export; errors name the file and key."""
    folder = Path(folder)
    path, raw = load_manifest_json(folder, expected="a folder written by `shira-export sparse`")
    if raw.get("schema") != 1 or raw.get("kind") != "sparse":
        raise ShiraInputError(f"{path}: expected schema 1 and kind 'sparse', found schema {raw.get('schema')!r}, "
                              f"kind {raw.get('kind')!r}")
    try:
        targets = [
            TargetSite(t["module"], t["node"], t["initializer"], int(t["out_features"]), int(t["in_features"]),
                       t["weight_layout"] == "out_in", t["digest"])
            for t in raw["targets"]
        ]
        adapters = _check_adapters(path, folder, raw.get("adapters", {}))
        return SparseManifest(folder, str(raw["task"]), str(raw["base_fingerprint"]), targets,
                              adapters, int(raw.get("token_threshold", DEFAULT_TOKEN_THRESHOLD)),
                              str(raw.get("package_version", "")), list(raw.get("unused_targets", [])),
                              {k: v for k, v in raw.items() if k not in _OWN_KEYS})
    except (KeyError, TypeError, ValueError) as exc:
        raise ShiraInputError(f"{path}: malformed sparse manifest ({type(exc).__name__}: {exc})") from None
