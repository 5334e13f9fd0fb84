"""Traced ONNX graphs kept between exports, without their weights: in this process and on disk.

Tracing (torch.export, its decompositions, the ONNX translation) is most of a torch-route
export and depends only on the model's structure, so the graph it gives is kept, keyed by
everything that shapes it: torch / transformers / onnxscript / onnx-ir / onnx versions, this
exporter's source, the model class and its source file, the config, the attention
implementation, the task, the opset and every parameter's name, shape and dtype. Exporting
the same structure again (another adapter on the same base, the next CLI run) fills the
weights into the kept graph and goes on to the optimizer.

What is kept is an ONNX `ModelProto` in which each weight is an external-data reference to
a location that names no file: protobuf, so reading an entry runs no code (no pickle;
`torch.export.save` pickles, so ExportedPrograms are not kept). An entry is trusted for
nothing: a file whose digest, header or key does not match, that does not parse, or whose
weight slots differ from the model's (name, shape, dtype) is deleted and the model is traced
again; every weight slot is filled from the model's own state dict before anything reads
the graph, and an external reference left over rejects the entry (so no file it names is
ever read). Results are then checked as any export is (contract names, onnx.checker, and
`verify` against PyTorch unless turned off).

The directory: `$SHIRA_EXPORT_TRACE_CACHE` when set (`off`, `0` or `none` turns the disk
cache off), else `$XDG_CACHE_HOME/shira-export/traced` (`~/.cache/...`). It keeps the
newest 16 entries (graphs without weights: about 1 MB for the OPT-125m shape).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Optional

import onnx_ir as ir

__all__ = ["cache_dir", "cache_key", "lookup", "store", "fill_weights", "weightless_bytes", "clear_memory"]

logger = logging.getLogger(__name__)

ENV = "SHIRA_EXPORT_TRACE_CACHE"
_OFF = {"off", "0", "none", "false", "no"}
_MAGIC = b"shira-export traced graph v1\n"
_PLACEHOLDER = "shira-export:weight-from-state-dict"  # the location of a stripped weight; names no file
_MEMORY: "OrderedDict[str, bytes]" = OrderedDict()
_MEMORY_MAX = 4
DISK_MAX = 16


def cache_dir() -> Optional[Path]:
    """The disk cache's folder, or None when `$SHIRA_EXPORT_TRACE_CACHE` turns it off."""
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in _OFF:
        return None
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "shira-export" / "traced"


def cache_key(parts: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of `parts` (JSON-able values only)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def clear_memory() -> None:
    _MEMORY.clear()


def weightless_bytes(model: ir.Model, weights: set[str]) -> bytes:
    """`model` serialized with each initializer named in `weights` replaced by a reference
    that names no file (its dtype and shape kept); `model` itself is left as it was."""
    saved: dict[str, Any] = {}
    initializers = model.graph.initializers
    try:
        for name in weights:
            value = initializers[name]
            tensor = value.const_value
            if tensor is None:
                continue
            saved[name] = tensor
            shape = ir.Shape(list(tensor.shape.dims))  # type: ignore[arg-type]  # weights: static dims
            value.const_value = ir.ExternalTensor(_PLACEHOLDER, 0, tensor.nbytes, tensor.dtype, shape=shape, name=name)
        return ir.serde.serialize_model(model).SerializeToString()
    finally:
        for name, tensor in saved.items():
            initializers[name].const_value = tensor


def fill_weights(model: ir.Model, state: Mapping[str, Any]) -> bool:
    """Put `state`'s tensors (torch) into every weight slot of a cached graph; False (and
    the graph must not be used) when a slot has no tensor of its name, shape and dtype in
    `state`, or an external reference other than a slot is left."""
    try:  # torch.onnx's own wrapper (what ONNXProgram.apply_weights uses): no copy, any dtype
        from torch.onnx._internal.exporter._core import TorchTensor
    except ImportError:  # another torch: the entry is not used, the model is traced
        return False
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        if tensor.location != _PLACEHOLDER or name not in state:
            return False
        weight = TorchTensor(state[name], name)
        if weight.dtype != tensor.dtype or tuple(weight.shape) != tuple(tensor.shape):
            return False
        value.const_value = weight
    return True


def _path(folder: Path, key: str) -> Path:
    return folder / f"{key}.onnxgraph"


def _read(path: Path, key: str) -> Optional[bytes]:
    """The payload of a disk entry, or None (and the file removed) when it does not check out."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.debug("trace cache: cannot read %s (%s)", path, exc)
        return None
    header_len = len(_MAGIC) + 64 + 1 + 64 + 1
    header, payload = data[:header_len], data[header_len:]
    expected = _MAGIC + key.encode() + b"\n" + hashlib.sha256(payload).hexdigest().encode() + b"\n"
    if header != expected:
        logger.debug("trace cache: %s does not match its key or digest; removed", path)
        path.unlink(missing_ok=True)
        return None
    return payload


def _parse(payload: bytes) -> Optional[ir.Model]:
    import onnx

    try:
        proto = onnx.ModelProto()
        proto.ParseFromString(payload)
        return ir.serde.deserialize_model(proto)
    except Exception as exc:  # protobuf's and onnx-ir's parse errors have many classes
        logger.debug("trace cache: entry does not parse (%s: %s)", type(exc).__name__, exc)
        return None


def lookup(key: str) -> Optional[ir.Model]:
    """The cached graph for `key` (weights not filled), from memory or disk, or None."""
    payload = _MEMORY.pop(key, None)
    folder = cache_dir()
    path = _path(folder, key) if folder is not None else None
    if payload is None and path is not None:
        payload = _read(path, key)
    if payload is None:
        return None
    model = _parse(payload)
    if model is None:
        if path is not None:
            path.unlink(missing_ok=True)
        return None
    _remember(key, payload)
    if path is not None and path.exists():
        _touch(path)
    return model


def discard(key: str) -> None:
    """Forget `key` everywhere (an entry that failed a check after parsing)."""
    _MEMORY.pop(key, None)
    folder = cache_dir()
    if folder is not None:
        _path(folder, key).unlink(missing_ok=True)


def _remember(key: str, payload: bytes) -> None:
    _MEMORY[key] = payload
    while len(_MEMORY) > _MEMORY_MAX:
        _MEMORY.popitem(last=False)


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def store(key: str, payload: bytes) -> None:
    """Keep `payload` for `key` in memory and, where the disk cache is on, in its folder
    (written to a temporary name and renamed, so a reader never sees half a file). A disk
    that refuses is not an export failure: the entry is then only in memory."""
    _remember(key, payload)
    folder = cache_dir()
    if folder is None:
        return
    header = _MAGIC + key.encode() + b"\n" + hashlib.sha256(payload).hexdigest().encode() + b"\n"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".onnxgraph")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                f.write(payload)
            os.replace(tmp, _path(folder, key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _prune(folder)
    except OSError as exc:
        logger.debug("trace cache: cannot write to %s (%s)", folder, exc)


def _prune(folder: Path) -> None:
    entries = sorted(folder.glob("*.onnxgraph"), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in entries[DISK_MAX:]:
        stale.unlink(missing_ok=True)
