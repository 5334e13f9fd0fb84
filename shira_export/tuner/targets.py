"""Which modules of a model an adapter targets, with PEFT's matching rules:
a list matches a module whose path equals a name or ends with "." + name; a string
is a regex that must match the whole path; None means the architecture's default."""

from __future__ import annotations

import re

from torch import nn

from shira_export.errors import ShiraInputError
from shira_export.tuner.config import DEFAULT_TARGET_MODULES, ShiraConfig
from shira_export.tuner.masks import layer_shape


def _is_adaptable(module: nn.Module) -> bool:
    try:
        layer_shape(getattr(module, "base_layer", module))
        return True
    except TypeError:
        return False


def _matches(path: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ShiraInputError(
            f"target_modules is None and there is no default for model_type {model_type!r} "
            f"(defaults exist for {sorted(DEFAULT_TARGET_MODULES)}): pass target_modules"
        )
    return list(DEFAULT_TARGET_MODULES[model_type])


def resolve_target_modules(model: nn.Module, config: ShiraConfig) -> list[str]:
    """Paths of the modules `config` targets in `model`; raises if a name matches
    nothing or matches a layer type SHiRA cannot wrap."""
    targets = config.target_modules if config.target_modules is not None else default_targets(model)
    excluded = set(config.modules_to_save or [])
    found: list[str] = []
    wrong_type: list[str] = []
    for path, module in model.named_modules():
        if not path or path.endswith(".base_layer") or ".base_layer." in path or ".original_module" in path:
            continue
        if ".modules_to_save." in path or path.split(".")[-1] in excluded:
            continue
        if _matches(path, targets):
            (found if _is_adaptable(module) else wrong_type).append(path)
    if isinstance(targets, list):
        unmatched = [t for t in targets if not any(p == t or p.endswith("." + t) for p in found + wrong_type)]
        if unmatched:
            leaves = sorted({p.split(".")[-1] for p, m in model.named_modules() if p and _is_adaptable(m)})
            raise ShiraInputError(
                f"target_modules {unmatched} match no module of {type(model).__name__}; "
                f"linear layers it has: {leaves}"
            )
    if wrong_type and not found:
        raise ShiraInputError(
            f"target_modules {targets!r} match {wrong_type[:3]} which are not nn.Linear or Conv1D layers"
        )
    if not found:
        raise ShiraInputError(f"target_modules {targets!r} match no linear layer of {type(model).__name__}")
    return found
