"""ShiraModel: injects SHiRA layers into a transformers model and manages named
adapters (add, activate, switch, enable / disable, mixed batches).

Model-level work lives here and in its two mixins (lifecycle.py: merge, unload, delete,
fuse; persistence.py: save, load, state dicts); per-layer math is in layer.py. The
wrapper is a plain nn.Module, so it trains under transformers.Trainer, DDP and accelerate.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections import Counter
from typing import Iterator, Optional, Sequence, TypeVar, Union

import torch
from torch import nn

from shira_export.artifacts.tasks import TASKS, Task
from shira_export.errors import ShiraInputError
from shira_export.tuner.checkpoint import AdapterCheckpoint
from shira_export.tuner.config import MaskType, ShiraConfig
from shira_export.tuner.injection import draw_deltas
from shira_export.tuner.layer import ShiraLayer
from shira_export.tuner.activation import ActivationMixin
from shira_export.tuner.lifecycle import LifecycleMixin
from shira_export.tuner.mixed import BASE_ROW
from shira_export.tuner.modules_to_save import ModulesToSaveWrapper
from shira_export.tuner.persistence import PersistenceMixin

__all__ = ["ShiraModel", "get_shira_model", "inject_adapter_in_model"]

_SEQ_CLS_HEADS = TASKS[Task.TEXT_CLASSIFICATION].head_names  # PEFT saves these heads for SEQ_CLS
_Wrapper = TypeVar("_Wrapper", ShiraLayer, ModulesToSaveWrapper)


class _ForwardToModel:
    """Instance-level forward carrying the wrapped model's signature, so that
    transformers.Trainer keeps the dataset columns the model accepts."""

    def __init__(self, owner: "ShiraModel") -> None:
        self.owner = owner
        self.__signature__ = inspect.signature(owner.model.forward)

    def __call__(self, *args, adapter_names: Optional[Sequence[str]] = None, **kwargs):
        if adapter_names is None:
            return self.owner.model(*args, **kwargs)
        with self.owner._mixed(adapter_names):
            return self.owner.model(*args, **kwargs)


class ShiraModel(ActivationMixin, LifecycleMixin, PersistenceMixin, nn.Module):
    def __init__(
        self,
        model: nn.Module,
        config: Optional[ShiraConfig] = None,
        adapter_name: str = "default",
        *,
        mask_grads: Optional[dict[str, torch.Tensor]] = None,
        resident_training: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, ShiraConfig] = {}
        self._active: list[str] = []
        self._resident_training = bool(resident_training)
        self._warned_resident = False
        self._quiet = False  # internal walks over parameters (zero_grad, counts) do not warn
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

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> Union[str, list[str], None]:
        """The active adapter's name; a list when several are active (as in PEFT)."""
        if not self._active:
            return None
        return self._active[0] if len(self._active) == 1 else list(self._active)

    def get_base_model(self) -> nn.Module:
        self._warn_if_resident("get_base_model()")
        return self.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = [p for _, p in nn.Module.named_parameters(self)]
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ---- resident training (the trained adapter stays merged between steps) -----------
    @property
    def resident_training(self) -> bool:
        return self._resident_training

    @resident_training.setter
    def resident_training(self, enabled: bool) -> None:
        """False: train on the delta path, so W holds the base weight at every moment."""
        self._resident_training = bool(enabled)
        for _, layer in self.shira_layers():
            layer.resident = self._resident_training
            if not enabled:
                layer.settle()

    def settle(self) -> None:
        """Put back the base weights that training keeps merged (see ShiraLayer.settle)."""
        for _, layer in self.shira_layers():
            layer.settle()

    def _warn_if_resident(self, where: str) -> None:
        if (
            self._quiet
            or self._warned_resident
            or not any(layer._resident is not None for _, layer in self.shira_layers())
        ):
            return
        self._warned_resident = True
        warnings.warn(
            f"{where}: between training steps the trained SHiRA adapter stays merged in the base weights, so "
            "those tensors read W + S at the adapter's positions (gradients and optimizers are unaffected). Call "
            "model.settle() or model.eval() before reading base weights, or set model.resident_training = False.",
            stacklevel=3,
        )

    def named_parameters(self, *args, **kwargs):
        self._warn_if_resident("named_parameters()")
        return super().named_parameters(*args, **kwargs)

    def parameters(self, recurse: bool = True):
        self._warn_if_resident("parameters()")
        quiet, self._quiet = self._quiet, True  # nn.Module.parameters calls named_parameters
        try:
            return iter(list(super().parameters(recurse)))
        finally:
            self._quiet = quiet

    def zero_grad(self, set_to_none: bool = True) -> None:
        quiet, self._quiet = self._quiet, True
        try:
            super().zero_grad(set_to_none)
        finally:
            self._quiet = quiet

    # ---- adding adapters --------------------------------------------------------------
    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..", BASE_ROW):
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
        if config.mask_type is MaskType.CUSTOM and config.mask_fn is None:
            raise ShiraInputError(
                "ShiraConfig(mask_type='custom') needs mask_fn: set config.mask_fn = fn, with "
                "fn(base_layer, r, ...) returning a 0/1 mask of shape (out, in) with r*(in+out) ones"
            )
        config = copy.copy(config)
        if config.target_modules is None:
            from shira_export.tuner.targets import default_targets

            config.target_modules = default_targets(self.model)
        config.modules_to_save = self._heads_to_save(config) or None
        self.settle()  # masks read the base weights
        deltas = draw_deltas(self.model, config, mask_grads)
        heads: dict[str, dict[str, torch.Tensor]] = {p: {} for p in self._resolve_heads(config.modules_to_save or [])}
        self._install(
            AdapterCheckpoint(config=config, deltas=deltas, modules_to_save=heads, name=adapter_name),
            trainable=not config.inference_mode,
        )

    def _resolve_heads(self, names: Sequence[str]) -> list[str]:
        found = []
        for path, _ in self.model.named_modules():
            if any(path == n or path.endswith("." + n) for n in names) and ".modules_to_save." not in path:
                if ".original_module" not in path:
                    found.append(path)
        return found

    def _locate(self, path: str) -> tuple[nn.Module, str]:
        parent_path, _, child = path.rpartition(".")
        return (self.model.get_submodule(parent_path) if parent_path else self.model), child

    def _wrapped(self, path: str, wrapper_cls: type[_Wrapper], created: list[str]) -> _Wrapper:
        """The module at `path`, wrapped in `wrapper_cls` in place if it is not yet (then
        its path goes to `created`, for a rollback)."""
        parent, child = self._locate(path)
        module = getattr(parent, child)
        if not isinstance(module, wrapper_cls):
            module = wrapper_cls(module)
            if isinstance(module, ShiraLayer):
                module.resident = self._resident_training
            setattr(parent, child, module)
            created.append(path)
            self.__dict__.pop("_index", None)
        return module

    def _mark_shared_weights(self) -> None:
        """A SHiRA layer whose weight another module also uses (a tied head) must not keep
        the adapter merged between calls: that module would read W + S."""
        uses = Counter(id(p) for _, p in self.model.named_parameters(remove_duplicate=False))
        for _, layer in self.shira_layers():
            layer.weight_shared = uses[id(layer.base_layer.weight)] > 1

    def _install(self, ckpt: AdapterCheckpoint, *, trainable: bool) -> None:
        """Put a validated checkpoint into the model. All or nothing: if anything fails
        on the way (memory, a device move, an interrupt), what was added is taken out."""
        name = ckpt.name
        created: list[str] = []
        layers: list[ShiraLayer] = []
        heads: list[ModulesToSaveWrapper] = []
        try:
            for path, delta in ckpt.deltas.items():
                layer = self._wrapped(path, ShiraLayer, created)
                layer.add_adapter(name, delta.indices, delta.values, trainable=trainable)
                layers.append(layer)
            for path, state in ckpt.modules_to_save.items():
                wrapper = self._wrapped(path, ModulesToSaveWrapper, created)
                replica = wrapper.add_adapter(name, trainable=trainable)
                heads.append(wrapper)
                if state:
                    replica.load_state_dict(state, strict=True)
            self.peft_config[name] = ckpt.config
            self._mark_shared_weights()
            if not self._active:
                self.set_adapter(name)
            else:
                self._refresh_trainable()
        except BaseException:
            self.peft_config.pop(name, None)
            for module in layers + heads:
                if name in (module.shira_weight if isinstance(module, ShiraLayer) else module.modules_to_save):
                    module.delete_adapter(name)
            for path in reversed(created):  # wrappers made for this adapter only
                parent, child = self._locate(path)
                module = getattr(parent, child)
                setattr(parent, child, module.base_layer if isinstance(module, ShiraLayer) else module.original_module)
            self.__dict__.pop("_index", None)
            self._mark_shared_weights()
            raise

    # ---- activation -------------------------------------------------------------------
    def _refresh_trainable(self) -> None:
        def trainable(name: str) -> bool:
            return name in self._active and not self.peft_config[name].inference_mode

        for _, layer in self.shira_layers():
            for name, param in layer.shira_weight.items():
                param.requires_grad_(trainable(name))
        for _, wrapper in self._wrappers():
            for name, replica in wrapper.modules_to_save.items():
                replica.requires_grad_(trainable(name))

    def _known(self, names: Sequence[str]) -> list[str]:
        names = [names] if isinstance(names, str) else list(names)
        missing = [n for n in names if n not in self.peft_config]
        if missing or not names:
            raise ShiraInputError(
                f"no adapter {missing[0] if missing else names!r}; loaded: {sorted(self.peft_config)}"
            )
        return names

    def set_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None:
        """Make `adapter_name` (or a list: their deltas add) the adapters forward uses.
        If adapters are merged, the weights are switched to them in place."""
        names = self._known(adapter_name)
        for _, wrapper in self._wrappers():
            with_head = [n for n in names if n in wrapper.modules_to_save]
            if len(with_head) > 1:
                raise ShiraInputError(
                    f"adapters {with_head} each have their own copy of modules_to_save module "
                    f"{type(wrapper.original_module).__name__}: only one of them can be active"
                )
        was_merged = any(layer.merged for _, layer in self.shira_layers())
        for _, layer in self.shira_layers():
            layer.unmerge()
            layer.active_adapters = [n for n in names if n in layer.shira_weight]
            if was_merged:
                layer.merge()
        for _, wrapper in self._wrappers():
            wrapper.set_adapter(next((n for n in names if n in wrapper.modules_to_save), None))
        self._active = names
        self._refresh_trainable()

    def switch_adapter(self, adapter_name: str) -> None:
        """Move the merged weights to `adapter_name` in place, in time proportional to
        the nonzeros: restore the old support's saved entries, scatter the new values."""
        self._known([adapter_name])
        with torch.no_grad():
            for _, layer in self.shira_layers():
                layer.switch_merged(adapter_name)
        for _, wrapper in self._wrappers():
            wrapper.set_adapter(adapter_name)
        self._active = [adapter_name]
        self._refresh_trainable()


def get_shira_model(
    model: nn.Module,
    config: ShiraConfig,
    adapter_name: str = "default",
    *,
    mask_grads: Optional[dict[str, torch.Tensor]] = None,
    resident_training: bool = True,
) -> ShiraModel:
    """Wrap `model` with a new SHiRA adapter; only the adapter's values train."""
    return ShiraModel(model, config, adapter_name, mask_grads=mask_grads, resident_training=resident_training)


def inject_adapter_in_model(
    config: ShiraConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
) -> nn.Module:
    """PEFT's inject_adapter_in_model: SHiRA layers put into `model` in place, which is
    returned (no wrapper). With `state_dict`, the targets are the modules its
    `.shira_weight` keys name (the values are not used, as in PEFT). `low_cpu_mem_usage`
    is accepted and has no effect: no weight-sized tensor is created here."""
    del low_cpu_mem_usage
    if state_dict is not None:
        stems = sorted({k.split(".shira_weight")[0] for k in state_dict if ".shira_weight" in k})
        targets = [s[len("base_model.model.") :] if s.startswith("base_model.model.") else s for s in stems]
        if not targets:
            raise ShiraInputError(
                "inject_adapter_in_model: state_dict has no '.shira_weight' keys to take targets from"
            )
        config = copy.copy(config)
        config.target_modules = targets
    return ShiraModel(model, config, adapter_name).model
