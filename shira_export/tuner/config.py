"""ShiraConfig: PEFT's SHiRA fields and defaults, validated on construction, with
adapter_config.json I/O in exactly PEFT's layout."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional, Union

from shira_export.errors import ShiraInputError
from shira_export.tuner.defaults import DEFAULT_TARGET_MODULES  # noqa: F401  (re-exported)
from shira_export.tuner.patterns import PatternError, compile_target_pattern

CONFIG_NAME = "adapter_config.json"
# The PEFT release whose on-disk format we write (read side accepts any).
PEFT_FORMAT_VERSION = "0.21.2"


class MaskType(str, Enum):
    """The closed set of mask strategies (the paper's, plus a user callable)."""

    RANDOM = "random"
    WEIGHT_MAGNITUDE = "weight_magnitude"
    GRADIENT = "gradient"
    SNIP = "snip"
    STRUCTURED = "structured"
    CUSTOM = "custom"


# Keys PEFT writes that are not ShiraConfig fields (informational on load).
_IGNORED_KEYS = {"peft_type", "peft_version", "runtime_config"}

_TASK_TYPES = {"SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"}


@dataclass
class ShiraConfig:
    """Configuration of one SHiRA adapter.

    `r` is a parameter budget, not a rank: each targeted (out x in) layer trains
    `r * (out + in)` weights, as many as a rank-r LoRA, at positions chosen by the mask.
    """

    r: int = 32
    mask_type: Union[str, MaskType] = MaskType.RANDOM
    random_seed: Optional[int] = None
    target_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    init_weights: bool = True
    modules_to_save: Optional[list[str]] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    auto_mapping: Optional[dict] = None
    # Not serialized: a callable mask_fn(base_layer, r, ...) -> 0/1 (out, in) mask. As in
    # PEFT it may be set after construction (`config.mask_fn = fn`); it gets only the
    # keyword arguments it accepts (random_seed=, grad=).
    mask_fn: Optional[Callable[..., Any]] = field(default=None, repr=False, compare=False)
    peft_type: str = field(default="SHIRA", init=False)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"ShiraConfig.r must be a positive integer, got {self.r!r}")
        if self.mask_fn is not None and not callable(self.mask_fn):
            raise TypeError(f"ShiraConfig.mask_fn must be callable, got {type(self.mask_fn).__name__}")
        if self.mask_fn is not None and self.mask_type in (MaskType.RANDOM, "random"):
            self.mask_type = MaskType.CUSTOM
        try:
            self.mask_type = MaskType(self.mask_type)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in MaskType)
            raise ValueError(f"ShiraConfig.mask_type must be one of {allowed}, got {self.mask_type!r}") from None
        if self.random_seed is not None and (
            isinstance(self.random_seed, bool) or not isinstance(self.random_seed, int)
        ):
            raise ValueError(f"ShiraConfig.random_seed must be an int or None, got {self.random_seed!r}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, (set, tuple)):
                self.target_modules = sorted(self.target_modules)
            if isinstance(self.target_modules, str):
                if not self.target_modules:
                    raise ValueError("ShiraConfig.target_modules is an empty string")
                try:
                    compile_target_pattern(self.target_modules)
                except PatternError as exc:
                    raise ValueError(f"ShiraConfig.target_modules regex {self.target_modules[:80]!r}: {exc}") from None
            elif isinstance(self.target_modules, list):
                if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                    raise ValueError(
                        f"ShiraConfig.target_modules must be a non-empty list of module names or a regex, "
                        f"got {self.target_modules!r}"
                    )
            else:
                raise TypeError(
                    f"ShiraConfig.target_modules must be a list of names or a regex string, "
                    f"got {type(self.target_modules).__name__}"
                )
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise TypeError(f"ShiraConfig.modules_to_save must be a list of names, got {self.modules_to_save!r}")
            self.modules_to_save = list(dict.fromkeys(self.modules_to_save))
        if self.task_type is not None:
            self.task_type = str(getattr(self.task_type, "value", self.task_type))
            if self.task_type not in _TASK_TYPES:
                raise ValueError(f"ShiraConfig.task_type must be one of {sorted(_TASK_TYPES)}, got {self.task_type!r}")

    # ---- adapter_config.json ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The dict PEFT writes to adapter_config.json (same keys, same value types)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "mask_fn":
                continue
            value = getattr(self, f.name)
            if isinstance(value, Enum):
                value = value.value
            out[f.name] = value
        out["peft_version"] = format_version()
        return dict(sorted(out.items()))

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> Path:
        from shira_export._io import atomic_write_text

        path = Path(directory) / CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "ShiraConfig":
        """A config from adapter_config.json's object. `peft_type` must say SHIRA; keys
        this version does not know are ignored with a warning that names them (as PEFT
        does for configs written by a newer release)."""
        if "peft_type" not in data:
            raise ShiraInputError(
                f'{source}: no \'peft_type\' key (expected "peft_type": "SHIRA"; is this a PEFT adapter_config.json?)'
            )
        peft_type = data["peft_type"]
        if str(peft_type).upper() != "SHIRA":
            raise ShiraInputError(
                f"{source}: peft_type is {peft_type!r}, expected 'SHIRA' (this is not a SHiRA adapter)"
            )
        known = {f.name for f in fields(cls) if f.init and f.name != "mask_fn"}
        unknown = sorted(k for k in data if k not in known and k not in _IGNORED_KEYS)
        if unknown:
            warnings.warn(
                f"{source}: unexpected keys {unknown} for ShiraConfig, ignored (written by a newer "
                f"PEFT or another tool?)",
                stacklevel=2,
            )
        kwargs = {k: v for k, v in data.items() if k in known}
        # A saved adapter's mask is in its indices; a custom mask_fn is not needed to load it.
        if data.get("mask_type") == "custom":
            kwargs["inference_mode"] = True
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ShiraInputError(f"{source}: invalid SHiRA config: {exc}") from None

    @classmethod
    def from_json_file(cls, path_json_file: Union[str, os.PathLike]) -> dict[str, Any]:
        """The JSON object of a config file, as PEFT's from_json_file returns it (a dict)."""
        path = Path(path_json_file)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ShiraInputError(f"{path}: not readable JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ShiraInputError(f"{path}: expected a JSON object, found {type(data).__name__}")
        return data

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], subfolder: Optional[str] = None) -> "ShiraConfig":
        """The config of an adapter folder (a local folder: there is no model hub here)."""
        folder = Path(directory) if subfolder is None else Path(directory) / subfolder
        path = folder / CONFIG_NAME
        if not path.is_file():
            raise ShiraInputError(f"{path}: no {CONFIG_NAME} (expected a PEFT adapter folder)")
        return cls.from_dict(cls.from_json_file(path), source=str(path))


def format_version() -> str:
    """What `peft_version` records: the PEFT release whose format is written, then, in
    PEFT's own "version@build" form (PEFT dev builds append "@<commit>"), this package."""
    from shira_export import __version__

    return f"{PEFT_FORMAT_VERSION}@shira_export-{__version__}"
