"""Pass rules: one `Profile` per precision, every field overridable (`--set name=value`).

Defaults are grounded in what peers use (ANCHORS section 7): optimum checks exports at
atol 1e-4 for BERT-sized models (1e-5 default); ORT's GPT-2 parity tool uses atol=rtol of
5e-4 (fp32), 0.2 (fp16) and 3.0 (int8) on logits and reports top-1 match rate, abs-diff
percentiles and NaN rate. fp32 here is stricter than ORT's tool (an fp32 export of the
same weights should agree to rounding) and also requires identical greedy tokens; the
quantized profiles judge by top-1 agreement, cosine and greedy prefix, because logit
differences of a quantized model are expected to be large.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from shira_export.errors import ShiraInputError

__all__ = ["Precision", "Profile", "get_profile", "parse_overrides", "RULES"]


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"


@dataclass(frozen=True)
class Profile:
    """Thresholds (None = reported, not judged) and the settings of the run."""

    name: str
    atol: Optional[float] = None  # max |cand - ref| on each float output
    rtol: Optional[float] = None  # max |cand - ref| / max(|ref|, 1e-6)
    p99_atol: Optional[float] = None  # 99th percentile of |cand - ref|
    min_cosine: Optional[float] = None  # worst per-position cosine similarity
    min_pooled_cosine: Optional[float] = None  # worst mean-pooled (sentence embedding) cosine, encoders
    min_top1: Optional[float] = None  # fraction of positions with the same argmax (LM logits)
    min_label_agreement: Optional[float] = None  # fraction of rows with the same label (classifiers)
    min_greedy: Optional[float] = None  # shortest identical greedy prefix / greedy_tokens
    min_greedy_mean: Optional[float] = None  # mean identical greedy prefix / greedy_tokens
    max_nan: Optional[float] = 0  # NaN count in the candidate's output
    max_inf: Optional[float] = 0  # Inf count in the candidate's output
    greedy_tokens: int = 8  # N tokens generated greedily (KV cache on) per prompt
    seed: int = 0  # seed of the token batches
    max_texts: int = 16  # lines used from a user's inputs file
    builtin_texts: int = 48  # built-in sentences (verify.sentences) used when the folder has a tokenizer


# metric name -> (profile field, comparison). Metrics absent here are reported only.
RULES: Mapping[str, tuple[str, str]] = {
    "max_abs": ("atol", "<="),
    "max_rel": ("rtol", "<="),
    "p99_abs": ("p99_atol", "<="),
    "cosine": ("min_cosine", ">="),
    "pooled_cosine": ("min_pooled_cosine", ">="),
    "top1_agreement": ("min_top1", ">="),
    "label_agreement": ("min_label_agreement", ">="),
    "greedy_prefix": ("min_greedy", ">="),
    "greedy_prefix_mean": ("min_greedy_mean", ">="),
    "nan_count": ("max_nan", "<="),
    "inf_count": ("max_inf", "<="),
}

_PROFILES = {
    Precision.FP32: Profile("fp32", atol=1e-4, min_label_agreement=1.0, min_greedy=1.0),
    Precision.FP16: Profile(
        "fp16",
        atol=0.2,
        min_cosine=0.999,
        min_pooled_cosine=0.999,
        min_top1=0.98,
        min_label_agreement=0.98,
        min_greedy_mean=0.75,
    ),
    # quantized: one near-tie flips a greedy token and the rest of that row diverges, so the
    # mean prefix is judged rather than the shortest
    Precision.INT8: Profile(
        "int8", min_cosine=0.99, min_pooled_cosine=0.99, min_top1=0.9, min_label_agreement=0.9, min_greedy_mean=0.5
    ),
    Precision.INT4: Profile(
        "int4", min_cosine=0.98, min_pooled_cosine=0.98, min_top1=0.8, min_label_agreement=0.8, min_greedy_mean=0.25
    ),
}

_INT_FIELDS = {"greedy_tokens", "seed", "max_texts", "builtin_texts"}


def get_profile(name: Union[str, Precision], overrides: Optional[Mapping[str, object]] = None) -> Profile:
    """The named profile with `overrides` applied (values may be strings, as from the CLI)."""
    try:
        precision = Precision(name)
    except ValueError:
        raise ShiraInputError(f"profile: expected one of {[p.value for p in Precision]}, found {name!r}") from None
    profile = _PROFILES[precision]
    if not overrides:
        return profile
    fields = {f.name for f in dataclasses.fields(Profile)} - {"name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ShiraInputError(f"--set: unknown setting(s) {unknown}; expected some of {sorted(fields)}")
    changes: dict[str, Any] = {key: _coerce(key, value) for key, value in overrides.items()}
    return dataclasses.replace(profile, **changes)


def parse_overrides(items: Optional[list[str]]) -> dict[str, str]:
    """`["atol=1e-3", "min_greedy=none"]` -> `{"atol": "1e-3", "min_greedy": "none"}`."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ShiraInputError(f"--set: expected NAME=VALUE (e.g. atol=1e-3), found {item!r}")
        out[key.strip()] = value.strip()
    return out


def _coerce(key: str, value: object) -> Optional[float]:
    if isinstance(value, str):
        if value.lower() in {"none", "off", ""}:
            if key in _INT_FIELDS:
                raise ShiraInputError(f"--set {key}: expected an integer, found {value!r}")
            return None
        try:
            value = float(value)
        except ValueError:
            raise ShiraInputError(f"--set {key}: expected a number or 'none', found {value!r}") from None
    if value is None:
        if key in _INT_FIELDS:
            raise ShiraInputError(f"--set {key}: expected an integer, found None")
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise ShiraInputError(f"--set {key}: expected a number, found {value!r}")
    if key in _INT_FIELDS:
        if value != int(value) or value < (1 if key != "seed" else 0):
            raise ShiraInputError(f"--set {key}: expected a positive integer, found {value!r}")
        return int(value)
    return float(value)
