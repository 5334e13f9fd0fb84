"""Typed options of the quantize stage: one frozen dataclass, validated when built.

    QuantizeOptions(mode=QuantMode.INT4, block_size=32)        # or mode="int4"
    QuantizeOptions(mode="int8", int8_method=Int8Method.DYNAMIC, reduce_range=None)

`None` in a field marked "chosen per CPU" means: decided by `cpu.choose(...)` from this
machine's features, and the choice with its reason is written into the manifest.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, fields
from typing import Optional

from shira_export.errors import ShiraInputError

__all__ = [
    "QuantMode",
    "Int8Method",
    "PlanMethod",
    "QuantizeOptions",
    "BLOCK_SIZES",
    "TABLE_BITS",
    "DEFAULT_PLAN_COSINE",
    "EMBEDDING_PLAN_COSINE",
    "DEFAULT_PLAN_AGREEMENT",
    "check_quantize_options",
]

BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits: a power of two, at least 16
TABLE_BITS = (4, 8)  # GatherBlockQuantized
# int4's measured plan keeps the calibration inputs' worst per-token cosine at or above this:
# the int4 verify rule (0.98, verify.profiles) with a margin for inputs the plan never saw (on
# MiniLM a plan at 0.99 on the calibration set gave 0.983 on verify's built-in sentences)
DEFAULT_PLAN_COSINE = 0.99
# ... for token states (feature extraction): verify judges every token (rule 0.98), and on MiniLM the
# sparse export's plan at 0.99 gave 0.974 on verify's built-in sentences; at 0.995 it passed (0.98+)
EMBEDDING_PLAN_COSINE = 0.995
# ... for classifiers also: the label agreement it predicts on unseen rows (quantize.measure) stays at
# or above the int4 label target (issue 15: >= 97 % agreement with fp32 on held-out sentences)
DEFAULT_PLAN_AGREEMENT = 0.97


class QuantMode(str, enum.Enum):
    INT8 = "int8"
    INT4 = "int4"


class Int8Method(str, enum.Enum):
    """How int8 weights run. BLOCKS: 8-bit `MatMulNBits` (weight blocks with their own scale,
    activations quantized per row and block at run time); DYNAMIC: `quantize_dynamic`
    (`MatMulInteger`, one activation scale per call for the whole tensor)."""

    BLOCKS = "blocks"
    DYNAMIC = "dynamic"


class PlanMethod(str, enum.Enum):
    """int4: which MatMuls get 4 bits. MEASURED: from each layer's measured output error on
    calibration inputs (quantize.measure); FIXED: by position (`int8_tail`, `int8_first`)."""

    MEASURED = "measured"
    FIXED = "fixed"


def _enum(cls: type[enum.Enum], value: object, what: str) -> enum.Enum:
    try:
        return cls(value)
    except ValueError:
        raise ShiraInputError(f"{what}: expected one of {[m.value for m in cls]}, found {value!r}") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class QuantizeOptions:
    """Every setting of one quantize run (see docs/quantize.md for what each costs)."""

    mode: QuantMode
    block_size: int = 32  # MatMulNBits / GatherBlockQuantized block along K
    symmetric: bool = False  # MatMulNBits blocks without zero points (asymmetric measured better on MiniLM)
    int8_method: Int8Method = Int8Method.BLOCKS  # int8 only
    per_channel: bool = True  # int8 DYNAMIC only
    reduce_range: Optional[bool] = None  # int8 DYNAMIC only; None: chosen per CPU (7-bit weights without VNNI)
    accuracy_level: Optional[int] = None  # 4-bit MatMulNBits compute (None: fp32 activations)
    accuracy_level_8bit: Optional[int] = None  # 8-bit MatMulNBits compute; None: chosen per CPU
    embeddings: bool = True  # quantize embedding tables (Gather over a constant table)
    table_bits: Optional[int] = None  # bits of embedding tables; None: 8
    int8_tail: float = 2 / 3  # int4 fixed plan: fraction of the body MatMuls (nearest the output) at 8 bits
    int8_first: float = 0.0  # int4 fixed plan: fraction of the body MatMuls (nearest the input) at 8 bits
    head_bits: int = 8  # int4 only: MatMuls writing a graph output (LM heads, classifiers)
    plan: PlanMethod = PlanMethod.MEASURED  # int4 only: bit plan measured per layer, or fixed by position
    # int4 measured plan: worst cosine kept on calibration inputs; None: per output kind (mixed.plan_target)
    plan_min_cosine: Optional[float] = None
    plan_min_agreement: float = DEFAULT_PLAN_AGREEMENT  # int4 measured plan, classifiers: predicted agreement
    nodes_to_exclude: tuple[str, ...] = ()  # MatMul/Gather nodes left in fp32 on purpose

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalize once, here
        set_(self, "mode", _enum(QuantMode, self.mode, "quantize"))
        set_(self, "int8_method", _enum(Int8Method, self.int8_method, "int8_method"))
        set_(self, "plan", _enum(PlanMethod, self.plan, "plan"))
        target = self.plan_min_cosine
        if target is not None and (
            isinstance(target, bool)
            or not isinstance(target, (int, float))
            or math.isnan(target)
            or not 0.0 < target <= 1.0
        ):
            raise ShiraInputError(
                f"plan_min_cosine: expected a cosine in (0, 1] or None (per output kind), found {target!r}"
            )
        set_(self, "plan_min_cosine", None if target is None else float(target))
        agree = self.plan_min_agreement
        if (
            isinstance(agree, bool)
            or not isinstance(agree, (int, float))
            or math.isnan(agree)
            or not 0.0 <= agree <= 1.0
        ):
            raise ShiraInputError(f"plan_min_agreement: expected a fraction in [0, 1], found {agree!r}")
        set_(self, "plan_min_agreement", float(agree))
        if not _is_int(self.block_size) or self.block_size not in BLOCK_SIZES:
            raise ShiraInputError(
                f"block_size: expected one of {list(BLOCK_SIZES)} (MatMulNBits needs a power of two "
                f">= 16), found {self.block_size!r}"
            )
        for name in ("symmetric", "per_channel", "embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ShiraInputError(f"{name}: expected True or False, found {getattr(self, name)!r}")
        if self.reduce_range is not None and not isinstance(self.reduce_range, bool):
            raise ShiraInputError(
                f"reduce_range: expected True, False or None (chosen per CPU), found {self.reduce_range!r}"
            )
        for name in ("accuracy_level", "accuracy_level_8bit"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value not in (0, 1, 2, 3, 4)):
                raise ShiraInputError(f"{name}: expected None or 0-4 (MatMulNBits), found {value!r}")
        if self.table_bits is not None and (not _is_int(self.table_bits) or self.table_bits not in TABLE_BITS):
            raise ShiraInputError(f"table_bits: expected None or one of {list(TABLE_BITS)}, found {self.table_bits!r}")
        if not _is_int(self.head_bits) or self.head_bits not in (4, 8):
            raise ShiraInputError(f"head_bits: expected 4 or 8, found {self.head_bits!r}")
        tail = self.int8_tail
        if isinstance(tail, bool) or not isinstance(tail, (int, float)) or math.isnan(tail) or not 0.0 <= tail <= 1.0:
            raise ShiraInputError(
                f"int8_tail: expected a fraction in [0, 1] of the MatMuls kept at 8 bits, found {tail!r}"
            )
        set_(self, "int8_tail", float(tail))
        first = self.int8_first
        if (
            isinstance(first, bool)
            or not isinstance(first, (int, float))
            or math.isnan(first)
            or not 0.0 <= first <= 1.0
        ):
            raise ShiraInputError(
                f"int8_first: expected a fraction in [0, 1] of the MatMuls kept at 8 bits, found {first!r}"
            )
        set_(self, "int8_first", float(first))
        if isinstance(self.nodes_to_exclude, str) or not all(isinstance(n, str) for n in self.nodes_to_exclude):
            raise ShiraInputError(
                f"nodes_to_exclude: expected a sequence of node names, found {self.nodes_to_exclude!r}"
            )
        set_(self, "nodes_to_exclude", tuple(self.nodes_to_exclude))

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> "QuantizeOptions":
        """Build from keyword arguments, naming any unknown one (e.g. a typo) in the error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ShiraInputError(f"quantize: unknown option(s) {unknown}; expected some of {sorted(known)}")
        return cls(**kwargs)  # type: ignore[arg-type]

    def to_json(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = (
                value.value if isinstance(value, enum.Enum) else list(value) if isinstance(value, tuple) else value
            )
        return out


def check_quantize_options(mode: object, block_size: object) -> tuple[QuantMode, int]:
    """Validate `mode` and `block_size` before anything is read or written (export callers)."""
    options = QuantizeOptions(mode=mode, block_size=block_size)  # type: ignore[arg-type]
    return options.mode, options.block_size
