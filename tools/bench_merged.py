"""Merged export on an OPT-125m-shaped model (random weights): time and file sizes per
format, dtype and exporter, against the peer (optimum's `main_export` of the plain base
folder, which is what a merged ONNX export costs at the least). Where optimum-onnx is
installed (transformers 4.x), both exporters run in the same rounds and their ratio is
printed; on transformers 5 only the torch route runs.

    python tools/bench_merged.py [--rounds 2] [--workdir DIR]

Prints a table and writes tools/results/bench_merged.json. Rounds are interleaved
(ours, peer, ours, peer, ...) and medians reported, since the CPUs are shared.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "bench_merged.json"
# facebook/opt-125m's sizes
OPT_125M = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    ffn_dim=3072,
    vocab_size=50272,
    max_position_embeddings=2048,
    word_embed_proj_dim=768,
)


def _size_mb(folder: Path, pattern: str = "*") -> float:
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file()) / 1e6


def _prepare(root: Path) -> tuple[Path, Path, int]:
    from transformers import OPTConfig, OPTForCausalLM

    from shira_export import ShiraConfig, get_shira_model

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(**OPT_125M)).eval()
    model.save_pretrained(root / "base")
    shira = get_shira_model(
        model, ShiraConfig(r=32, target_modules=["q_proj", "v_proj"], init_weights=False, random_seed=1)
    )
    shira.save_pretrained(root / "adapter")
    nnz = sum(layer.nnz("default") for _, layer in shira.shira_layers())
    return root / "base", root / "adapter", nnz


def _ours(base: Path, adapter: Path, out: Path, **kwargs) -> float:
    from shira_export.errors import ParityFailure
    from shira_export.pipeline import export_merged

    started = time.perf_counter()
    try:
        export_merged(base, adapter, out, overwrite=True, **kwargs)
    except ParityFailure as exc:  # recorded in the table from parity.json
        print(f"parity failure: {exc}", file=sys.stderr)
    return time.perf_counter() - started


def _peer(base: Path, out: Path) -> float:
    from optimum.exporters.onnx import main_export

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(str(base), out, task="text-generation-with-past", do_validation=False)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp folder)")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_merged."))
    root.mkdir(parents=True, exist_ok=True)
    print(f"building an OPT-125m-shaped model in {root} ...", file=sys.stderr)
    base, adapter, nnz = _prepare(root)

    from shira_export.export.exporters.optimum_export import optimum_available

    exporters = ["torch", "optimum"] if optimum_available() else ["torch"]
    ours: dict[str, list[float]] = {e: [] for e in exporters}
    peer: list[float] = []
    for _ in range(args.rounds):  # interleaved
        for exporter in exporters:
            ours[exporter].append(
                _ours(base, adapter, root / f"onnx-{exporter}", format="onnx", verify=False, exporter=exporter)
            )
        if optimum_available():
            peer.append(_peer(base, root / "peer"))
    rows = [
        {
            "what": f"merged onnx fp32, exporter {e} (no verify)",
            "seconds": statistics.median(runs),
            "runs": runs,
            "size_mb": _size_mb(root / f"onnx-{e}", "*.onnx*"),
        }
        for e, runs in ours.items()
    ]
    if peer:
        rows.append(
            {
                "what": "peer: optimum main_export of the base",
                "seconds": statistics.median(peer),
                "runs": peer,
                "size_mb": _size_mb(root / "peer", "*.onnx*"),
            }
        )
    for label, kwargs, pattern in [
        ("merged onnx fp32 + verify", dict(format="onnx"), "*.onnx*"),
        ("merged onnx fp16 (no verify)", dict(format="onnx", dtype="fp16", verify=False), "*.onnx*"),
        ("merged safetensors fp32 (no verify)", dict(format="safetensors", verify=False), "*.safetensors"),
        (
            "merged safetensors fp16 (no verify)",
            dict(format="safetensors", dtype="fp16", verify=False),
            "*.safetensors",
        ),
    ]:
        out = root / label.replace(" ", "_").replace("+", "v").replace("(", "").replace(")", "")
        seconds = _ours(base, adapter, out, **kwargs)
        row = {"what": label, "seconds": seconds, "runs": [seconds], "size_mb": _size_mb(out, pattern)}
        parity = out / "parity.json"
        if parity.is_file():
            report = json.loads(parity.read_text())
            row["verify_seconds"] = report["seconds"]
            row["verdict"] = report["verdict"]
            row["max_abs"] = next(r["value"] for r in report["records"] if r["metric"] == "max_abs")
            row["failures"] = [r["message"] for r in report["records"] if r["passed"] is False]
        rows.append(row)

    ratios = {}
    if peer:
        ratios = {
            f"{e} / optimum main_export of the base": statistics.median(ours[e]) / statistics.median(peer)
            for e in exporters
        }
        ratios["torch exporter / optimum exporter"] = statistics.median(ours["torch"]) / statistics.median(
            ours["optimum"]
        )
    print(
        f"\nOPT-125m-shaped (random weights), SHiRA r=32 on q_proj/v_proj ({nnz:,} nonzeros), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds\n"
    )
    print(f"| {'export':<44} | {'seconds':>8} | {'verify s':>8} | {'size MB':>8} | {'max_abs':>9} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 11}|")
    for r in rows:
        verify_s = f"{r['verify_seconds']:.1f}" if "verify_seconds" in r else "-"
        max_abs = f"{r['max_abs']:.2e}" if "max_abs" in r else "-"
        verify_s += "" if r.get("verdict", "pass") == "pass" else " FAIL"
        print(f"| {r['what']:<44} | {r['seconds']:>8.1f} | {verify_s:>8} | {r['size_mb']:>8.1f} | {max_abs:>9} |")
    for label, ratio in ratios.items():
        print(f"merged onnx export, {label}: {ratio:.2f}x")
    if not ratios:
        print(
            "optimum-onnx is not installed: no peer row (run in a transformers 4.x environment with "
            "shira-export[optimum] for the ratios)"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "model": "opt-125m-shaped",
                "config": OPT_125M,
                "shira_r": 32,
                "nnz": nnz,
                "rounds": args.rounds,
                "rows": rows,
                "ratios": ratios,
                "transformers": __import__("transformers").__version__,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
