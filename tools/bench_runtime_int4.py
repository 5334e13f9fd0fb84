"""Benchmark: the sparse int4 graph end to end against the merged int4 model (issue #18).

OPT-125m shape (tools/bench_runtime.py's model, adapters and sparse folder, reused from
`--work`), both sides quantized with the same fixed plan (`plan="fixed", int8_tail=0`: every
body MatMul at 4 bits, the LM head at 8), so they differ only in how the adapter is applied:

    merged_int4    the adapter merged into the fp32 weights, then quantized (what
                   `shira-export merged --quantize int4` writes for one adapter)
    portable_int4  the quantized sparse folder through plain onnxruntime + LoraAdapter:
                   int4 base weights, the fp32 delta applied per call

Prefill 1x128 and decode with a 128-token cache, medians of interleaved rounds; prints a
table with the CPU's flags and load and writes tools/results/bench_runtime_int4.json.

Usage: python tools/bench_runtime_int4.py --work DIR [--ranks 8 32] [--rounds 5] [--sessions 3] [--clock cpu|wall] [--threads N]
(tools/bench_runtime.py runs it too, after its own table, unless given --no-int4.)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

import bench_runtime as br


def _quantized(source: Path, target: Path) -> Path:
    from shira_export.export.quantize import quantize_onnx_model

    if not (target / "model.onnx").exists() and not (target.suffix == ".onnx" and target.exists()):
        quantize_onnx_model(source, target, mode="int4", plan="fixed", int8_tail=0.0, overwrite=True)
    return target


def bench_rank(r: int, folder: Path, work: Path, args) -> dict:
    import onnx
    import onnxruntime as ort

    from shira_export.runtime import Mode, ShiraSession

    a = f"r{r}a"
    merged_fp32 = work / f"merged_{a}.onnx"
    if not merged_fp32.exists():
        onnx.save_model(
            br.merged_graph(folder, ShiraSession(folder, mode=Mode.DENSE, adapters=[a]), a), str(merged_fp32)
        )
    merged_int4 = _quantized(merged_fp32, work / f"merged_{a}_int4.onnx")
    sparse_int4 = _quantized(folder, work / "sparse_int4")
    lora = ort.LoraAdapter()
    lora.Load(str(sparse_int4 / "adapters" / f"{a}.onnx_adapter"))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    sessions = getattr(args, "sessions", 1)  # taken in turn: two sessions of one graph differ by their placement
    merged_s = [
        ort.InferenceSession(str(merged_int4), br.session_options(), providers=["CPUExecutionProvider"])
        for _ in range(sessions)
    ]
    plain_s = [
        ort.InferenceSession(str(sparse_int4 / "model.onnx"), br.session_options(), providers=["CPUExecutionProvider"])
        for _ in range(sessions)
    ]
    outs = [o.name for o in plain_s[0].get_outputs()]
    runners = {
        "merged_int4": [lambda f, s=s: s.run_with_ort_values(outs, f) for s in merged_s],
        "portable_int4": [lambda f, s=s: s.run_with_ort_values(outs, f, options) for s in plain_s],
    }
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, br.VOCAB, (1, 128), dtype=np.int64)
    step = rng.integers(0, br.VOCAB, (1, 1), dtype=np.int64)
    caches, logits = {}, {}
    for k, runs in runners.items():
        res = runs[0](br.feeds(args.layers, prompt))
        logits[k], caches[k] = res[0].numpy(), br.as_past(outs, res)
    times: dict[str, list[tuple[float, float]]] = {f"{k}_{p}": [] for k in runners for p in ("prefill", "decode")}
    for round_ in range(args.rounds * sessions):
        i = round_ % sessions
        for k, runs in runners.items():
            times[f"{k}_prefill"].append(br.timed_pair(runs[i], br.feeds(args.layers, prompt)))
        for _ in range(4):
            for k, runs in runners.items():
                times[f"{k}_decode"].append(br.timed_pair(runs[i], br.feeds(args.layers, step, caches[k], 128)))
    med, other = br.medians_ms(times)
    return {
        "median_ms": med,
        "prefill_ratio": med["portable_int4_prefill"] / med["merged_int4_prefill"],
        "decode_ratio": med["portable_int4_decode"] / med["merged_int4_decode"],
        "median_ms_other_clock": other,
        "prefill_ratio_other_clock": other["portable_int4_prefill"] / other["merged_int4_prefill"],
        "decode_ratio_other_clock": other["portable_int4_decode"] / other["merged_int4_decode"],
        # the merged side quantizes W + delta, the sparse side W: their logits differ by quantization error
        "max_abs_logits_diff": float(np.abs(logits["portable_int4"] - logits["merged_int4"]).max()),
    }


def main() -> None:
    from shira_export import export_sparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sessions", type=int, default=3, help="sessions per side, taken in turn")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads per session (0: ORT's default)")
    args = ap.parse_args()
    br.CLOCK, br.OTHER_CLOCK = br.clocks(args.clock)
    br.INTRA_OP_THREADS = args.threads
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = br.build_model(args.work, args.layers)
    adapters = br.build_adapters(args.work, model_dir, args.ranks)
    folder = args.work / "sparse"
    if not (folder / "shira_export.json").exists():
        export_sparse(model_dir, adapters, folder, verify=False, overwrite=True)
    machine = br.machine()
    rows = {r: bench_rank(r, folder, args.work, args) for r in args.ranks}
    machine["load_end"] = list(os.getloadavg())
    flags = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in machine["flags"].items())
    print(f"\n{machine['cpu']} ({flags}); load {machine['load_start'][0]:.1f} -> {machine['load_end'][0]:.1f}")
    report(rows, args)
    dest = Path(__file__).resolve().parent / "results" / "bench_runtime_int4.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"machine": machine, "clock": args.clock, "ranks": rows}, indent=2) + "\n")
    print(f"wrote {dest}")


def report(rows: dict, args) -> None:
    print(
        f"OPT-125m shape, int4 fixed plan, medians of {args.rounds} interleaved rounds x {getattr(args, 'sessions', 1)} "
        f"sessions per side, {args.clock} time (in brackets: by {br.other_clock_name(args.clock)} time)"
    )
    print("| r | prefill 1x128 ms merged / sparse | x merged | decode ms merged / sparse | x merged |")
    print("|---|---|---|---|---|")
    for r, row in rows.items():
        m = row["median_ms"]
        print(
            f"| {r} | {m['merged_int4_prefill']:.1f} / {m['portable_int4_prefill']:.1f} | {row['prefill_ratio']:.3f} "
            f"({row.get('prefill_ratio_other_clock', 0):.3f}) | {m['merged_int4_decode']:.2f} / "
            f"{m['portable_int4_decode']:.2f} | {row['decode_ratio']:.3f} ({row.get('decode_ratio_other_clock', 0):.3f}) |"
        )


if __name__ == "__main__":
    main()
