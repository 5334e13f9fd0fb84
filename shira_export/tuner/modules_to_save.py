"""`modules_to_save`: a trainable copy of a whole module per adapter (e.g. a fresh
classification head), saved with the adapter, as PEFT does."""

from __future__ import annotations

import copy
from typing import Optional

from torch import nn

from shira_export.tuner.mixed import current_rows, mixed_head_forward


class ModulesToSaveWrapper(nn.Module):
    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.disable_adapters = False
        self.train(original_module.training)

    def add_adapter(self, name: str, *, trainable: bool) -> nn.Module:
        replica = copy.deepcopy(self.original_module)
        replica.requires_grad_(trainable)
        self.modules_to_save[name] = replica
        return replica

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_adapter(self, name: Optional[str]) -> None:
        self.active_adapter = name if name is not None and name in self.modules_to_save else None

    def active_module(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        if not self.disable_adapters and current_rows() is not None and args:
            return mixed_head_forward(self, *args, **kwargs)  # adapter_names=[...]: one per row
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module(), name)
