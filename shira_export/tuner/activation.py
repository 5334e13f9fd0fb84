"""ShiraModel's adapter switches beyond set_adapter: disabling (for a block or until
re-enabled), gradients per adapter, inference-time scale, and mixed-adapter batches."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union


from shira_export.errors import ShiraInputError
from shira_export.tuner.mixed import BASE_ROW, mixed_batch

if TYPE_CHECKING:
    from shira_export.tuner._host import ShiraHost

__all__ = ["ActivationMixin"]


class ActivationMixin:
    @contextmanager
    def disable_adapter(self: ShiraHost) -> Iterator[None]:
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

    def disable_adapter_layers(self: ShiraHost) -> None:
        """Until enable_adapter_layers(): base outputs, adapters frozen (as PEFT does,
        merged adapters are unmerged, and stay so after enabling)."""
        for _, layer in self.shira_layers():
            layer.unmerge()
            layer.disable_adapters = True
            for param in layer.shira_weight.values():
                param.requires_grad_(False)
        for _, wrapper in self._wrappers():
            wrapper.disable_adapters = True
            wrapper.modules_to_save.requires_grad_(False)

    def enable_adapter_layers(self: ShiraHost) -> None:
        for _, layer in self.shira_layers():
            layer.disable_adapters = False
        for _, wrapper in self._wrappers():
            wrapper.disable_adapters = False
        self._refresh_trainable()

    def set_requires_grad(
        self: ShiraHost, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True
    ) -> None:
        """Turn gradients of the named adapters (values and modules_to_save copies) on or off."""
        for name in self._known(adapter_names):
            for _, layer in self.shira_layers():
                if name in layer.shira_weight:
                    layer.shira_weight[name].requires_grad_(requires_grad)
            for _, wrapper in self._wrappers():
                if name in wrapper.modules_to_save:
                    wrapper.modules_to_save[name].requires_grad_(requires_grad)

    def set_scale(self: ShiraHost, adapter_name: str, scale: float) -> None:
        """Inference-time strength: W + scale * S."""
        self._known([adapter_name])
        for _, layer in self.shira_layers():
            if adapter_name in layer.scaling:
                merged = list(layer.merged_adapters)
                layer.unmerge()
                layer.scaling[adapter_name] = float(scale)
                layer.merge(merged)

    # ---- mixed batches ----------------------------------------------------------------
    @contextmanager
    def _mixed(self: ShiraHost, adapter_names: Sequence[str]) -> Iterator[None]:
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise ShiraInputError(f"adapter_names must be a list of adapter names, one per row, got {adapter_names!r}")
        unknown = sorted({n for n in adapter_names if n != BASE_ROW and n not in self.peft_config})
        if unknown:
            raise ShiraInputError(
                f"adapter_names: no adapter {unknown}; loaded: {sorted(self.peft_config)} "
                f"(and {BASE_ROW!r} for rows without one)"
            )
        if self.training:
            raise ShiraInputError("Cannot pass `adapter_names` when the model is in training mode (call model.eval())")
        if any(layer.merged for _, layer in self.shira_layers()):
            raise ShiraInputError("Cannot pass `adapter_names` while adapters are merged: unmerge_adapter() first")
        with mixed_batch(adapter_names):
            yield

    def generate(self: ShiraHost, *args, adapter_names: Optional[Sequence[str]] = None, **kwargs):
        """transformers' generate; with `adapter_names`, each row with its own adapter."""
        # The ignores: torch's stub types a Module's unknown attribute as Tensor | Module;
        # generate is the transformers model's own method.
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)  # type: ignore[operator]
        with self._mixed(adapter_names):
            return self.model.generate(*args, **kwargs)  # type: ignore[operator]
