"""The report: one record per check, with the verdict; JSON schema `shira-export/verify` v1."""

from __future__ import annotations

import json
import math
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from shira_export._io import atomic_write_text
from shira_export.errors import ParityFailure
from shira_export.verify.formatting import format_value

__all__ = ["SCHEMA", "SCHEMA_VERSION", "CheckRecord", "VerifyReport", "environment", "format_value"]

SCHEMA = "shira-export/verify"
SCHEMA_VERSION = 1


@dataclass
class CheckRecord:
    """One check: `adapter` x `output` x `metric`. `passed` is None for report-only metrics."""

    adapter: str
    output: str
    metric: str
    value: Optional[float]
    threshold: Optional[float] = None
    op: Optional[str] = None  # "<=" or ">=" when judged
    passed: Optional[bool] = None
    message: str = ""
    inputs: list = field(default_factory=list)
    details: dict = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.passed is False

    @property
    def summary(self) -> str:
        """One line: the failure message, or the value and rule."""
        return (
            self.message
            or f"[{self.adapter}] {self.output} {self.metric} = {format_value(self.value)} {self.rule}".rstrip()
        )

    @property
    def rule(self) -> str:
        return f"{self.op} {format_value(self.threshold)}" if self.op else ""

    def to_dict(self) -> dict:
        out = asdict(self)
        out["value"] = _json_float(self.value)
        out["details"] = _json_clean(self.details)
        return out


@dataclass
class VerifyReport:
    """Everything a parity run found. Build with `shira_export.verify.verify(...)`."""

    model: str
    candidate: str
    kind: str
    task: str
    profile: dict
    adapters: list  # [{"name", "source"}]
    inputs: list  # [{"name", "shape", "source"}]
    records: list  # [CheckRecord]
    environment: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    created: str = ""
    seconds: float = 0.0
    samples: dict = field(default_factory=dict, repr=False)  # (adapter, output) -> abs diffs; not in JSON

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list:
        return [r for r in self.records if r.failed]

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail"

    def to_dict(self) -> dict:
        checked = [r for r in self.records if r.passed is not None]
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "verdict": self.verdict,
            "created": self.created,
            "seconds": round(self.seconds, 3),
            "model": self.model,
            "candidate": self.candidate,
            "kind": self.kind,
            "task": self.task,
            "profile": _json_clean(self.profile),
            "adapters": self.adapters,
            "inputs": self.inputs,
            "environment": self.environment,
            "manifest": self.manifest,
            "summary": {
                "checks": len(checked),
                "failed": len(self.failures),
                "reported_only": len(self.records) - len(checked),
            },
            "records": [r.to_dict() for r in self.records],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def write_json(self, path: Union[str, Path]) -> Path:
        return atomic_write_text(path, self.to_json())

    def to_markdown(self) -> str:
        from shira_export.verify.markdown import render_markdown

        return render_markdown(self)

    def to_junit(self) -> str:
        from shira_export.verify.junit import render_junit

        return render_junit(self)

    def summary_line(self) -> str:
        checked = sum(r.passed is not None for r in self.records)
        return (
            f"parity {self.verdict.upper()}: {len(self.failures)} of {checked} checks failed "
            f"({self.kind} {self.task}, profile {self.profile.get('name')}, {len(self.adapters)} adapter(s))"
        )

    def raise_for_failures(self) -> None:
        """Raise `ParityFailure` listing every failed check (the report rides on `.report`)."""
        if self.passed:
            return
        lines = [self.summary_line()] + [f"  - {r.message}" for r in self.failures[:20]]
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more")
        raise ParityFailure("\n".join(lines), report=self)


def environment() -> dict:
    """Versions of what produced the numbers."""
    import importlib.metadata as md

    versions: dict[str, Optional[str]] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for dist in ("shira-export", "torch", "transformers", "onnxruntime", "onnx", "optimum-onnx", "optimum", "numpy"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    return versions


def _json_float(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None  # JSON has no NaN/Inf; see the message


def _json_clean(obj):
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return _json_float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
