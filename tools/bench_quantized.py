"""Size and latency of fp32 vs int8 vs int4 exports, merged and sparse, and adapter
switching on the quantized sparse graph.

    python examples/train_minilm_classifier.py --out /tmp/minilm     # builds the MiniLM folders
    python tools/bench_quantized.py --minilm /tmp/minilm [--opt] [--rounds 7]

MiniLM (real weights): one 1 x 64-token call per run. `--opt`: an OPT-125m-shaped decoder
built from a config (random weights) with a SHiRA r=8 q/v adapter, merged and sparse exports
at fp32/int8/int4: prefill (1 x 128 tokens) and decode (1 token over a 128-token cache)
latency, and quality against fp32 PyTorch with the adapter merged through `verify` with the
mode's profile: top-1 agreement of the logits, identical greedy prefix over `--tokens`
tokens (KV cache on; shortest and mean, as a fraction of the tokens). Random weights are
harsher than trained ones: reported, not tuned to. Medians of interleaved rounds (the CPU
is shared); ratios are to fp32 of the same kind in the same run. Writes
tools/results/bench_quantized.json. About 6 minutes with --opt on 2 shared cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from shira_export.export.quantize import quantize_onnx_model

RESULTS = Path(__file__).resolve().parent / "results" / "bench_quantized.json"


def _options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return options


def _mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 1e6, 2)


def _median_ms(fns: dict, rounds: int, repeat: int) -> dict:
    times = {k: [] for k in fns}
    for _ in range(rounds):  # interleaved: every variant once per round
        for name, fn in fns.items():
            fn()
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            times[name].append((time.perf_counter() - start) / repeat * 1e3)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def bench_minilm(root: Path, rounds: int) -> list[dict]:
    from shira_export.runtime import ShiraSession

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, (1, 64)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    fns, sizes = {}, {}
    for kind in ("merged", "sparse"):
        for mode in ("fp32", "int8", "int4"):
            folder = root / (kind if mode == "fp32" else f"{kind}_{mode}")
            if not folder.is_dir():
                continue
            sizes[f"{kind} {mode}"] = _mb(folder)
            if kind == "merged":
                session = ort.InferenceSession(str(folder / "model.onnx"), _options())
                fns[f"{kind} {mode}"] = lambda s=session: s.run(["logits"], feeds)
            else:
                s = ShiraSession(folder, mode="portable", session_options=_options())
                fns[f"{kind} {mode}"] = lambda s=s: s.run(feeds, adapter="topic", output_names=["logits"])
                sizes[f"{kind} {mode} adapter"] = (folder / "adapters" / "topic.onnx_adapter").stat().st_size
                prep = _median_ms({"prepare": lambda s=s: s.prepare("topic")}, rounds, 200)["prepare"]
                sizes[f"{kind} {mode} switch_us"] = round(prep * 1e3, 2)
    ms = _median_ms(fns, rounds, 5)
    rows = []
    for name, value in ms.items():
        kind, mode = name.split()
        ref = ms.get(f"{kind} fp32")
        rows.append({"model": "MiniLM", "variant": name, "mb": sizes[name], "size_ratio": round(sizes[name] / sizes[f"{kind} fp32"], 3),
                     "ms_1x64": value, "ratio": round(value / ref, 3) if ref else None,
                     "adapter_bytes": sizes.get(f"{name} adapter"), "switch_us": sizes.get(f"{name} switch_us")})
    return rows


def _quality(base: Path, folder: Path, mode: str, tokens: int) -> dict:
    """Top-1 agreement of the logits and identical greedy prefix (KV cache on) against fp32
    PyTorch with the adapter merged, through `verify` with the mode's profile."""
    from shira_export.verify import verify

    report = verify(model=base, candidate=folder, profile=mode, overrides={"greedy_tokens": tokens}, progress=False)
    out = {"passed": report.passed}
    for r in report.records:
        if r.metric in ("top1_agreement", "greedy_prefix", "greedy_prefix_mean", "cosine") and r.value is not None:
            key = r.metric if r.metric.startswith("greedy") else f"{r.metric}_{r.output}"
            out[key] = round(min(out.get(key, r.value), r.value), 4)
    return out


def bench_opt(work: Path, rounds: int, tokens: int) -> list[dict]:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from shira_export import ShiraConfig, get_shira_model
    from shira_export.export.merged import export_merged
    from shira_export.export.sparse import export_sparse
    from shira_export.runtime import ShiraSession

    torch.manual_seed(0)
    cfg = OPTConfig(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12, vocab_size=50272,
                    max_position_embeddings=2048, word_embed_proj_dim=768)
    base = OPTForCausalLM(cfg).eval()
    base.save_pretrained(work / "base")
    get_shira_model(copy.deepcopy(base), ShiraConfig(r=8, init_weights=False, random_seed=1)).save_pretrained(work / "adapter")
    del base
    task = "text-generation-with-past"
    export_merged(work / "base", work / "adapter", work / "merged", task=task, verify=False)
    export_sparse(work / "base", {"a": work / "adapter"}, work / "sparse", task=task, verify=False)
    folders = {f"{k} fp32": work / k for k in ("merged", "sparse")}
    for kind in ("merged", "sparse"):
        for mode in ("int8", "int4"):
            folders[f"{kind} {mode}"] = work / f"{kind}_{mode}"
            quantize_onnx_model(work / kind, folders[f"{kind} {mode}"], mode=mode)
    quality = {name: _quality(work / "base", folder, name.split()[1], tokens)
               for name, folder in tqdm(folders.items(), desc="verify", file=sys.stderr) if "fp32" not in name}
    runners = {}
    for name, folder in folders.items():
        if name.startswith("merged"):
            s = ort.InferenceSession(str(folder / "model.onnx"), _options())
            runners[name] = (s, lambda f, s=s: s.run(["logits"], f))
        else:
            sess = ShiraSession(folder, mode="portable", session_options=_options())
            runners[name] = (sess.session, lambda f, s=sess: s.run(f, adapter="a", output_names=["logits"]))

    def feeds(session, tokens: int, past: int) -> dict:
        out = {}
        for i in session.get_inputs():
            if i.name == "input_ids":
                out[i.name] = np.full((1, tokens), 7, np.int64)
            elif i.name == "attention_mask":
                out[i.name] = np.ones((1, past + tokens), np.int64)
            elif i.name == "position_ids":
                out[i.name] = np.arange(past, past + tokens, dtype=np.int64)[None]
            elif i.name.startswith("past_key_values"):
                out[i.name] = np.zeros((1, 12, past, 64), np.float32)
        return out

    rows = []
    for phase, n, past in (("prefill 1x128", 128, 0), ("decode 1 @128", 1, 128)):
        fns = {name: (lambda fn=fn, f=feeds(s, n, past): fn(f)) for name, (s, fn) in runners.items()}
        ms = _median_ms(fns, rounds, 2 if n > 1 else 10)
        for name, value in ms.items():
            kind = name.split()[0]
            rows.append({"model": "OPT-125m-shaped", "variant": name, "phase": phase, "mb": _mb(folders[name]),
                         "size_ratio": round(_mb(folders[name]) / _mb(folders[f"{kind} fp32"]), 3),
                         "ms": value, "ratio": round(value / ms[f"{kind} fp32"], 3), **quality.get(name, {})})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm", type=Path, help="output folder of examples/train_minilm_classifier.py")
    parser.add_argument("--opt", action="store_true", help="also build and time an OPT-125m-shaped decoder")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=16, help="greedy tokens per prompt in the OPT quality check")
    args = parser.parse_args()
    rows = []
    if args.minilm:
        rows += bench_minilm(args.minilm, args.rounds)
    if args.opt:
        with tempfile.TemporaryDirectory(prefix="bench_quant_") as tmp:
            rows += bench_opt(Path(tmp), args.rounds, args.tokens)
    for r in rows:
        print("  ".join(f"{k}={v}" for k, v in r.items() if v is not None))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows, "ort": ort.__version__}, indent=2) + "\n")
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
