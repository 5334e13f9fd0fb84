"""ShiraModel's merge / unmerge / unload / delete / fuse, with PEFT's rules: merging
what is merged warns and does nothing, a merged adapter cannot be deleted."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Optional, Sequence, Union, cast

from torch import nn

from shira_export.errors import ShiraInputError
from shira_export.tuner.fusion import fuse_deltas

if TYPE_CHECKING:
    from shira_export.tuner._host import ShiraHost
    from shira_export.tuner.modules_to_save import ModulesToSaveWrapper

__all__ = ["LifecycleMixin"]


class LifecycleMixin:
    def merge_adapter(
        self: ShiraHost, adapter_names: Optional[Union[str, Sequence[str]]] = None, *, safe_merge: bool = False
    ) -> None:
        """Fold the adapters (default: the active ones) into the base weights in place;
        unmerge_adapter() restores them bit for bit."""
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        names = list(self._active if adapter_names is None else self._known(adapter_names))
        merged = {n for _, layer in self.shira_layers() for n in layer.merged_adapters}
        if merged:
            todo = [n for n in names if n not in merged]
            if todo:
                warnings.warn(
                    f"Already following adapters were merged {','.join(sorted(merged))}. "
                    f"You are now additionally merging {','.join(todo)}.",
                    stacklevel=2,
                )
            else:
                warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
                return
        for _, layer in self.shira_layers():
            layer.merge(names, safe_merge=safe_merge)

    def unmerge_adapter(self: ShiraHost) -> None:
        for _, layer in self.shira_layers():
            layer.unmerge()

    def _unwrap(
        self: ShiraHost, *, merge: bool, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None
    ) -> nn.Module:
        if merge:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="All adapters are already merged")
                self.merge_adapter(adapter_names, safe_merge=safe_merge)
        self.settle()
        for path, module in list(self.shira_layers()) + list(self._wrappers()):
            parent, child = self._locate(path)
            if hasattr(module, "base_layer"):
                setattr(parent, child, module.base_layer)
            else:  # a modules_to_save wrapper: every ShiraLayer has base_layer
                wrapper = cast("ModulesToSaveWrapper", module)
                setattr(parent, child, wrapper.active_module() if merge else wrapper.original_module)
        self.__dict__.pop("_index", None)
        self.peft_config.clear()
        self._active: list[str] = []
        return self.model

    def merge_and_unload(
        self: ShiraHost, *, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None
    ) -> nn.Module:
        """Fold the active adapter into the weights and return the plain transformers model."""
        return self._unwrap(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self: ShiraHost) -> nn.Module:
        """Return the base model without any adapter."""
        self.unmerge_adapter()
        return self._unwrap(merge=False)

    def delete_adapter(self: ShiraHost, adapter_name: str) -> None:
        """Remove an adapter. As in PEFT, a merged adapter is refused: unmerge it first."""
        self._known([adapter_name])
        if any(adapter_name in layer.merged_adapters for _, layer in self.shira_layers()):
            raise ShiraInputError(
                f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them first."
            )
        for _, layer in self.shira_layers():
            if adapter_name in layer.shira_weight:
                layer.delete_adapter(adapter_name)
        for _, wrapper in self._wrappers():
            if adapter_name in wrapper.modules_to_save:
                wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if adapter_name in self._active:
            rest = [n for n in self._active if n != adapter_name]
            self._active = []
            if rest or self.peft_config:
                self.set_adapter(rest or next(iter(self.peft_config)))

    def add_weighted_adapter(
        self: ShiraHost, adapters: Sequence[str], weights: Sequence[float], adapter_name: str
    ) -> None:
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
