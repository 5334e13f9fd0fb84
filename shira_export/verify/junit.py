"""JUnit XML: one testcase per adapter x output x metric, for CI test views."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from typing import TYPE_CHECKING

from shira_export.verify.formatting import format_value

if TYPE_CHECKING:
    from shira_export.verify.report import VerifyReport

__all__ = ["render_junit"]


def render_junit(report: "VerifyReport") -> str:
    suites = ET.Element("testsuites", name="shira-export verify")
    by_adapter: dict[str, list] = {}
    for record in report.records:
        by_adapter.setdefault(record.adapter, []).append(record)
    total = failed = 0
    for adapter, records in by_adapter.items():
        n_failed = sum(r.failed for r in records)
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=f"verify[{adapter}]",
            tests=str(len(records)),
            failures=str(n_failed),
            errors="0",
            skipped="0",
            timestamp=report.created,
        )
        props = ET.SubElement(suite, "properties")
        for key, value in (
            ("candidate", report.candidate),
            ("model", report.model),
            ("profile", str(report.profile.get("name"))),
            ("kind", report.kind),
            ("task", report.task),
        ):
            ET.SubElement(props, "property", name=key, value=value)
        for r in records:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"shira_export.verify.{_ident(adapter)}.{_ident(r.output)}",
                name=r.metric,
                time="0",
            )
            if r.failed:
                failure = ET.SubElement(case, "failure", message=r.message, type="ParityFailure")
                failure.text = _failure_text(r)
            else:
                out = ET.SubElement(case, "system-out")
                out.text = f"{r.metric} = {format_value(r.value)} {r.rule}".rstrip()
        total += len(records)
        failed += n_failed
    suites.set("tests", str(total))
    suites.set("failures", str(failed))
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _failure_text(r) -> str:
    lines = [r.message, f"value: {format_value(r.value)}  rule: {r.rule}", "inputs: " + ", ".join(r.inputs)]
    worst = r.details.get("worst")
    if worst:
        lines.append(
            f"worst: input {worst['input']} index {worst['index']}: "
            f"reference {worst['reference']:.6g} vs candidate {worst['candidate']:.6g}"
        )
    per_input = r.details.get("max_abs_per_input")
    if per_input:
        lines.append("max_abs per input: " + ", ".join(f"{k}={format_value(v)}" for k, v in per_input.items()))
    return "\n".join(lines)


def _ident(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)
