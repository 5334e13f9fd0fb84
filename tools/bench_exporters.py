"""The torch.onnx exporter against optimum-onnx's, same model, same run: export time of the
merged model, and prefill / decode time of the graphs each writes (onnxruntime, CPU).

    python tools/bench_exporters.py [--rounds 5] [--export-rounds 2] [--threads 2] [--layers 12]

Needs an environment with optimum-onnx (transformers 4.x: `pip install -e ".[optimum]"`);
without it only the torch rows run. OPT-125m shape (random weights), SHiRA r=8 on q/k/v/out
merged. Every export timing is `export_merged(..., verify=False)` in a fresh Python process
(imports and one-time set-up included, as a user's first `shira-export merged` pays them):

- first: the first export in the process; for torch with an empty trace cache (a fresh
  `$SHIRA_EXPORT_TRACE_CACHE` folder per round), i.e. this structure never traced before;
- again: a second export in the same process (torch: from the in-memory trace cache);
- new process: torch only, a fresh process whose disk trace cache holds the structure (the
  next CLI run on the same base architecture).

The exporters' processes alternate (torch first in odd rounds, optimum first in even ones);
medians over `--export-rounds`. Prefill = 1 x 128 tokens; decode = 1 token over a 128-token
cache; graph-speed rounds are interleaved and medians reported. Prints a table (and the load
average before and after), writes tools/results/bench_exporters.json, and removes its
temporary folder (`--keep` keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
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


def _build(root: Path, layers: int) -> None:
    """The base model and the adapter every export reads."""
    from transformers import OPTConfig, OPTForCausalLM

    from shira_export import ShiraConfig, get_shira_model

    torch.manual_seed(0)
    config = OPTConfig(
        hidden_size=768,
        num_hidden_layers=layers,
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


def _export_times(root: Path, exporter: str, times: int) -> list[float]:
    """(In the child process.) Seconds of each of `times` exports of root/base + root/adapter."""
    from shira_export.pipeline import export_merged

    out = []
    for _ in range(times):
        start = time.perf_counter()
        export_merged(root / "base", root / "adapter", root / exporter, exporter=exporter, overwrite=True, verify=False)
        out.append(time.perf_counter() - start)
    return out


def _child(root: Path, exporter: str, times: int, cache: Path) -> list[float]:
    """Run `times` exports in a fresh process with the trace cache at `cache`."""
    env = dict(os.environ, SHIRA_EXPORT_TRACE_CACHE=str(cache))
    command = [sys.executable, __file__, "--child", str(root), exporter, str(times)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("TIMES ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"bench child {exporter} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(line[len("TIMES ") :])


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print("TIMES " + json.dumps(_export_times(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))), flush=True)
        return 0
    from shira_export.export.exporters.optimum_export import optimum_available

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="graph-speed rounds")
    parser.add_argument("--export-rounds", type=int, default=2, help="fresh-process export rounds per exporter")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (models, exports: ~1.5 GB)")
    args = parser.parse_args()
    exporters = ["torch", "optimum"] if optimum_available() else ["torch"]
    root = Path(tempfile.mkdtemp(prefix="bench_exporters."))
    _build(root, args.layers)
    load_before = _load()
    first: dict[str, list[float]] = {e: [] for e in exporters}
    again: dict[str, list[float]] = {e: [] for e in exporters}
    warm_cache = root / "trace-cache-0"
    for n in range(args.export_rounds):
        for e in exporters if n % 2 == 0 else exporters[::-1]:
            cache = root / f"trace-cache-{n}"  # empty: the torch route traces
            t = _child(root, e, 2, cache)
            first[e].append(t[0])
            again[e].append(t[1])
    new_process = [_child(root, "torch", 1, warm_cache)[0] for _ in range(args.export_rounds)]
    sessions = {e: _session(root / e, args.threads) for e in exporters}
    timing: dict[str, dict[str, list[float]]] = {e: {"prefill": [], "decode": []} for e in exporters}
    for _ in range(args.rounds):  # interleaved
        for e, s in sessions.items():
            timing[e]["prefill"].append(_time(s, _feeds(s, 1, 128, 0), 3))
            timing[e]["decode"].append(_time(s, _feeds(s, 1, 1, 128), 20))
    load_after = _load()
    rows = []
    for e in exporters:
        rows.append(
            {
                "exporter": e,
                "export_first_s": statistics.median(first[e]),
                "export_first_all_s": first[e],
                "export_again_s": statistics.median(again[e]),
                "export_new_process_s": statistics.median(new_process) if e == "torch" else None,
                "prefill_ms": 1e3 * statistics.median(timing[e]["prefill"]),
                "decode_ms": 1e3 * statistics.median(timing[e]["decode"]),
            }
        )
    import onnxruntime
    import transformers

    print(
        f"\nOPT shape ({args.layers} layers, 768 hidden), merged SHiRA r=8 q/k/v/out; transformers "
        f"{transformers.__version__}, onnxruntime {onnxruntime.__version__}, {args.threads} ORT threads, "
        f"CPU {_cpu()['model']} {_cpu()['features']}; load average {load_before} before, {load_after} after\n"
    )
    print(
        "| exporter | export s (first, fresh process) | export s (again, same process) | "
        "export s (new process, disk trace cache) | prefill 1x128 ms | decode 1 over 128 ms |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        warm = f"{r['export_new_process_s']:.1f}" if r["export_new_process_s"] is not None else "-"
        print(
            f"| {r['exporter']} | {r['export_first_s']:.1f} ({', '.join(f'{x:.1f}' for x in r['export_first_all_s'])})"
            f" | {r['export_again_s']:.1f} | {warm} | {r['prefill_ms']:.1f} | {r['decode_ms']:.2f} |"
        )
    ratios = {}
    if len(rows) == 2:
        t, o = rows
        ratios = {key: t[key] / o[key] for key in ("export_first_s", "export_again_s", "prefill_ms", "decode_ms")}
        ratios["export_new_process_vs_optimum_first"] = t["export_new_process_s"] / o["export_first_s"]
        ratios["export_first_per_round"] = [a / b for a, b in zip(first["torch"], first["optimum"])]
        print(
            "\ntorch / optimum: "
            + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items() if not isinstance(v, list))
            + "; first export per round: "
            + ", ".join(f"{v:.2f}x" for v in ratios["export_first_per_round"])
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "cpu": _cpu(),
                "transformers": transformers.__version__,
                "layers": args.layers,
                "threads": args.threads,
                "rounds": args.rounds,
                "export_rounds": args.export_rounds,
                "load_average": {"before": load_before, "after": load_after},
                "rows": rows,
                "ratios": ratios,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")
    del sessions
    if args.keep:
        print(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
