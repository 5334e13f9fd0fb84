"""ShiraModel: injects SHiRA layers into a transformers model and manages named
adapters (add, activate, switch, merge, fuse, save, load).

Model-level work lives here; per-layer math is in layer.py. The wrapper is a plain
nn.Module, so it trains under transformers.Trainer, torch DDP and accelerate.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from shira_export.errors import ShiraInputError
from shira_export.tuner.checkpoint import AdapterCheckpoint, SparseDelta, read_adapter_dir, write_adapter_dir
from shira_export.tuner.config import ShiraConfig
from shira_export.tuner.fusion import fuse_deltas
from shira_export.tuner.layer import ShiraLayer
from shira_export.tuner.injection import draw_deltas
from shira_export.tuner.modules_to_save import ModulesToSaveWrapper
from shira_export.tuner.targets import resolve_target_modules

__all__ = ["ShiraModel", "get_shira_model"]

_SEQ_CLS_HEADS = ("classifier", "score")


class _ForwardToModel:
    """Instance-level forward carrying the wrapped model's signature, so that
    transformers.Trainer keeps the dataset columns the model accepts."""

    def __init__(self, owner: "ShiraModel") -> None:
        self.owner = owner
        self.__signature__ = inspect.signature(owner.model.forward)

    def __call__(self, *args, **kwargs):
        return self.owner.model(*args, **kwargs)


class ShiraModel(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        config: Optional[ShiraConfig] = None,
        adapter_name: str = "default",
        *,
        mask_grads: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, ShiraConfig] = {}
        self.active_adapter: Optional[str] = None
        model.requires_grad_(False)
        self.forward = _ForwardToModel(self)
        if config is not None:
            self.add_adapter(adapter_name, config, mask_grads=mask_grads)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ---- introspection ----------------------------------------------------------------
    def _module_index(self) -> tuple[list[tuple[str, ShiraLayer]], list[tuple[str, ModulesToSaveWrapper]]]:
        """(SHiRA layers, modules_to_save wrappers) with their paths, found once: walking
        a 7B model's modules costs more than a switch. Our wrapping and unwrapping drop it."""
        index = self.__dict__.get("_index")
        if index is None:
            layers, wrappers = [], []
            for path, module in self.model.named_modules():
                if isinstance(module, ShiraLayer):
                    layers.append((path, module))
                elif isinstance(module, ModulesToSaveWrapper):
                    wrappers.append((path, module))
            index = self.__dict__["_index"] = (layers, wrappers)
        return index

    def shira_layers(self) -> Iterator[tuple[str, ShiraLayer]]:
        return iter(self._module_index()[0])

    def _wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        return iter(self._module_index()[1])

    def get_base_model(self) -> nn.Module:
        return self.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ---- adding adapters --------------------------------------------------------------------
    def _check_new_name(self, name: str) -> None:
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ShiraInputError(f"adapter name {name!r} is not a valid folder name")
        if name in self.peft_config:
            raise ShiraInputError(f"adapter {name!r} already exists (delete_adapter first or pick another name)")

    def _heads_to_save(self, config: ShiraConfig) -> list[str]:
        names = list(config.modules_to_save or [])
        if config.task_type == "SEQ_CLS":
            names += [h for h in _SEQ_CLS_HEADS if h not in names]
        return names

    def add_adapter(
        self, adapter_name: str, config: ShiraConfig, *, mask_grads: Optional[dict[str, torch.Tensor]] = None
    ) -> None:
        """Create a new adapter from `config` (masks drawn now, values zero unless init_weights=False)."""
        self._check_new_name(adapter_name)
        config = copy.copy(config)
        if config.target_modules is None:
            from shira_export.tuner.targets import default_targets

            config.target_modules = default_targets(self.model)
        config.modules_to_save = self._heads_to_save(config) or None
        self._settle()  # masks read the base weights
        deltas = draw_deltas(self.model, config, mask_grads)
        heads = {p: {} for p in self._resolve_heads(config.modules_to_save or [])}
        self._install(AdapterCheckpoint(config=config, deltas=deltas, modules_to_save=heads, name=adapter_name),
                      trainable=not config.inference_mode)

    def _resolve_heads(self, names: Sequence[str]) -> list[str]:
        found = []
        for path, module in self.model.named_modules():
            if any(path == n or path.endswith("." + n) for n in names) and ".modules_to_save." not in path:
                if ".original_module" not in path:
                    found.append(path)
        return found

    def _locate(self, path: str) -> tuple[nn.Module, str]:
        parent_path, _, child = path.rpartition(".")
        return (self.model.get_submodule(parent_path) if parent_path else self.model), child

    def _wrapped(self, path: str, wrapper_cls: type) -> nn.Module:
        """The module at `path`, wrapped in `wrapper_cls` in place if it is not yet."""
        parent, child = self._locate(path)
        module = getattr(parent, child)
        if not isinstance(module, wrapper_cls):
            module = wrapper_cls(module)
            setattr(parent, child, module)
            self.__dict__.pop("_index", None)
        return module

    def _settle(self) -> None:
        """Put back the base weights that training keeps merged (see ShiraLayer.settle)."""
        for _, layer in self.shira_layers():
            layer.settle()

    def _mark_shared_weights(self) -> None:
        """A SHiRA layer whose weight another module also uses (a tied head) must not keep
        the adapter merged between calls: that module would read W + S."""
        uses = Counter(id(p) for _, p in self.model.named_parameters(remove_duplicate=False))
        for _, layer in self.shira_layers():
            layer.weight_shared = uses[id(layer.base_layer.weight)] > 1

    def _install(self, ckpt: AdapterCheckpoint, *, trainable: bool) -> None:
        """Put a validated checkpoint into the model (all checks are done before this)."""
        name = ckpt.name
        for path, delta in ckpt.deltas.items():
            self._wrapped(path, ShiraLayer).add_adapter(name, delta.indices, delta.values, trainable=trainable)
        self._mark_shared_weights()
        for path, state in ckpt.modules_to_save.items():
            replica = self._wrapped(path, ModulesToSaveWrapper).add_adapter(name, trainable=trainable)
            if state:
                replica.load_state_dict(state, strict=True)
        self.peft_config[name] = ckpt.config
        if self.active_adapter is None:
            self.set_adapter(name)
        else:
            self._refresh_trainable()

    # ---- activation -----------------------------------------------------------------------------
    def _refresh_trainable(self) -> None:
        for _, layer in self.shira_layers():
            for name, param in layer.shira_weight.items():
                param.requires_grad_(name == self.active_adapter and not self.peft_config[name].inference_mode)
        for _, wrapper in self._wrappers():
            for name, replica in wrapper.modules_to_save.items():
                replica.requires_grad_(name == self.active_adapter and not self.peft_config[name].inference_mode)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the one used by forward. If adapters are merged, the
        weights are switched to it in place (see switch_adapter)."""
        if adapter_name not in self.peft_config:
            raise ShiraInputError(f"no adapter {adapter_name!r}; loaded: {sorted(self.peft_config)}")
        was_merged = any(layer.merged for _, layer in self.shira_layers())
        for _, layer in self.shira_layers():
            layer.unmerge()
            layer.active_adapters = [adapter_name] if adapter_name in layer.shira_weight else []
            if was_merged:
                layer.merge()
        for _, wrapper in self._wrappers():
            wrapper.set_adapter(adapter_name)
        self.active_adapter = adapter_name
        self._refresh_trainable()

    def switch_adapter(self, adapter_name: str) -> None:
        """Move the merged weights to `adapter_name` in place, in time proportional to
        the nonzeros: restore the old support's saved entries, scatter the new values."""
        if adapter_name not in self.peft_config:
            raise ShiraInputError(f"no adapter {adapter_name!r}; loaded: {sorted(self.peft_config)}")
        with torch.no_grad():
            for _, layer in self.shira_layers():
                layer.switch_merged(adapter_name)
        for _, wrapper in self._wrappers():
            wrapper.set_adapter(adapter_name)
        self.active_adapter = adapter_name
        self._refresh_trainable()

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes the base model's outputs."""
        merged = {id(layer): list(layer.merged_adapters) for _, layer in self.shira_layers()}
        layers = [layer for _, layer in self.shira_layers()]
        wrappers = [w for _, w in self._wrappers()]
        try:
            for layer in layers:
                layer.unmerge()
                layer.disable_adapters = True
            for wrapper in wrappers:
                wrapper.disable_adapters = True
            yield
        finally:
            for layer in layers:
                layer.disable_adapters = False
                layer.merge(merged[id(layer)])
            for wrapper in wrappers:
                wrapper.disable_adapters = False

    def set_scale(self, adapter_name: str, scale: float) -> None:
        """Inference-time strength: W + scale * S."""
        if adapter_name not in self.peft_config:
            raise ShiraInputError(f"no adapter {adapter_name!r}; loaded: {sorted(self.peft_config)}")
        for _, layer in self.shira_layers():
            if adapter_name in layer.scaling:
                merged = list(layer.merged_adapters)
                layer.unmerge()
                layer.scaling[adapter_name] = float(scale)
                layer.merge(merged)

    # ---- merge -------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, *, safe_merge: bool = False) -> None:
        for _, layer in self.shira_layers():
            layer.merge(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for _, layer in self.shira_layers():
            layer.unmerge()

    def _unwrap(self, *, merge: bool, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None) -> nn.Module:
        if merge:
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
        for path, module in list(self.shira_layers()) + list(self._wrappers()):
            parent, child = self._locate(path)
            if isinstance(module, ShiraLayer):
                setattr(parent, child, module.base_layer)
            else:
                setattr(parent, child, module.active_module() if merge else module.original_module)
        self.__dict__.pop("_index", None)
        self.peft_config.clear()
        self.active_adapter = None
        return self.model

    def merge_and_unload(self, *, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None) -> nn.Module:
        """Fold the active adapter into the weights and return the plain transformers model."""
        return self._unwrap(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Return the base model without any adapter."""
        self.unmerge_adapter()
        return self._unwrap(merge=False)

    # ---- delete / fuse --------------------------------------------------------------------------------
    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ShiraInputError(f"no adapter {adapter_name!r}; loaded: {sorted(self.peft_config)}")
        for _, layer in self.shira_layers():
            if adapter_name in layer.merged_adapters:
                layer.unmerge()
            if adapter_name in layer.shira_weight:
                layer.delete_adapter(adapter_name)
        for _, wrapper in self._wrappers():
            if adapter_name in wrapper.modules_to_save:
                wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None
            if self.peft_config:
                self.set_adapter(next(iter(self.peft_config)))

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str) -> None:
        """New adapter = sum_i weights[i] * adapters[i] on the union of their supports
        (values summed where supports overlap). Saved and loaded like any adapter."""
        self._check_new_name(adapter_name)
        missing = [a for a in adapters if a not in self.peft_config]
        if missing or len(adapters) != len(weights) or not adapters:
            raise ShiraInputError(
                f"add_weighted_adapter needs one weight per known adapter: adapters={list(adapters)}, "
                f"weights={list(weights)}, unknown={missing}"
            )
        ckpts = [self._checkpoint(a, scaled=True) for a in adapters]
        ckpt = fuse_deltas(ckpts, weights, adapter_name, self.model)
        self._install(ckpt, trainable=False)

    # ---- save / load -------------------------------------------------------------------------------------
    def _checkpoint(self, adapter_name: str, *, scaled: bool = False) -> AdapterCheckpoint:
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
        return AdapterCheckpoint(config=self.peft_config[adapter_name], deltas=deltas, modules_to_save=heads, name=adapter_name)

    def save_pretrained(self, save_directory: Union[str, os.PathLike], selected_adapters: Optional[Sequence[str]] = None) -> None:
        """Every adapter in PEFT's layout: "default" at the top, others in subfolders."""
        root = Path(save_directory)
        for name in selected_adapters or list(self.peft_config):
            if name not in self.peft_config:
                raise ShiraInputError(f"no adapter {name!r}; loaded: {sorted(self.peft_config)}")
            ckpt = self._checkpoint(name)
            ckpt.config = copy.copy(ckpt.config)
            ckpt.config.inference_mode = True  # as PEFT writes it
            write_adapter_dir(ckpt, root if name == "default" else root / name)

    def load_adapter(self, path: Union[str, os.PathLike], adapter_name: str = "default", *, is_trainable: bool = False) -> None:
        """Load a PEFT-layout adapter folder (ours or PEFT's). Every check runs before
        the model is touched: a failed load leaves it as it was."""
        self._check_new_name(adapter_name)
        folder = Path(path)
        # save_pretrained puts non-default adapters in NAME/: a root folder plus a name means that subfolder.
        if adapter_name != "default" and (folder / adapter_name / "adapter_config.json").exists():
            folder = folder / adapter_name
        ckpt = read_adapter_dir(folder, name=adapter_name)
        ckpt.validate_against(self.model)
        expected = set(resolve_target_modules(self.model, ckpt.config))
        found = set(ckpt.deltas)
        if expected != found:
            raise ShiraInputError(
                f"{folder}: adapter_config.json targets modules without SHiRA tensors in the file "
                f"{sorted(expected - found)[:5]} and the file has tensors for untargeted modules "
                f"{sorted(found - expected)[:5]}"
            )
        ckpt.config.inference_mode = not is_trainable
        self._install(ckpt, trainable=is_trainable)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, path: Union[str, os.PathLike], adapter_name: str = "default", *, is_trainable: bool = False
    ) -> "ShiraModel":
        shira = cls(model)
        try:
            shira.load_adapter(path, adapter_name, is_trainable=is_trainable)
        except BaseException:
            shira._unwrap(merge=False)
            raise
        return shira


def get_shira_model(
    model: nn.Module,
    config: ShiraConfig,
    adapter_name: str = "default",
    *,
    mask_grads: Optional[dict[str, torch.Tensor]] = None,
) -> ShiraModel:
    """Wrap `model` with a new SHiRA adapter; only the adapter's values train."""
    return ShiraModel(model, config, adapter_name, mask_grads=mask_grads)
