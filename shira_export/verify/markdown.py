"""Markdown summary for a CI job summary page: verdict, failures first, a table per adapter.

Each adapter's table has one row per output (failing rows first) and one column per
metric; a failing cell shows the value and the rule it broke.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shira_export.verify.formatting import format_value

if TYPE_CHECKING:
    from shira_export.verify.report import VerifyReport

__all__ = ["render_markdown"]

# column order; metrics not listed here go last in first-seen order
_COLUMNS = (
    "run_errors",
    "shape_mismatch",
    "max_abs",
    "max_rel",
    "mean_abs",
    "p50_abs",
    "p90_abs",
    "p99_abs",
    "cosine",
    "top1_agreement",
    "label_agreement",
    "greedy_prefix",
    "greedy_prefix_mean",
    "nan_count",
    "inf_count",
)


def render_markdown(report: "VerifyReport") -> str:
    head = "PASS" if report.passed else "FAIL"
    lines = [
        f"## shira-export verify: {head}",
        "",
        f"- candidate: `{report.candidate}` ({report.kind}, {report.task})",
        f"- model: `{report.model}`",
        f"- profile: `{report.profile.get('name')}`; "
        f"{sum(r.passed is not None for r in report.records)} checks, {len(report.failures)} failed, "
        f"{report.seconds:.1f} s",
        "- inputs: " + ", ".join(f"`{i['name']}` {tuple(i['shape'])}" for i in report.inputs),
        "",
    ]
    if report.failures:
        lines += ["### Failures", ""]
        lines += [f"- {_escape(r.message)}" for r in report.failures]
        lines.append("")
    adapters = [a["name"] for a in report.adapters]
    adapters.sort(key=lambda name: not any(r.failed and r.adapter == name for r in report.records))
    for name in adapters:
        lines += _adapter_table(report, name)
    lines.append("Cells: value (rule); unmarked values are reported, not judged.")
    lines.append("")
    env = report.environment
    lines.append(
        "<sub>"
        + ", ".join(f"{k} {env[k]}" for k in ("shira-export", "torch", "onnxruntime", "transformers") if env.get(k))
        + "</sub>"
    )
    return "\n".join(lines) + "\n"


def _adapter_table(report: "VerifyReport", name: str) -> list[str]:
    records = [r for r in report.records if r.adapter == name]
    outputs = list(dict.fromkeys(r.output for r in records))
    outputs.sort(key=lambda out: not any(r.failed for r in records if r.output == out))
    seen = list(dict.fromkeys(r.metric for r in records))
    columns = [c for c in _COLUMNS if c in seen] + [c for c in seen if c not in _COLUMNS]
    source = next((a.get("source") for a in report.adapters if a["name"] == name), None)
    failed = sum(r.failed for r in records)
    verdict = f"{failed} failed" if failed else "pass"
    title = f"### Adapter `{name}`: {verdict}" + (f" (from `{source}`)" if source else " (base model, no adapter)")
    lines = [title, "", "| output | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for out in outputs:
        cells = {r.metric: r for r in records if r.output == out}
        row = [f"**{out}**" if any(r.failed for r in cells.values()) else out]
        for column in columns:
            r = cells.get(column)
            if r is None:
                row.append("")
            elif r.failed:
                row.append(f"**FAIL {format_value(r.value)}** ({_escape(r.rule)})")
            elif r.passed:
                row.append(f"{format_value(r.value)} ({_escape(r.rule)})")
            else:
                row.append(format_value(r.value))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return lines


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
