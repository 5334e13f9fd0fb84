"""ShiraModel's save / load in PEFT's adapter layout, the model card, and the base
model's state dict under its own keys (PEFT's get/set_base_model_state_dict).

A load checks everything before the model is touched, and the install itself is all
or nothing (ShiraModel._install): a failed load leaves the model as it was, down to
requires_grad and train/eval mode of a plain model given to from_pretrained.
"""

from __future__ import annotations

import copy
import os
from collections import namedtuple
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, TypeVar, Union

import torch
from torch import nn

from shira_export.errors import ShiraInputError
from shira_export.tuner.checkpoint import (
    KEY_PREFIX,
    AdapterCheckpoint,
    SparseDelta,
    read_adapter_dir,
    write_adapter_dir,
)
from shira_export.tuner.config import PEFT_FORMAT_VERSION, MaskType, ShiraConfig
from shira_export.tuner.targets import resolve_target_modules

if TYPE_CHECKING:
    from shira_export.tuner._host import ShiraHost

__all__ = ["PersistenceMixin"]

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])
_HALF = (torch.float16, torch.bfloat16)
_Host = TypeVar("_Host", bound="ShiraHost")  # from_pretrained returns the class it is called on


class PersistenceMixin:
    def _checkpoint(self: ShiraHost, adapter_name: str, *, scaled: bool = False) -> AdapterCheckpoint:
        """The adapter as stored (raw values: the scale is an inference setting), or
        with the scale applied (for fusion)."""
        deltas = {
            path: SparseDelta(
                layer.shira_indices[adapter_name].cpu(),
                (layer.delta_values(adapter_name) if scaled else layer.shira_weight[adapter_name].detach()).cpu(),
            )
            for path, layer in self.shira_layers()
            if adapter_name in layer.shira_weight
        }
        heads = {
            path: wrapper.modules_to_save[adapter_name].state_dict()
            for path, wrapper in self._wrappers()
            if adapter_name in wrapper.modules_to_save
        }
        return AdapterCheckpoint(
            config=self.peft_config[adapter_name], deltas=deltas, modules_to_save=heads, name=adapter_name
        )

    def save_pretrained(
        self: ShiraHost, save_directory: Union[str, os.PathLike], selected_adapters: Optional[Sequence[str]] = None
    ) -> None:
        """Every adapter in PEFT's layout: "default" at the top, others in subfolders,
        and a model card (README.md) at the top."""
        root = Path(save_directory)
        names = list(selected_adapters or list(self.peft_config))
        for name in names:
            if name not in self.peft_config:
                raise ShiraInputError(f"no adapter {name!r}; loaded: {sorted(self.peft_config)}")
            ckpt = self._checkpoint(name)
            ckpt.config = copy.copy(ckpt.config)
            ckpt.config.inference_mode = True  # as PEFT writes it
            if ckpt.config.auto_mapping is None:  # as PEFT records it
                ckpt.config.auto_mapping = {
                    "base_model_class": type(self.model).__name__,
                    "parent_library": type(self.model).__module__,
                }
            write_adapter_dir(ckpt, root if name == "default" else root / name)
        _write_model_card(self, root, names)

    def load_adapter(
        self: ShiraHost,
        path: Union[str, os.PathLike],
        adapter_name: str = "default",
        *,
        is_trainable: bool = False,
        config: Optional[ShiraConfig] = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """Load a PEFT-layout adapter folder (ours or PEFT's). Every check runs before
        the model is touched: a failed load leaves it as it was. `config` replaces the
        folder's adapter_config.json; `autocast_adapter_dtype` casts fp16/bf16 values to
        fp32 (PEFT's default); `low_cpu_mem_usage` has no effect (nothing is created
        before the file's tensors are read). Not trainable: the model goes to eval mode."""
        del low_cpu_mem_usage
        self._check_new_name(adapter_name)
        folder = Path(path)
        # save_pretrained puts non-default adapters in NAME/: a root folder plus a name means that subfolder.
        if adapter_name != "default" and (folder / adapter_name / "adapter_config.json").exists():
            folder = folder / adapter_name
        ckpt = read_adapter_dir(folder, name=adapter_name, config=config)
        ckpt.modules_to_save = _heads_by_module(self, ckpt, folder)
        ckpt.validate_against(self.model)
        expected = set(resolve_target_modules(self.model, ckpt.config))
        found = set(ckpt.deltas)
        if expected != found:
            raise ShiraInputError(
                f"{folder}: adapter_config.json targets modules without SHiRA tensors in the file "
                f"{sorted(expected - found)[:5]} and the file has tensors for untargeted modules "
                f"{sorted(found - expected)[:5]}"
            )
        if autocast_adapter_dtype:
            for delta in ckpt.deltas.values():
                if delta.values.dtype in _HALF:
                    delta.values = delta.values.float()
        ckpt.config = copy.copy(ckpt.config)
        ckpt.config.inference_mode = not is_trainable
        self._install(ckpt, trainable=is_trainable)
        if not is_trainable:
            self.eval()  # as PEFT: dropout off, outputs equal the saved model's

    @classmethod
    def from_pretrained(
        cls: type[_Host],
        model: nn.Module,
        path: Union[str, os.PathLike],
        adapter_name: str = "default",
        *,
        is_trainable: bool = False,
        config: Optional[ShiraConfig] = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        resident_training: bool = True,
    ) -> _Host:
        """Wrap `model` and load the adapter at `path` (see load_adapter). On failure the
        model is given back unchanged: no wrapper left, requires_grad and mode as before."""
        flags = [(p, p.requires_grad) for p in model.parameters()]
        modes = [(m, m.training) for m in model.modules()]
        shira = cls(model, resident_training=resident_training)
        try:
            shira.load_adapter(
                path,
                adapter_name,
                is_trainable=is_trainable,
                config=config,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
            )
        except BaseException:
            shira._unwrap(merge=False)
            for param, flag in flags:
                param.requires_grad_(flag)
            for module, mode in modes:
                module.training = mode
            raise
        return shira

    # ---- the base model's state dict under its own keys --------------------------------
    def _base_key_map(self: ShiraHost) -> dict[str, str]:
        """current state_dict key -> the key the unwrapped model has (adapter keys left out)."""
        infixes = [(f"{p}.base_layer.", f"{p}.") for p, _ in self.shira_layers()]
        infixes += [(f"{p}.original_module.", f"{p}.") for p, _ in self._wrappers()]
        skipped = tuple(f"{p}.modules_to_save." for p, _ in self._wrappers())
        skipped += tuple(f"{p}.shira_" for p, _ in self.shira_layers())
        mapping = {}
        for key in self.model.state_dict():
            if key.startswith(skipped):
                continue
            original = key
            for infix, plain in infixes:
                if key.startswith(infix):
                    original = plain + key[len(infix) :]
                    break
            mapping[key] = original
        return mapping

    def get_base_model_state_dict(self: ShiraHost) -> dict[str, torch.Tensor]:
        """The base model's state dict with its own keys (no base_layer / original_module
        infixes, no adapter tensors), base weights settled."""
        state = self.model.state_dict()
        return {original: state[key] for key, original in self._base_key_map().items()}

    def set_base_model_state_dict(self: ShiraHost, state_dict: dict[str, torch.Tensor], strict: bool = True):
        """Load a state dict with the base model's own keys; returns (missing_keys, unexpected_keys)."""
        to_current = {original: key for key, original in self._base_key_map().items()}
        unexpected = [k for k in state_dict if k not in to_current]
        missing = [k for k in to_current if k not in state_dict]
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"Error(s) in loading state_dict: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}"
            )
        self.model.load_state_dict({to_current[k]: v for k, v in state_dict.items() if k in to_current}, strict=False)
        return IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)


def _heads_by_module(shira: ShiraHost, ckpt: AdapterCheckpoint, folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The file's non-SHiRA tensors regrouped under the declared modules_to_save modules
    (a RoBERTa head `classifier` holds classifier.dense.* and classifier.out_proj.*).
    A tensor under no declared module, or a head with missing keys, is refused."""
    flat = {f"{m}.{k}": t for m, state in ckpt.modules_to_save.items() for k, t in state.items()}
    declared = shira._heads_to_save(ckpt.config)
    heads = sorted(shira._resolve_heads(declared), key=len, reverse=True)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    stray = []
    for key, tensor in flat.items():
        head = next((h for h in heads if key.startswith(h + ".")), None)
        if head is None:
            stray.append(KEY_PREFIX + key)
        else:
            grouped.setdefault(head, {})[key[len(head) + 1 :]] = tensor
    if stray:
        raise ShiraInputError(
            f"{folder}: tensors {stray[:5]} are neither SHiRA tensors (.shira_weight / .shira_indices) nor under a "
            f"module that adapter_config.json declares in modules_to_save ({ckpt.config.modules_to_save!r}"
            f"{', plus classifier/score for SEQ_CLS' if ckpt.config.task_type == 'SEQ_CLS' else ''})"
        )
    modules: dict[str, nn.Module] = dict(shira.model.named_modules())
    for head, state in grouped.items():
        module = modules[head]
        own = getattr(module, "original_module", module).state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ShiraInputError(
                f"{folder}: modules_to_save {head!r} lacks {[f'{KEY_PREFIX}{head}.{k}' for k in missing][:5]}"
                f" (a saved module holds its whole state)"
            )
    return grouped


def _write_model_card(shira: ShiraHost, root: Path, names: Sequence[str]) -> None:
    """README.md as PEFT writes one (library_name: peft, base_model, the versions), kept
    and extended if the folder has one already."""
    from shira_export import __version__
    from shira_export._io import atomic_write_text

    path = root / "README.md"
    base = getattr(getattr(shira.model, "config", None), "_name_or_path", "") or ""
    versions = [f"- PEFT {PEFT_FORMAT_VERSION} (adapter format)", f"- shira_export {__version__}"]
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
        missing = [line for line in versions if line not in text.splitlines()]
        if missing:
            text = text.rstrip("\n") + "\n\n### Framework versions\n\n" + "\n".join(missing) + "\n"
        atomic_write_text(path, text)
        return
    lines = [
        "---",
        f"base_model: {base!r}" if base else "base_model: ''",
        "library_name: peft",
        "tags:",
        f"- base_model:adapter:{base}",
        "- shira",
        "- shira_export",
        "- transformers",
    ]
    if type(shira.model).__name__.endswith("ForCausalLM"):
        lines.append("pipeline_tag: text-generation")
    lines += ["---", "", "# SHiRA adapters", ""]
    for name in names:
        config = shira.peft_config[name]
        nnz = sum(layer.nnz(name) for _, layer in shira.shira_layers() if name in layer.shira_weight)
        layers = sum(1 for _, layer in shira.shira_layers() if name in layer.shira_weight)
        where = "this folder" if name == "default" else f"`{name}/`"
        lines.append(
            f"- `{name}` ({where}): r={config.r}, mask {MaskType(config.mask_type).value}, {nnz:,d} values "
            f"over {layers} layers"
        )
    lines += [
        "",
        "Load with `peft.PeftModel.from_pretrained(base, folder)` or "
        "`shira_export.ShiraModel.from_pretrained(base, folder)`.",
        "",
        "### Framework versions",
        "",
        *versions,
        "",
    ]
    atomic_write_text(path, "\n".join(lines))
