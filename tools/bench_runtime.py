"""Benchmark: per-call adapter switching on a sparse export vs merged ONNX models.

OPT-125m-shaped decoder from OPTConfig() defaults (random weights, fp32), q/k/v/out
targeted, r=8 and r=32, two adapters each, CPU. Compares in one run, medians of
interleaved rounds:

    merged      the base graph with the adapter merged into constant weights (what
                `shira-export merged` produces; built here from the same export)
    dense       ShiraSession(mode="dense"): merged targeted weights fed per call (default)
    portable    ShiraSession(mode="portable"): model.onnx + .onnx_adapter via RunOptions

Prints a table and writes tools/results/bench_runtime.json.
Usage: python tools/bench_runtime.py [--rounds 7] [--layers 12] [--work DIR]

`--genai` instead times onnxruntime-genai (tools/bench_genai.py): a Llama-shaped ~125M
model from LlamaConfig, r=8 on q/k/v/o, decode tokens/s and prefill time of the genai
builder's graph merged, the builder's graph + sparse delta, and our sparse graph.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def build_model(work: Path, layers: int) -> Path:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    path = work / "opt125m"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        OPTForCausalLM(OPTConfig(num_hidden_layers=layers)).eval().save_pretrained(path)
    return path


def build_adapters(work: Path, model_dir: Path, ranks) -> dict[str, Path]:
    """Random masks; values scaled to the weights' own std (0.02), as a trained delta would be
    (init_weights=False draws N(0, 1) values, which blow up a random 12-layer model)."""
    from transformers import OPTForCausalLM

    from shira_export import ShiraConfig, get_shira_model
    from shira_export.tuner.checkpoint import read_adapter_dir, write_adapter_dir

    dirs = {}
    for r in ranks:
        for k, seed in (("a", 1), ("b", 2)):
            name = f"r{r}{k}"
            path = work / name
            if not (path / "adapter_config.json").exists():
                cfg = ShiraConfig(r=r, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                                  init_weights=False, random_seed=seed)
                get_shira_model(OPTForCausalLM.from_pretrained(model_dir), cfg).save_pretrained(path)
                ckpt = read_adapter_dir(path)
                for delta in ckpt.deltas.values():
                    delta.values.mul_(0.02)
                write_adapter_dir(ckpt, path)
            dirs[name] = path
    return dirs


def merged_graph(folder: Path, session, name: str):
    """The export's graph with adapter `name` merged into constant weights (prepacked by ORT)."""
    import onnx
    from onnx import numpy_helper

    from shira_export.export.graph_delta import to_dense_variant, weight_name

    sites = session.manifest.targets
    dense, _ = to_dense_variant(onnx.load(str(folder / "model.onnx")), sites, defaults=True)
    merged = {k: v.numpy() for k, v in session._get(name).feeds.items()}
    for init in dense.graph.initializer:
        if init.name in merged:
            init.CopyFrom(numpy_helper.from_array(merged[init.name], init.name))
    keep = [i for i in dense.graph.input if i.name not in {weight_name(s.module) for s in sites}]
    del dense.graph.input[:]
    dense.graph.input.extend(keep)
    return dense


def main() -> None:
    import onnxruntime as ort

    from shira_export.pipeline import export_sparse
    from shira_export.runtime import Mode, ShiraSession

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7, help="prefill rounds; decode gets 4x as many")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_runtime_"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(work, args.layers)
    adapters = build_adapters(work, model_dir, args.ranks)
    out = work / "sparse"
    if not (out / "shira_export.json").exists():
        t = time.perf_counter()
        export_sparse(model_dir, adapters, out, verify=False, overwrite=True)
        print(f"export: {time.perf_counter() - t:.1f} s")

    def options():
        # three sessions take turns on shared cores: idle pool threads must not spin into the next run
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    opts = options()
    dense = ShiraSession(out, mode=Mode.DENSE, session_options=options())
    portable = ShiraSession(out, mode=Mode.PORTABLE, session_options=options())
    heads, dim, n_layers = 12, 64, args.layers
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 50272, (1, 128), dtype=np.int64)

    def feeds(ids, past=None, past_len=0):
        total = past_len + ids.shape[1]
        f = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64),
             "position_ids": np.arange(past_len, total, dtype=np.int64)[None]}
        for i in range(n_layers):
            for kv in ("key", "value"):
                f[f"past_key_values.{i}.{kv}"] = (np.zeros((1, heads, 0, dim), np.float32) if past is None
                                                   else past[f"present.{i}.{kv}"])
        return {k: ort.OrtValue.ortvalue_from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in f.items()}

    outs = [o.name for o in dense.session.get_outputs()]
    results = {"rounds": args.rounds, "layers": n_layers, "threads": ort.SessionOptions().intra_op_num_threads,
               "ranks": {}}
    for r in args.ranks:
        a, b = f"r{r}a", f"r{r}b"
        merged_path = work / f"merged_{a}.onnx"
        if not merged_path.exists():
            import onnx

            onnx.save_model(merged_graph(out, dense, a), str(merged_path))
        t = time.perf_counter()
        merged = ort.InferenceSession(str(merged_path), opts, providers=["CPUExecutionProvider"])
        new_session_s = time.perf_counter() - t

        runners = {
            "merged": lambda f, ad=None, m=merged: m.run_with_ort_values(outs, f),
            "dense": lambda f, ad=a: dense.run_ort_values(f, adapter=ad, output_names=outs),
            "portable": lambda f, ad=a: portable.run_ort_values(f, adapter=ad, output_names=outs),
        }
        # parity of the three (logits of the prefill) and a 128-token cache for each
        caches, logits = {}, {}
        for k, run in runners.items():
            res = run(feeds(prompt))
            logits[k] = res[0].numpy()
            caches[k] = dict(zip(outs, res))
        err = {k: float(np.abs(logits[k] - logits["merged"]).max()) for k in runners}
        step = rng.integers(0, 50272, (1, 1), dtype=np.int64)
        times = {f"{k}_{p}": [] for k in runners for p in ("prefill", "decode")}
        for _ in range(args.rounds):
            for k, run in runners.items():
                f = feeds(prompt)
                t = time.perf_counter(); run(f); times[f"{k}_prefill"].append(time.perf_counter() - t)
            for _ in range(4):
                for k, run in runners.items():
                    f = feeds(step, caches[k], 128)
                    t = time.perf_counter(); run(f); times[f"{k}_decode"].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        # switching: the whole per-call cost of choosing another adapter, and an A/B/A/B decode loop
        sw = {}
        for k, s in (("dense", dense), ("portable", portable)):
            ts = []
            for i in range(1000):
                t = time.perf_counter(); s.prepare(a if i % 2 else b); ts.append(time.perf_counter() - t)
            sw[f"{k}_prepare_ms"] = statistics.median(ts) * 1000
            f = feeds(step, caches[k], 128)
            same, alt = [], []
            for i in range(4 * args.rounds):
                t = time.perf_counter(); s.run_ort_values(f, adapter=a, output_names=outs[:1]); same.append(time.perf_counter() - t)
                t = time.perf_counter(); s.run_ort_values(f, adapter=a if i % 2 else b, output_names=outs[:1]); alt.append(time.perf_counter() - t)
            sw[f"{k}_alternating_extra_ms"] = (statistics.median(alt) - statistics.median(same)) * 1000
        files = {n: Path(out / "adapters" / f"{n}.onnx_adapter").stat().st_size for n in (a, b)}
        nnz = {n: dense.manifest.adapters[n]["nnz"] for n in (a, b)}
        peft = {n: Path(adapters[n] / "adapter_model.safetensors").stat().st_size for n in (a, b)}
        row = {
            "median_ms": med,
            "ratio_to_merged": {k: med[k] / med[f"merged_{k.split('_')[1]}"] for k in med if not k.startswith("merged")},
            "switch": dict(sw, new_session_on_merged_s=new_session_s,
                           speedup_vs_new_session=new_session_s * 1000 / max(sw["dense_prepare_ms"], 1e-9)),
            "bytes_per_nnz": {n: files[n] / nnz[n] for n in files},
            "peft_bytes_per_nnz": {n: peft[n] / nnz[n] for n in files},
            "dense_mode_adapter_mb": dense.adapter_nbytes(a) / 2**20,
            "max_abs_vs_merged": err,
        }
        results["ranks"][r] = row
        del merged

    print(f"\nOPT-125m shape ({n_layers} layers), q/k/v/out, fp32, CPU, medians of {args.rounds} interleaved rounds")
    print(f"{'r':>3} {'variant':<9} {'prefill ms':>10} {'x merged':>8} {'decode ms':>9} {'x merged':>8}")
    for r, row in results["ranks"].items():
        m = row["median_ms"]
        for k in ("merged", "dense", "portable"):
            rp = 1.0 if k == "merged" else row["ratio_to_merged"][f"{k}_prefill"]
            rd = 1.0 if k == "merged" else row["ratio_to_merged"][f"{k}_decode"]
            print(f"{r:>3} {k:<9} {m[f'{k}_prefill']:>10.1f} {rp:>8.3f} {m[f'{k}_decode']:>9.2f} {rd:>8.3f}")
        s = row["switch"]
        print(f"    switch: dense {s['dense_prepare_ms'] * 1000:.1f} us, portable {s['portable_prepare_ms'] * 1000:.1f} us "
              f"per call; A/B alternation adds {s['dense_alternating_extra_ms']:.3f} / {s['portable_alternating_extra_ms']:.3f} ms; "
              f"new session on merged {s['new_session_on_merged_s'] * 1000:.0f} ms ({s['speedup_vs_new_session']:.0f}x)")
        print(f"    adapter file {min(row['bytes_per_nnz'].values()):.2f} B/nnz (PEFT {min(row['peft_bytes_per_nnz'].values()):.2f}); "
              f"dense mode holds {row['dense_mode_adapter_mb']:.0f} MB per adapter; max |diff| vs merged {row['max_abs_vs_merged']}")
    dest = Path(__file__).resolve().parent / "results" / "bench_runtime.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    import sys

    if "--genai" in sys.argv[1:] or "--genai-export-ours" in sys.argv[1:]:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_genai import main as genai_main

        genai_main([a for a in sys.argv[1:] if a != "--genai"])
    else:
        main()
