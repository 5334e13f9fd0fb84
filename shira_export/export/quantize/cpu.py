"""This machine's CPU features, and the quantizer settings chosen from them.

ORT's integer kernels differ between x86 CPUs (ANCHORS 6 and 11): without VNNI
(`avx512_vnni` / `avx_vnni`), u8 x s8 products are summed in pairs into int16
(`vpmaddubsw`) and saturate, so `quantize_dynamic` with full-range int8 weights loses
accuracy; ORT documents `reduce_range` (7-bit weights) for exactly that case. The choices
below, with the features and the reason for each, go into the manifest
(`quantization_details.cpu`), so a folder says what it was built for.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from shira_export.export.quantize.options import Int8Method, QuantizeOptions, QuantMode

__all__ = ["CpuFeatures", "Choices", "cpu_features", "choose"]

_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
ENV_FLAGS = "SHIRA_EXPORT_CPU_FLAGS"  # tests and cross-builds: pretend to be another CPU ("avx2 fma")


@dataclass(frozen=True)
class CpuFeatures:
    machine: str
    model: str
    flags: tuple[str, ...]  # the subset of _FLAGS present
    source: str  # "/proc/cpuinfo", the env override, or "unknown"

    @property
    def vnni(self) -> bool:
        return "avx512_vnni" in self.flags or "avx_vnni" in self.flags

    @property
    def kind(self) -> str:
        """A short name for the figures tables: 'avx512-vnni', 'avx-vnni', 'avx2' or 'other'."""
        if "avx512_vnni" in self.flags:
            return "avx512-vnni"
        if "avx_vnni" in self.flags:
            return "avx-vnni"
        return "avx2" if "avx2" in self.flags else "other"


def cpu_features(cpuinfo: Optional[Path] = None) -> CpuFeatures:
    """Read the features from /proc/cpuinfo (Linux); `$SHIRA_EXPORT_CPU_FLAGS` overrides."""
    machine = platform.machine()
    override = os.environ.get(ENV_FLAGS)
    if override is not None:
        given = set(override.replace(",", " ").split())
        return CpuFeatures(machine, "(override)", tuple(f for f in _FLAGS if f in given), f"${ENV_FLAGS}")
    path = cpuinfo or Path("/proc/cpuinfo")
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return CpuFeatures(machine, platform.processor() or "unknown", (), "unknown")
    flags: set[str] = set()
    model = "unknown"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "model name" and model == "unknown":
            model = value.strip()
    return CpuFeatures(machine, model, tuple(f for f in _FLAGS if f in flags), str(path))


@dataclass(frozen=True)
class Choices:
    """Settings a run used that depend on the CPU (or were given), each with its reason."""

    cpu: CpuFeatures
    reduce_range: Optional[bool] = None  # int8 DYNAMIC
    accuracy_level_8bit: Optional[int] = None  # 8-bit MatMulNBits
    table_bits: Optional[int] = None
    reasons: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = asdict(self)
        out["cpu"] = dict(asdict(self.cpu), kind=self.cpu.kind, vnni=self.cpu.vnni)
        return out


def choose(options: QuantizeOptions, cpu: Optional[CpuFeatures] = None) -> Choices:
    """Fill the settings left `None` in `options` for `cpu` (default: this machine)."""
    cpu = cpu or cpu_features()
    reasons: dict[str, str] = {}
    reduce_range = None
    if options.mode is QuantMode.INT8 and options.int8_method is Int8Method.DYNAMIC:
        if options.reduce_range is not None:
            reduce_range, reasons["reduce_range"] = options.reduce_range, "given"
        else:
            reduce_range = not cpu.vnni
            reasons["reduce_range"] = (
                "VNNI present: int8 dot products accumulate in int32, full-range weights"
                if cpu.vnni
                else "no VNNI: u8 x s8 pairs are summed in int16 and saturate; 7-bit weights avoid it (ORT docs, ANCHORS 6)"
            )
    eight_bit = (
        options.mode is QuantMode.INT8
        and options.int8_method is Int8Method.BLOCKS
        or (options.mode is QuantMode.INT4 and (options.int8_tail > 0 or options.head_bits == 8))
    )
    level = None
    if eight_bit:
        if options.accuracy_level_8bit is not None:
            level, reasons["accuracy_level_8bit"] = options.accuracy_level_8bit, "given"
        else:
            # level 4 quantizes activations per row and block (int8 kernel); without it ORT 1.32
            # dequantizes 8-bit weights and runs sgemm, 26x slower for one token. On both CPU kinds.
            level = 4
            reasons["accuracy_level_8bit"] = (
                f"int8 activations per block run the {'VNNI' if cpu.vnni else 'AVX2'} int8 kernel; level 0 "
                "dequantizes and runs sgemm (26x slower per token in ORT 1.32)"
            )
    table_bits = None
    if options.embeddings:
        table_bits = options.table_bits if options.table_bits is not None else 8
        reasons["table_bits"] = (
            "given"
            if options.table_bits is not None
            else "4-bit tables cost MiniLM's sentence embeddings 0.998 -> 0.985 cosine; 8-bit ~1e-4"
        )
    return Choices(cpu, reduce_range, level, table_bits, reasons)
