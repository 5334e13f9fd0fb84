"""Every architecture the package promises, exported merged and sparse and verified against
PyTorch (shapes other than the traced ones, padded batches, greedy tokens with the KV
cache): tiny models built from each config (random weights, no hub), one SHiRA adapter.

    python tools/arch_matrix.py [--exporter auto|torch|optimum] [--only llama,gemma3_text]

Prints a table (architecture x merged/sparse: verdict, worst logits max_abs, greedy prefix)
and writes tools/results/arch_matrix-<transformers version>.json. Exit 1 if any row fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_archs import ARCHS, available, build  # noqa: E402


def _figures(report) -> dict:
    worst, greedy = 0.0, None
    for record in report.records:
        if record.metric == "max_abs" and record.value is not None:
            worst = max(worst, float(record.value))
        if record.metric in ("greedy_prefix", "greedy_prefix_mean") and record.value is not None:
            greedy = float(record.value) if greedy is None else min(greedy, float(record.value))
    return {
        "passed": report.passed,
        "max_abs": worst,
        "greedy_prefix": greedy,
        "failures": [f.summary for f in report.failures[:3]],
    }


def _sparse_adapter(arch: str, adapter: Path, root: Path) -> Path:
    """A classification adapter carries its head (modules_to_save), which a sparse export cannot
    switch per call; its sparse row uses an adapter on the encoder only, the head from the base."""
    from shira_export import ShiraConfig, get_shira_model

    if ARCHS[arch].peft_task != "SEQ_CLS":
        return adapter
    path = root / f"{arch}-adapter-encoder"
    get_shira_model(
        build(arch), ShiraConfig(r=2, target_modules=ARCHS[arch].targets, init_weights=False, random_seed=4)
    ).save_pretrained(path)
    return path


def run_one(arch: str, exporter: str, root: Path) -> dict:
    from shira_export import ShiraConfig, get_shira_model
    from shira_export.errors import ParityFailure
    from shira_export.pipeline import export_merged, export_sparse

    spec = ARCHS[arch]
    model = build(arch)
    base = root / arch
    model.save_pretrained(base)
    adapter = root / f"{arch}-adapter"
    shira = get_shira_model(
        model,
        ShiraConfig(r=2, target_modules=spec.targets, init_weights=False, random_seed=3, task_type=spec.peft_task),
    )
    shira.save_pretrained(adapter)
    row: dict = {"arch": arch, "model_type": model.config.model_type}
    for kind in ("merged", "sparse"):
        start = time.perf_counter()
        try:
            if kind == "merged":
                result = export_merged(base, adapter, root / f"{arch}-merged", exporter=exporter)
                chosen = result.exporter.value
            else:
                result = export_sparse(
                    base,
                    {"a": _sparse_adapter(arch, adapter, root)},
                    root / f"{arch}-sparse",
                    exporter=exporter,
                    task=spec.task,
                )
                chosen = json.loads((root / f"{arch}-sparse" / "shira_export.json").read_text())["exporter"]
            row[kind] = dict(_figures(result.report), exporter=chosen)
        except ParityFailure as exc:
            row[kind] = dict(_figures(exc.report), exporter=exporter)
        except Exception as exc:  # a row of the table, not a crash of the tool
            row[kind] = {
                "passed": False,
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:240]}",
                "traceback": traceback.format_exc(limit=3),
            }
        row[kind]["seconds"] = round(time.perf_counter() - start, 1)
    return row


def main() -> int:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exporter", default="auto", choices=["auto", "torch", "optimum"])
    parser.add_argument("--only", help="comma-separated architectures (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    archs = args.only.split(",") if args.only else list(ARCHS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            if not available(arch):
                print(f"{arch:>16} | not in transformers {transformers.__version__} (since {ARCHS[arch].since})")
                continue
            rows.append(run_one(arch, args.exporter, Path(tmp)))
            r = rows[-1]
            cells = []
            for kind in ("merged", "sparse"):
                c = r[kind]
                if "error" in c:
                    cells.append(f"ERROR {c['error'][:70]}")
                else:
                    greedy = "-" if c["greedy_prefix"] is None else f"{c['greedy_prefix']:.2f}"
                    cells.append(
                        f"{'PASS' if c['passed'] else 'FAIL'} {c['max_abs']:.1e} greedy {greedy} "
                        f"({c['exporter']}, {c['seconds']}s)"
                    )
            print(f"{arch:>16} | {cells[0]:<44} | {cells[1]}", flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    out = Path(__file__).parent / "results" / f"arch_matrix-transformers{transformers.__version__}.json"
    out.write_text(
        json.dumps(
            {
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "cpu": cpu,
                "cpu_features": [f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni")],
                "exporter": args.exporter,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"-> {out}")
    return 0 if all(r[k].get("passed") for r in rows for k in ("merged", "sparse")) else 1


if __name__ == "__main__":
    sys.exit(main())
