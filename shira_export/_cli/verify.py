"""`shira-export verify`: parity of an export folder against its PyTorch reference."""

from __future__ import annotations

import argparse

__all__ = ["register"]


# Precision's values (verify/profiles.py; a test keeps them equal), not imported: --help must not load torch.
PROFILES = ("fp32", "fp16", "int8", "int4")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check an export against PyTorch and write JSON / Markdown / JUnit reports",
        description="Compare an export folder (merged or sparse) with the PyTorch model + each adapter "
        "on seeded inputs at untraced shapes. Exit 0 pass, 1 parity failure, 2 usage or input error.",
    )
    p.add_argument("--model", required=True, metavar="BASE_DIR", help="base Hugging Face model folder")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="DIR",
        help="adapter folder (repeatable; default: the sources named in the candidate's manifest)",
    )
    p.add_argument("--candidate", required=True, metavar="OUT_DIR", help="export folder with shira_export.json")
    p.add_argument(
        "--profile", default=None, choices=PROFILES, help="pass rule (default: the manifest's quantization, else dtype)"
    )
    p.add_argument("--inputs", metavar="FILE", help="extra prompts: .txt (one per line) or .jsonl ({'text': ...})")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        dest="overrides",
        help="override a threshold or setting, e.g. atol=1e-3, min_greedy=none, greedy_tokens=16",
    )
    p.add_argument("--report-dir", metavar="DIR", help="where parity.json goes (default: the candidate folder)")
    p.add_argument("--junit", metavar="FILE.xml", help="write a JUnit XML report")
    p.add_argument("--markdown", metavar="FILE.md", help="write a Markdown summary")
    p.add_argument(
        "--plot", action="store_true", help="also write PNG histograms into the report dir (needs matplotlib)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from shira_export.verify import verify
    from shira_export.verify.profiles import parse_overrides

    report = verify(
        model=args.model,
        adapters=args.adapter,
        candidate=args.candidate,
        profile=args.profile,
        inputs=args.inputs,
        overrides=parse_overrides(args.overrides),
        report_dir=args.report_dir or args.candidate,
        junit=args.junit,
        markdown=args.markdown,
        progress=not args.quiet,
        plot=args.plot,
    )
    print(report.summary_line())
    for record in report.failures:
        print(f"  FAIL {record.message}")
    return 0 if report.passed else 1
