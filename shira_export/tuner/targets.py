"""Which modules of a model an adapter targets, with PEFT's matching rules:
a list matches a module whose path equals a name or ends with "." + name; a string
is a regex that must match the whole path (matched without backtracking, see
patterns.py); None means the architecture's default (defaults.py).

A list given by the user must have every name match (a typo is an error here, where
PEFT only needs one name to match); a default list needs one match, as in PEFT, since
PEFT's defaults name modules of several variants (blip-2: "q", "v", "q_proj", "v_proj")."""

from __future__ import annotations

from typing import Union

from torch import nn

from shira_export.errors import ShiraInputError
from shira_export.tuner.config import ShiraConfig
from shira_export.tuner.defaults import DEFAULT_TARGET_MODULES
from shira_export.tuner.masks import layer_shape
from shira_export.tuner.patterns import compile_target_pattern


def _is_adaptable(module: nn.Module) -> bool:
    try:
        layer_shape(getattr(module, "base_layer", module))
        return True
    except TypeError:
        return False


def _matches(path: str, targets) -> bool:
    if isinstance(targets, str):
        return compile_target_pattern(targets).fullmatch(path)
    return any(path == t or path.endswith("." + t) for t in targets)


def default_targets(model: nn.Module) -> Union[list[str], str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ShiraInputError(
            f"target_modules is None and there is no default for model_type {model_type!r} "
            f"(defaults exist for {sorted(DEFAULT_TARGET_MODULES)}): pass target_modules"
        )
    targets = DEFAULT_TARGET_MODULES[model_type]
    return targets if isinstance(targets, str) else list(targets)


def resolve_target_modules(model: nn.Module, config: ShiraConfig) -> list[str]:
    """Paths of the modules `config` targets in `model`; raises if a name matches
    nothing or matches a layer type SHiRA cannot wrap."""
    targets = config.target_modules if config.target_modules is not None else default_targets(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    default = DEFAULT_TARGET_MODULES.get(model_type) if model_type is not None else None
    is_default = config.target_modules is None or (
        isinstance(targets, list) and isinstance(default, list) and sorted(targets) == sorted(default)
    )
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
    if isinstance(targets, list) and not (is_default and found):
        unmatched = [t for t in targets if not any(p == t or p.endswith("." + t) for p in found + wrong_type)]
        if unmatched:
            leaves = sorted({p.split(".")[-1] for p, m in model.named_modules() if p and _is_adaptable(m)})
            raise ShiraInputError(
                f"target_modules {unmatched} match no module of {type(model).__name__}; linear layers it has: {leaves}"
            )
    if wrong_type and not found:
        raise ShiraInputError(
            f"target_modules {targets!r} match {wrong_type[:3]} which are not nn.Linear or Conv1D layers"
        )
    if not found:
        raise ShiraInputError(f"target_modules {targets!r} match no linear layer of {type(model).__name__}")
    return found
