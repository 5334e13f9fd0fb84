"""Benchmark: the runtime's modes against merged ONNX models, mixed-adapter batches, and
memory per loaded adapter, all in one run (issue #18).

OPT-125m-shaped decoder from OPTConfig() defaults (random weights, fp32), q/k/v/out
targeted, r=8 and r=32 (PEFT SHiRA adapters, values at the weights' scale), CPU.
Medians of interleaved rounds, each mode's `--sessions` sessions taken in turn (two sessions of
one graph can differ by ~12 % at decode: where their buffers land), ratio to merged:

    merged      the base graph with the adapter merged into constant weights (what
                `shira-export merged` produces; built here from the same export)
    lean        ShiraSession(folder): the default mode (model.onnx, adapter arrays fed per call)
    portable    plain onnxruntime: InferenceSession(model.onnx) + LoraAdapter + RunOptions,
                exactly what a C#/C++/Java user runs (no shira_export code in the call)
    dense       ShiraSession(mode="dense"): merged copies of the targeted weights fed per call (opt-in)

Then the same adapters on the int4 graph (tools/bench_runtime_int4.py: plain onnxruntime +
LoraAdapter against the merged int4 model, both quantized with one fixed plan; `--no-int4` skips
it). Then, per r: 8 decode streams (128-token caches) over 8 different adapters, one mixed batch
of 8 against 8 separate calls (lean mode), tokens/s; and memory: 64 adapters of r=8 loaded
(resident set, VmRSS) per adapter against the file size, lean and portable.
All sessions: intra-op threads = ORT's default (`--threads N` sets it), spinning off (sessions take turns on shared
cores). Prints the table with the CPU's flags and load; writes tools/results/bench_runtime.json.

Usage: python tools/bench_runtime.py [--rounds 7] [--sessions 3] [--layers 12] [--ranks 8 32] [--work DIR] [--threads N]
       [--clock wall|cpu]

`--genai` instead times onnxruntime-genai (tools/bench_genai.py).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

HEADS, DIM, VOCAB = 12, 64, 50272
TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


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
                cfg = ShiraConfig(r=r, target_modules=TARGETS, init_weights=False, random_seed=seed)
                get_shira_model(OPTForCausalLM.from_pretrained(model_dir), cfg).save_pretrained(path)
                ckpt = read_adapter_dir(path)
                for delta in ckpt.deltas.values():
                    delta.values.mul_(0.02)
                write_adapter_dir(ckpt, path)
            dirs[name] = path
    return dirs


def like_adapter(session, name: str, path: Path, seed: int) -> Path:
    """An adapter file with the nnz of `name` per site at random positions (more adapters of a rank),
    kept in `--work` under a name with the format's schema (a file of an older layout is not reused)."""
    from shira_export.export.adapter_file import ADAPTER_SCHEMA, AdapterArrays, short_fingerprint, write_adapter_file

    path = path.with_name(f"{path.stem}.v{ADAPTER_SCHEMA}{path.suffix}")
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    sites = {s.module: s for s in session.manifest.targets}
    deltas = {}
    for module, (idx, _) in session._get(name).arrays.deltas.items():
        s = sites[module]
        flat = rng.choice(s.out_features * s.in_features, idx.size, replace=False).astype(np.int32)
        deltas[module] = (flat, (rng.standard_normal(idx.size) * 0.02).astype(np.float32))
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_adapter_file(
        path,
        AdapterArrays.from_flat(
            deltas,
            {s.module: (s.out_features, s.in_features) for s in session.manifest.targets},
            short_fingerprint(session.manifest.base_fingerprint),
        ),
    )


def merged_graph(folder: Path, dense, name: str):
    """The export's graph with adapter `name` merged into constant weights (prepacked by ORT)."""
    import onnx
    from onnx import numpy_helper

    from shira_export.artifacts.naming import weight_name
    from shira_export.runtime.dense_variant import to_dense_variant

    sites = dense.manifest.targets
    graph, _ = to_dense_variant(onnx.load(str(folder / "model.onnx")), sites, defaults=True)
    merged = {k: v.numpy() for k, v in dense._get(name).feeds.items()}
    for init in graph.graph.initializer:
        if init.name in merged:
            init.CopyFrom(numpy_helper.from_array(merged[init.name], init.name))
    keep = [i for i in graph.graph.input if i.name not in {weight_name(s.module) for s in sites}]
    del graph.graph.input[:]
    graph.graph.input.extend(keep)
    return graph


def machine() -> dict:
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        m = re.search(r"^flags\s*:\s*(.*)$", cpuinfo.read_text(), re.M)
        flags = set(m.group(1).split()) if m else set()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo.read_text(), re.M) if cpuinfo.is_file() else None
    return {
        "cpu": model.group(1) if model else "?",
        "cores": os.cpu_count(),
        "flags": {f: f in flags for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")},
        "load_start": list(os.getloadavg()),
    }


def rss() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024  # type: ignore[union-attr]


INTRA_OP_THREADS = 0  # --threads: 0 is onnxruntime's default (one per physical core)


def session_options():
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = INTRA_OP_THREADS
    # sessions take turns on shared cores: idle pool threads must not spin into the next run
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def feeds(n_layers: int, ids, past=None, past_len: int = 0):
    import onnxruntime as ort

    batch, total = ids.shape[0], past_len + ids.shape[1]
    f = {
        "input_ids": ids,
        "attention_mask": np.ones((batch, total), np.int64),
        "position_ids": np.broadcast_to(np.arange(past_len, total, dtype=np.int64), (batch, ids.shape[1])).copy(),
    }
    for i in range(n_layers):
        for kv in ("key", "value"):
            name = f"past_key_values.{i}.{kv}"
            f[name] = np.zeros((batch, HEADS, 0, DIM), np.float32) if past is None else past[name]
    return {k: ort.OrtValue.ortvalue_from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in f.items()}


def as_past(outs: list[str], values: list) -> dict:
    return {"past_key_values." + n[len("present.") :]: v for n, v in zip(outs, values) if n.startswith("present.")}


CLOCK = time.perf_counter  # --clock cpu: time.process_time (robust to other processes on a shared machine)
OTHER_CLOCK = time.process_time  # the one --clock did not pick, recorded beside it


def timed(fn, f) -> float:
    t = CLOCK()
    fn(f)
    return CLOCK() - t


def timed_pair(fn, f) -> tuple[float, float]:
    """(time by CLOCK, time by OTHER_CLOCK) of one call. Both matter: CPU time is robust when
    other jobs share the cores, but it counts a two-thread GEMV twice and the sparse site's
    single-thread ops once, so on an idle machine its ratios are lower than the wall
    clock's, which is what a caller waits."""
    t, o = CLOCK(), OTHER_CLOCK()
    fn(f)
    return CLOCK() - t, OTHER_CLOCK() - o


def medians_ms(times: dict[str, list[tuple[float, float]]]) -> tuple[dict[str, float], dict[str, float]]:
    """Per key, the medians of both clocks' times, in ms."""
    return tuple(  # type: ignore[return-value]
        {k: statistics.median(t[i] for t in v) * 1000 for k, v in times.items()} for i in (0, 1)
    )


def clocks(clock: str):
    """(CLOCK, OTHER_CLOCK) for --clock wall|cpu."""
    return (time.process_time, time.perf_counter) if clock == "cpu" else (time.perf_counter, time.process_time)


def other_clock_name(clock: str) -> str:
    return "cpu" if clock == "wall" else "wall"


def bench_modes(r, folder, work, lean, dense, args, outs) -> dict:
    """Prefill 1x128 and decode with a 128-token cache: merged, lean, portable, dense."""
    import onnx
    import onnxruntime as ort

    from shira_export.runtime import Mode, ShiraSession

    a = f"r{r}a"
    merged_path = work / f"merged_{a}.onnx"
    if not merged_path.exists():
        onnx.save_model(merged_graph(folder, dense, a), str(merged_path))
    t = time.perf_counter()
    merged_s = [ort.InferenceSession(str(merged_path), session_options(), providers=["CPUExecutionProvider"])]
    new_session_s = time.perf_counter() - t
    # portable: what a C#/C++ user writes, through the Python binding of the same C API
    lora = ort.LoraAdapter()
    lora.Load(str(folder / "adapters" / f"{a}.onnx_adapter"))
    plain_opts = ort.RunOptions()
    plain_opts.add_active_adapter(lora)
    plain_s, lean_s, dense_s = [], [lean], [dense]
    # Two sessions of one graph differ by up to ~12 % at decode (where their buffers land):
    # every mode gets `--sessions` sessions, taken in turn, so a ratio compares modes, not placements
    for i in range(args.sessions):
        if i:
            merged_s.append(
                ort.InferenceSession(str(merged_path), session_options(), providers=["CPUExecutionProvider"])
            )
            lean_s.append(ShiraSession(folder, session_options=session_options()))
            dense_s.append(ShiraSession(folder, mode=Mode.DENSE, session_options=session_options()))
        plain_s.append(
            ort.InferenceSession(str(folder / "model.onnx"), session_options(), providers=["CPUExecutionProvider"])
        )
    runners = {
        "merged": [lambda f, s=s: s.run_with_ort_values(outs, f) for s in merged_s],
        "lean": [lambda f, s=s: s.run_ort_values(f, adapter=a, output_names=outs) for s in lean_s],
        "portable": [lambda f, s=s: s.run_with_ort_values(outs, f, plain_opts) for s in plain_s],
        "dense": [lambda f, s=s: s.run_ort_values(f, adapter=a, output_names=outs) for s in dense_s],
    }
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, VOCAB, (1, 128), dtype=np.int64)
    step = rng.integers(0, VOCAB, (1, 1), dtype=np.int64)
    caches, logits = {}, {}
    for k, runs in runners.items():
        res = runs[0](feeds(args.layers, prompt))
        logits[k], caches[k] = res[0].numpy(), as_past(outs, res)
        for other in runs[1:]:  # every session of a mode computes the same logits
            assert np.array_equal(other(feeds(args.layers, prompt))[0].numpy(), logits[k]), k
    times: dict[str, list[tuple[float, float]]] = {f"{k}_{p}": [] for k in runners for p in ("prefill", "decode")}
    for round_ in range(args.rounds * args.sessions):
        i = round_ % args.sessions
        for k, runs in runners.items():
            times[f"{k}_prefill"].append(timed_pair(runs[i], feeds(args.layers, prompt)))
        for _ in range(4):
            for k, runs in runners.items():
                times[f"{k}_decode"].append(timed_pair(runs[i], feeds(args.layers, step, caches[k], 128)))
    med, med_other = medians_ms(times)
    switch = {}
    for k, s in (("lean", lean), ("dense", dense)):
        ts = [timed(s.prepare, a if i % 2 else f"r{r}b") for i in range(1000)]
        switch[f"{k}_prepare_us"] = statistics.median(ts) * 1e6
    return {
        "median_ms": med,
        "ratio_to_merged": {k: med[k] / med[f"merged_{k.split('_')[1]}"] for k in med if not k.startswith("merged")},
        "median_ms_other_clock": med_other,
        "ratio_to_merged_other_clock": {
            k: med_other[k] / med_other[f"merged_{k.split('_')[1]}"] for k in med if not k.startswith("merged")
        },
        "max_abs_vs_merged": {k: float(np.abs(logits[k] - logits["merged"]).max()) for k in runners},
        "switch": dict(switch, new_session_on_merged_ms=new_session_s * 1000),
        "file_bytes": (folder / "adapters" / f"{a}.onnx_adapter").stat().st_size,
        "bytes_per_nnz": (folder / "adapters" / f"{a}.onnx_adapter").stat().st_size / lean.manifest.adapters[a]["nnz"],
        "dense_adapter_mb": dense.adapter_nbytes(a) / 2**20,
        "lean_adapter_mb": lean.adapter_nbytes(a) / 2**20,
    }


def bench_mixed(r, work, lean, args, outs) -> dict:
    """8 decode streams over 8 adapters: one mixed batch of 8 against 8 separate calls."""
    names = [f"r{r}a", f"r{r}b"]
    for k in range(6):
        name = f"r{r}x{k}"
        if name not in lean.adapters:
            lean.load_adapter(name, like_adapter(lean, f"r{r}a", work / "more" / f"{name}.onnx_adapter", 50 + k))
        names.append(name)
    rng = np.random.default_rng(1)
    prompts = rng.integers(0, VOCAB, (8, 128), dtype=np.int64)
    # each stream's own 128-token cache, then the batch's cache is the 8 stacked
    alone = [
        as_past(outs, lean.run_ort_values(feeds(args.layers, prompts[i : i + 1]), adapter=n, output_names=outs))
        for i, n in enumerate(names)
    ]
    stacked = {k: np.concatenate([c[k].numpy() for c in alone]) for k in alone[0]}
    step = rng.integers(0, VOCAB, (8, 1), dtype=np.int64)
    batch_feeds = feeds(args.layers, step, stacked, 128)
    mixed = lean.run_ort_values(batch_feeds, adapter=names, output_names=outs[:1])[0].numpy()
    singles = [
        lean.run_ort_values(feeds(args.layers, step[i : i + 1], alone[i], 128), adapter=n, output_names=outs[:1])[
            0
        ].numpy()
        for i, n in enumerate(names)
    ]
    err = float(np.abs(mixed - np.concatenate(singles)).max())
    single_feeds = [feeds(args.layers, step[i : i + 1], alone[i], 128) for i in range(8)]  # built once, as batch_feeds
    t_mixed, t_sep = [], []
    for _ in range(4 * args.rounds):
        t_mixed.append(timed(lambda f: lean.run_ort_values(f, adapter=names, output_names=outs), batch_feeds))
        t = CLOCK()
        for i, n in enumerate(names):
            lean.run_ort_values(single_feeds[i], adapter=n, output_names=outs)
        t_sep.append(CLOCK() - t)
    mixed_tps, sep_tps = 8 / statistics.median(t_mixed), 8 / statistics.median(t_sep)
    return {
        "mixed_tokens_per_s": mixed_tps,
        "separate_tokens_per_s": sep_tps,
        "ratio": mixed_tps / sep_tps,
        "mixed_ms": statistics.median(t_mixed) * 1000,
        "separate_ms": statistics.median(t_sep) * 1000,
        "max_abs_mixed_vs_alone": err,
    }


def bench_memory(folder, work, like_session, name: str, n_layers: int, count: int = 64) -> dict:
    """RSS per loaded adapter (each used once) against its file: lean and portable modes."""
    from shira_export.runtime import ShiraSession

    paths = [like_adapter(like_session, name, work / "mem" / f"m{i}.onnx_adapter", 1000 + i) for i in range(count)]
    size = paths[0].stat().st_size
    step = np.ones((1, 1), np.int64)
    result = {"adapters": count, "file_mb": size / 2**20}
    for mode in ("lean", "portable"):
        s = ShiraSession(folder, mode=mode, adapters=[], session_options=session_options())
        s.run(feeds(n_layers, step))
        start = rss()
        for i, p in enumerate(paths):
            s.load_adapter(f"m{i}", p)
            s.run(feeds(n_layers, step), adapter=f"m{i}", output_names=["logits"])
        loaded = rss()
        reported = sum(s.adapter_nbytes(f"m{i}") for i in range(count)) / count
        for i in range(count):
            s.unload_adapter(f"m{i}")
        end = rss()
        per = (loaded - start) / count
        result[mode] = {
            "rss_mb_per_adapter": per / 2**20,
            "x_file": per / size,
            "reported_mb": reported / 2**20,
            "after_unload_mb": (end - start) / 2**20,
        }
        del s
    return result


def main() -> None:
    import onnxruntime as ort

    from shira_export import export_sparse
    from shira_export.runtime import Mode, ShiraSession

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7, help="prefill rounds; decode and mixed get 4x as many")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--sessions", type=int, default=3, help="sessions per mode, taken in turn (placement noise)")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads per session (0: ORT's default; 1: a server's one per stream)",
    )
    ap.add_argument("--no-int4", action="store_true", help="skip the int4 rows (tools/bench_runtime_int4.py)")
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time; cpu: process CPU time per call (robust when other jobs share the cores)",
    )
    args = ap.parse_args()
    global CLOCK, OTHER_CLOCK, INTRA_OP_THREADS
    CLOCK, OTHER_CLOCK = clocks(args.clock)
    INTRA_OP_THREADS = args.threads
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_runtime_"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(work, args.layers)
    adapters = build_adapters(work, model_dir, args.ranks)
    folder = work / "sparse"
    if not (folder / "shira_export.json").exists():
        t = time.perf_counter()
        export_sparse(model_dir, adapters, folder, verify=False, overwrite=True)
        print(f"export: {time.perf_counter() - t:.1f} s")
    results: dict = {
        "rounds": args.rounds,
        "sessions_per_mode": args.sessions,
        "clock": args.clock,
        "other_clock": other_clock_name(args.clock),
        "layers": args.layers,
        "machine": machine(),
        "ort": ort.__version__,
        "ort_intra_op_threads": args.threads or "default (0: one per physical core)",
        "ranks": {},
        "mixed": {},
    }
    lean = ShiraSession(folder, session_options=session_options())
    dense = ShiraSession(folder, mode=Mode.DENSE, session_options=session_options())
    outs = [o.name for o in lean.session.get_outputs()]
    for r in args.ranks:
        results["ranks"][r] = bench_modes(r, folder, work, lean, dense, args, outs)
    del dense
    for r in args.ranks:
        results["mixed"][r] = bench_mixed(r, work, lean, args, outs)
    results["memory"] = bench_memory(folder, work, lean, f"r{args.ranks[0]}a", args.layers)
    del lean
    if not args.no_int4:  # the same adapters on the int4 graph (portable) against the merged int4 model
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_runtime_int4

        # it imports this file as `bench_runtime`, a second module beside __main__: give it this run's settings
        mod = bench_runtime_int4.br
        mod.CLOCK, mod.OTHER_CLOCK, mod.INTRA_OP_THREADS = CLOCK, OTHER_CLOCK, INTRA_OP_THREADS
        results["int4"] = {r: bench_runtime_int4.bench_rank(r, folder, work, args) for r in args.ranks}
    results["machine"]["load_end"] = list(os.getloadavg())
    report(results)
    if "int4" in results:
        bench_runtime_int4.report(results["int4"], args)
    dest = Path(__file__).resolve().parent / "results" / "bench_runtime.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {dest}")


def report(results: dict) -> None:
    m = results["machine"]
    flags = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in m["flags"].items())
    print(
        f"\n{m['cpu']}, {m['cores']} cores ({flags}); onnxruntime {results['ort']}, intra-op threads "
        f"{results['ort_intra_op_threads']}; load {m['load_start'][0]:.1f} -> {m['load_end'][0]:.1f}"
    )
    print(
        f"OPT-125m shape ({results['layers']} layers), q/k/v/out, fp32, medians of {results['rounds']} interleaved rounds x {results.get('sessions_per_mode', 1)} sessions per mode, {results['clock']} time "
        f"(in brackets: the same calls by {results.get('other_clock', 'the other')} time)"
    )
    print("| r | mode | prefill 1x128 ms | x merged | decode ms (128 cache) | x merged | memory per adapter |")
    print("|---|---|---|---|---|---|---|")
    for r, row in results["ranks"].items():
        med, ratio = row["median_ms"], row["ratio_to_merged"]
        other = row.get("ratio_to_merged_other_clock", {})
        mem = {
            "merged": "a model per adapter",
            "lean": f"{row['lean_adapter_mb']:.1f} MB (file {row['file_bytes'] / 2**20:.1f} MB)",
            "portable": f"file mapped, {row['file_bytes'] / 2**20:.1f} MB",
            "dense": f"{row['dense_adapter_mb']:.0f} MB",
        }
        for k in ("merged", "lean", "portable", "dense"):
            rp = "1.000" if k == "merged" else f"{ratio[f'{k}_prefill']:.3f} ({other.get(f'{k}_prefill', 0):.3f})"
            rd = "1.000" if k == "merged" else f"{ratio[f'{k}_decode']:.3f} ({other.get(f'{k}_decode', 0):.3f})"
            print(f"| {r} | {k} | {med[f'{k}_prefill']:.1f} | {rp} | {med[f'{k}_decode']:.2f} | {rd} | {mem[k]} |")
        s = row["switch"]
        print(
            f"    r={r}: {row['bytes_per_nnz']:.2f} B/nnz; switch {s['lean_prepare_us']:.1f} us (lean), "
            f"{s['dense_prepare_us']:.1f} us (dense) vs a new merged session {s['new_session_on_merged_ms']:.0f} ms; "
            f"max |diff| vs merged {row['max_abs_vs_merged']}"
        )
    for r, mx in results["mixed"].items():
        if "skipped" in mx:
            print(f"mixed r={r}: skipped ({mx['skipped']})")
            continue
        print(
            f"mixed r={r}, 8 decode streams over 8 adapters (128-token caches): one batch {mx['mixed_tokens_per_s']:.0f} "
            f"tokens/s ({mx['mixed_ms']:.1f} ms/step) vs 8 separate calls {mx['separate_tokens_per_s']:.0f} tokens/s "
            f"({mx['separate_ms']:.1f} ms): {mx['ratio']:.2f}x; max |diff| batch vs alone {mx['max_abs_mixed_vs_alone']:.1e}"
        )
    mem = results["memory"]
    for mode in ("lean", "portable"):
        x = mem[mode]
        print(
            f"memory, {mem['adapters']} adapters loaded ({mode}): {x['rss_mb_per_adapter']:.2f} MB RSS per adapter = "
            f"{x['x_file']:.2f}x its file ({mem['file_mb']:.2f} MB; adapter_nbytes says {x['reported_mb']:.2f} MB); "
            f"{x['after_unload_mb']:+.1f} MB after unloading all"
        )


if __name__ == "__main__":
    import sys

    if "--genai" in sys.argv[1:] or "--genai-export-ours" in sys.argv[1:]:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_genai import main as genai_main

        genai_main([a for a in sys.argv[1:] if a != "--genai"])
    else:
        main()
