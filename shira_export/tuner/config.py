"""ShiraConfig: PEFT's SHiRA fields and defaults, validated on construction, with
adapter_config.json I/O in exactly PEFT's layout."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional, Union

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


# Default targets per `config.model_type`, as PEFT maps them for SHiRA.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "opt": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"],
}

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
    # Not serialized: a callable mask_fn(base_layer, r, **kwargs) -> 0/1 (out, in) mask.
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
            raise ValueError(
                f"ShiraConfig.mask_type must be one of {allowed}, got {self.mask_type!r}"
            ) from None
        if self.mask_type is MaskType.CUSTOM and self.mask_fn is None and not self.inference_mode:
            raise ValueError(
                "ShiraConfig.mask_type='custom' needs mask_fn=callable(base_layer, r, **kwargs) "
                "returning a 0/1 mask of shape (out, in) with r*(in+out) ones"
            )
        if self.random_seed is not None and (isinstance(self.random_seed, bool) or not isinstance(self.random_seed, int)):
            raise ValueError(f"ShiraConfig.random_seed must be an int or None, got {self.random_seed!r}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, (set, tuple)):
                self.target_modules = sorted(self.target_modules)
            if isinstance(self.target_modules, str):
                if not self.target_modules:
                    raise ValueError("ShiraConfig.target_modules is an empty string")
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
        out["peft_version"] = PEFT_FORMAT_VERSION
        return dict(sorted(out.items()))

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> Path:
        from shira_export._io import atomic_write_text

        path = Path(directory) / CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "ShiraConfig":
        peft_type = data.get("peft_type", "SHIRA")
        if str(peft_type).upper() != "SHIRA":
            raise ValueError(f"{source}: peft_type is {peft_type!r}, expected 'SHIRA' (this is not a SHiRA adapter)")
        known = {f.name for f in fields(cls) if f.init and f.name != "mask_fn"}
        kwargs = {k: v for k, v in data.items() if k in known}
        # A saved adapter's mask is in its indices; a custom mask_fn is not needed to load it.
        kwargs["inference_mode"] = True if data.get("mask_type") == "custom" else kwargs.get("inference_mode", False)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: invalid SHiRA config: {exc}") from None

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> "ShiraConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (expected a PEFT adapter folder)")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not readable JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
        return cls.from_dict(data, source=str(path))
