"""The torch.onnx exporter against optimum-onnx's, same model, same run: export time of the
merged model, and prefill / decode time of the graphs each writes (onnxruntime, CPU).

    python tools/bench_exporters.py [--rounds 5] [--threads 2] [--layers 12]

Needs an environment with optimum-onnx (transformers 4.x: `pip install -e ".[optimum]"`);
without it only the torch rows run. OPT-125m shape (random weights), SHiRA r=8 on q/k/v/out
merged. Prefill = 1 x 128 tokens; decode = 1 token over a 128-token cache. Rounds are
interleaved and medians reported. Prints a table, writes tools/results/bench_exporters.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "bench_exporters.json"


def _cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return {"model": name, "features": [f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni")]}


def _session(folder: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(folder / "model.onnx"), options)


def _feeds(session, batch: int, new: int, past: int) -> dict:
    inputs = {i.name: i for i in session.get_inputs()}
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 1000, (batch, new)), "attention_mask": np.ones((batch, past + new), np.int64)}
    if "position_ids" in inputs:
        feeds["position_ids"] = np.arange(past, past + new)[None].repeat(batch, 0)
    for name, info in inputs.items():
        if name.startswith("past_key_values"):
            feeds[name] = rng.standard_normal((batch, info.shape[1], past, info.shape[3])).astype(np.float32)
    return feeds


def _time(session, feeds, repeats: int) -> float:
    session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    from transformers import OPTConfig, OPTForCausalLM

    from shira_export import ShiraConfig, get_shira_model
    from shira_export.pipeline import export_merged
    from shira_export.export.exporters.optimum_export import optimum_available

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    exporters = ["torch", "optimum"] if optimum_available() else ["torch"]
    root = Path(tempfile.mkdtemp(prefix="bench_exporters."))
    torch.manual_seed(0)
    config = OPTConfig(
        hidden_size=768,
        num_hidden_layers=args.layers,
        num_attention_heads=12,
        ffn_dim=3072,
        vocab_size=50272,
        max_position_embeddings=2048,
        word_embed_proj_dim=768,
    )
    model = OPTForCausalLM(config).eval()
    model.save_pretrained(root / "base")
    get_shira_model(
        model,
        ShiraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"], init_weights=False, random_seed=1),
    ).save_pretrained(root / "adapter")
    export_s: dict[str, list[float]] = {e: [] for e in exporters}
    for _ in range(2):  # the second round shows the torch route's traced-program cache
        for e in exporters:
            start = time.perf_counter()
            export_merged(root / "base", root / "adapter", root / e, exporter=e, overwrite=True, verify=False)
            export_s[e].append(time.perf_counter() - start)
    sessions = {e: _session(root / e, args.threads) for e in exporters}
    timing: dict[str, dict[str, list[float]]] = {e: {"prefill": [], "decode": []} for e in exporters}
    for _ in range(args.rounds):  # interleaved
        for e, s in sessions.items():
            timing[e]["prefill"].append(_time(s, _feeds(s, 1, 128, 0), 3))
            timing[e]["decode"].append(_time(s, _feeds(s, 1, 1, 128), 20))
    rows = []
    for e in exporters:
        rows.append(
            {
                "exporter": e,
                "export_first_s": export_s[e][0],
                "export_again_s": export_s[e][1],
                "prefill_ms": 1e3 * statistics.median(timing[e]["prefill"]),
                "decode_ms": 1e3 * statistics.median(timing[e]["decode"]),
            }
        )
    import onnxruntime
    import transformers

    print(
        f"\nOPT shape ({args.layers} layers, 768 hidden), merged SHiRA r=8 q/k/v/out; transformers "
        f"{transformers.__version__}, onnxruntime {onnxruntime.__version__}, {args.threads} ORT threads, "
        f"CPU {_cpu()['model']} {_cpu()['features']}\n"
    )
    print("| exporter | export s (first) | export s (same arch again) | prefill 1x128 ms | decode 1 over 128 ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['exporter']} | {r['export_first_s']:.1f} | {r['export_again_s']:.1f} | {r['prefill_ms']:.1f} | "
            f"{r['decode_ms']:.2f} |"
        )
    ratios = {}
    if len(rows) == 2:
        t, o = rows
        ratios = {key: t[key] / o[key] for key in ("export_first_s", "prefill_ms", "decode_ms")}
        print("\ntorch / optimum: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "cpu": _cpu(),
                "transformers": transformers.__version__,
                "layers": args.layers,
                "threads": args.threads,
                "rounds": args.rounds,
                "rows": rows,
                "ratios": ratios,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
