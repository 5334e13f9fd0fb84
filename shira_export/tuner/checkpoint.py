"""Adapter folders in PEFT's layout, both directions.

A folder holds `adapter_config.json` and `adapter_model.safetensors` (metadata
{"format": "pt"}) with keys `base_model.model.<module>.shira_weight` (nnz,) and
`base_model.model.<module>.shira_indices` (2, nnz) int32, plus the full state of
each `modules_to_save` module as `base_model.model.<module>.<param>`. Pickle files
are never read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from shira_export._io import atomic_path, describe_path
from shira_export.errors import ShiraInputError
from shira_export.tuner.config import CONFIG_NAME, ShiraConfig
from shira_export.tuner.masks import layer_shape

WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_VALUES = ".shira_weight"
_INDICES = ".shira_indices"
_VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PICKLES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")

__all__ = ["AdapterCheckpoint", "SparseDelta", "read_adapter_dir", "write_adapter_dir", "WEIGHTS_NAME"]


@dataclass
class SparseDelta:
    """One layer's adapter: int64 [2, nnz] (out, in) indices sorted row-major, values [nnz]."""

    indices: torch.Tensor
    values: torch.Tensor

    @property
    def nnz(self) -> int:
        return int(self.values.numel())


@dataclass
class AdapterCheckpoint:
    config: ShiraConfig
    deltas: dict[str, SparseDelta]
    modules_to_save: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    name: str = "default"
    source: str = "<memory>"

    def validate_against(self, model: nn.Module) -> None:
        """Check every module and shape against `model` (a plain or SHiRA-wrapped model);
        raise one error that lists every problem at once."""
        modules = dict(model.named_modules())
        problems: list[str] = []
        for path, delta in self.deltas.items():
            module = modules.get(path)
            if module is not None and hasattr(module, "base_layer"):
                module = module.base_layer
            if module is None:
                problems.append(f"module {path!r} not found in {type(model).__name__}")
                continue
            try:
                out_f, in_f = layer_shape(module)
            except TypeError as exc:
                problems.append(f"module {path!r}: {exc}")
                continue
            max_row, max_col = (int(v) for v in delta.indices.max(dim=1).values) if delta.nnz else (-1, -1)
            if max_row >= out_f or max_col >= in_f:
                problems.append(
                    f"module {path!r}: indices reach ({max_row}, {max_col}) but the layer is "
                    f"(out={out_f}, in={in_f}) (an adapter for another base model?)"
                )
        for path, state in self.modules_to_save.items():
            module = modules.get(path)
            if module is not None and hasattr(module, "original_module"):
                module = module.original_module
            if module is None:
                problems.append(f"modules_to_save {path!r} not found in {type(model).__name__}")
                continue
            own = module.state_dict()
            for key, tensor in state.items():
                if key not in own:
                    problems.append(f"modules_to_save {path!r}: unexpected key {key!r}")
                elif tuple(own[key].shape) != tuple(tensor.shape):
                    problems.append(
                        f"modules_to_save {path!r}.{key}: shape {tuple(tensor.shape)} in file, "
                        f"{tuple(own[key].shape)} in model"
                    )
        if problems:
            raise ShiraInputError(f"{self.source}: adapter does not fit the base model:\n  " + "\n  ".join(problems))


def _fail(path: Path, message: str) -> None:
    raise ShiraInputError(f"{path}: {message}")


def _check_delta(path: Path, module: str, indices: torch.Tensor, values: torch.Tensor) -> SparseDelta:
    key = f"{KEY_PREFIX}{module}"
    if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.dim() != 2 or indices.shape[0] != 2:
        _fail(
            path,
            f"{key}{_INDICES}: expected an integer tensor of shape (2, nnz), found {indices.dtype} {tuple(indices.shape)}",
        )
    if values.dim() != 1 or values.dtype not in _VALUE_DTYPES:  # float8 & co. have no isfinite / merge kernels
        _fail(
            path,
            f"{key}{_VALUES}: expected a 1-D float16/bfloat16/float32/float64 tensor, found {values.dtype} "
            f"{tuple(values.shape)}",
        )
    if indices.shape[1] != values.shape[0]:
        _fail(path, f"{key}: {indices.shape[1]} index pairs but {values.shape[0]} values (they must match)")
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        _fail(path, f"{key}{_VALUES}: {bad} NaN/Inf values (expected finite values)")
    indices = indices.to(torch.int64)
    if indices.numel() and int(indices.min()) < 0:
        _fail(path, f"{key}{_INDICES}: negative index {int(indices.min())} (expected >= 0)")
    width = int(indices[1].max()) + 1 if indices.numel() else 1
    flat = indices[0] * width + indices[1]
    order = torch.argsort(flat)
    flat_sorted = flat[order]
    if flat_sorted.numel() > 1 and bool((flat_sorted[1:] == flat_sorted[:-1]).any()):
        dup = int(flat_sorted[1:][flat_sorted[1:] == flat_sorted[:-1]][0])
        _fail(
            path,
            f"{key}{_INDICES}: duplicate index pair ({dup // width}, {dup % width}) (each position may appear once)",
        )
    return SparseDelta(indices=indices[:, order].contiguous(), values=values[order].contiguous())


def read_adapter_dir(
    directory: Union[str, os.PathLike], *, name: str = "default", config: Optional[ShiraConfig] = None
) -> AdapterCheckpoint:
    """Read and validate a PEFT-layout SHiRA adapter folder (written by PEFT or by us);
    `config` given: used instead of the folder's adapter_config.json."""
    path = Path(directory)
    if not path.is_dir():
        raise ShiraInputError(
            f"{path}: adapter folder {describe_path(path, want='folder')} (expected a folder with "
            f"{CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    if config is not None and not isinstance(config, ShiraConfig):
        raise ShiraInputError(f"config: expected a ShiraConfig, found {type(config).__name__}")
    config = ShiraConfig.from_pretrained(path) if config is None else config
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [p for p in _PICKLES if (path / p).exists()]
        if pickles:
            _fail(
                path,
                f"found {pickles[0]} (a pickle file), expected {WEIGHTS_NAME}; pickle files are never loaded "
                f"because they can run code: convert it with safetensors in a trusted environment",
            )
        _fail(path, f"missing {WEIGHTS_NAME}")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ShiraInputError(f"{weights}: not a readable safetensors file ({exc})") from None
    values: dict[str, torch.Tensor] = {}
    indices: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(KEY_PREFIX):
            _fail(weights, f"key {key!r} does not start with {KEY_PREFIX!r} (not PEFT's layout)")
        stem = key[len(KEY_PREFIX) :]
        if stem.endswith(_VALUES):
            values[stem[: -len(_VALUES)]] = tensor
        elif stem.endswith(_INDICES):
            indices[stem[: -len(_INDICES)]] = tensor
        else:
            extra[stem] = tensor
    missing = sorted(set(values) ^ set(indices))
    if missing:
        lines = [
            f"{KEY_PREFIX}{m}{_INDICES if m in values else _VALUES} is missing (found only "
            f"{KEY_PREFIX}{m}{_VALUES if m in values else _INDICES})"
            for m in missing
        ]
        _fail(weights, "incomplete adapter:\n  " + "\n  ".join(lines))
    if not values:
        _fail(weights, f"no SHiRA tensors (expected keys ending in {_VALUES} and {_INDICES})")
    deltas = {m: _check_delta(weights, m, indices[m], values[m]) for m in sorted(values)}
    modules_to_save: dict[str, dict[str, torch.Tensor]] = {}
    for stem, tensor in extra.items():
        module, _, param = stem.rpartition(".")
        modules_to_save.setdefault(module, {})[param] = tensor
    return AdapterCheckpoint(config=config, deltas=deltas, modules_to_save=modules_to_save, name=name, source=str(path))


def write_adapter_dir(checkpoint: AdapterCheckpoint, directory: Union[str, os.PathLike]) -> Path:
    """Write one adapter in PEFT's layout (config + safetensors), each file atomically."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for module, delta in checkpoint.deltas.items():
        tensors[f"{KEY_PREFIX}{module}{_VALUES}"] = delta.values.detach().cpu().contiguous()
        tensors[f"{KEY_PREFIX}{module}{_INDICES}"] = delta.indices.detach().cpu().to(torch.int32).contiguous()
    for module, state in checkpoint.modules_to_save.items():
        for param, tensor in state.items():
            tensors[f"{KEY_PREFIX}{module}.{param}"] = tensor.detach().cpu().contiguous()
    with atomic_path(path / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    checkpoint.config.save_pretrained(path)
    return path
