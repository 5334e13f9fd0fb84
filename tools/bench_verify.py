"""How long `verify` takes on tiny exports, and what single-threading small models buys.

    python tools/bench_verify.py [--rounds 3]

Builds the CI artifacts (tools/ci_verify_artifacts.py) once, then times `verify(...)` on
each, interleaving the default (torch and ORT single-threaded below 20M parameters) with
the peer setting (library default threads). Prints a table of medians and writes
tools/results/bench_verify.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    import shira_export.verify.api as api
    from ci_verify_artifacts import build
    from shira_export.verify import verify

    default_small = api._SMALL_MODEL
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = build(Path(tmp))
        times: dict[tuple[str, str], list[float]] = {}
        for name, model, candidate, _ in plan:  # warm-up: imports, first session
            verify(model=model, candidate=candidate, progress=False)
        for _ in range(args.rounds):
            for name, model, candidate, _ in plan:
                for setting, small in (("single-thread", default_small), ("default-threads", 0)):
                    api._SMALL_MODEL = small
                    started = time.perf_counter()
                    report = verify(model=model, candidate=candidate, progress=False)
                    times.setdefault((name, setting), []).append(time.perf_counter() - started)
                    assert report.passed, report.summary_line()
        api._SMALL_MODEL = default_small

    rows = []
    print(
        f"{'artifact':22} {'single-thread s':>16} {'default-threads s':>18} {'ratio':>7}   (torch threads {torch.get_num_threads()})"
    )
    for name, *_ in plan:
        one = statistics.median(times[(name, "single-thread")])
        peer = statistics.median(times[(name, "default-threads")])
        rows.append({"artifact": name, "single_thread_s": one, "default_threads_s": peer, "ratio": peer / one})
        print(f"{name:22} {one:16.3f} {peer:18.3f} {peer / one:7.1f}x")
    out = Path(__file__).resolve().parent / "results" / "bench_verify.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"rounds": args.rounds, "torch_threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
