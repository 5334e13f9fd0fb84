"""What ShiraModel's mixins (activation.py, lifecycle.py, persistence.py) use of it, as a
Protocol for their `self`. mypy refuses `self: ShiraModel` in a mixin (ShiraModel is not
a supertype of the mixin class); a Protocol it accepts, and it checks ShiraModel against
it wherever a mixin method is called. Typing only: nothing imports this at run time."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Iterator, Optional, Protocol, Sequence, Union

if TYPE_CHECKING:
    import os

    import torch
    from torch import nn

    from shira_export.tuner.checkpoint import AdapterCheckpoint
    from shira_export.tuner.config import ShiraConfig
    from shira_export.tuner.layer import ShiraLayer
    from shira_export.tuner.modules_to_save import ModulesToSaveWrapper

__all__ = ["ShiraHost"]


class ShiraHost(Protocol):
    model: nn.Module
    peft_config: dict[str, ShiraConfig]
    _active: list[str]
    training: bool

    def __init__(
        self,
        model: nn.Module,
        config: Optional[ShiraConfig] = ...,
        adapter_name: str = ...,
        *,
        mask_grads: Optional[dict[str, torch.Tensor]] = ...,
        resident_training: bool = ...,
    ) -> None: ...

    # ---- model.py -----------------------------------------------------------------------
    def shira_layers(self) -> Iterator[tuple[str, ShiraLayer]]: ...
    def _wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]: ...
    def settle(self) -> None: ...
    def _check_new_name(self, name: str) -> None: ...
    def _heads_to_save(self, config: ShiraConfig) -> list[str]: ...
    def _resolve_heads(self, names: Sequence[str]) -> list[str]: ...
    def _locate(self, path: str) -> tuple[nn.Module, str]: ...
    def _install(self, ckpt: AdapterCheckpoint, *, trainable: bool) -> None: ...
    def _refresh_trainable(self) -> None: ...
    def _known(self, names: Sequence[str]) -> list[str]: ...
    def set_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None: ...
    def eval(self) -> object: ...

    # ---- the mixins' own methods they call on each other --------------------------------
    def _mixed(self, adapter_names: Sequence[str]) -> AbstractContextManager[None]: ...
    def merge_adapter(
        self, adapter_names: Optional[Union[str, Sequence[str]]] = ..., *, safe_merge: bool = ...
    ) -> None: ...
    def unmerge_adapter(self) -> None: ...
    def _unwrap(
        self, *, merge: bool, safe_merge: bool = ..., adapter_names: Optional[Sequence[str]] = ...
    ) -> nn.Module: ...
    def _checkpoint(self, adapter_name: str, *, scaled: bool = ...) -> AdapterCheckpoint: ...
    def _base_key_map(self) -> dict[str, str]: ...
    def load_adapter(
        self,
        path: Union[str, os.PathLike],
        adapter_name: str = ...,
        *,
        is_trainable: bool = ...,
        config: Optional[ShiraConfig] = ...,
        autocast_adapter_dtype: bool = ...,
        low_cpu_mem_usage: bool = ...,
    ) -> None: ...
