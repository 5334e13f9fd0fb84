"""Size and latency of fp32 vs int8 vs int4 exports, merged and sparse, and adapter
switching on the quantized sparse graph.

    python examples/train_minilm_classifier.py --out /tmp/minilm     # builds the MiniLM folders
    python tools/bench_quantized.py --minilm /tmp/minilm [--opt] [--rounds 7]
    python tools/bench_quantized.py --quality --out /tmp/qbench       # the quality table (docs/quantize.md)
    python tools/bench_quantized.py --quality --only cls,emb --out /tmp/qbench  # the MiniLM rows only

`--quality`: int8 / int4 x merged / sparse of the demo (`shira-export demo`), the MiniLM
classifier (the adapter examples/train_minilm_classifier.py trains) and MiniLM feature
extraction (SHiRA adapters on query/value), each exported with default options and its own
verification (exit code and verdict), then measured against fp32 PyTorch: label agreement
on the example's 42 held-out sentences and on the 48 built-in ones, worst mean-pooled
sentence-embedding cosine over the built-in ones. Prints the CPU features and choices.

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
import functools
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
    times: dict[str, list[float]] = {k: [] for k in fns}
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
        rows.append(
            {
                "model": "MiniLM",
                "variant": name,
                "mb": sizes[name],
                "size_ratio": round(sizes[name] / sizes[f"{kind} fp32"], 3),
                "ms_1x64": value,
                "ratio": round(value / ref, 3) if ref else None,
                "adapter_bytes": sizes.get(f"{name} adapter"),
                "switch_us": sizes.get(f"{name} switch_us"),
            }
        )
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
    from shira_export.pipeline import export_merged
    from shira_export.pipeline import export_sparse
    from shira_export.runtime import ShiraSession

    torch.manual_seed(0)
    cfg = OPTConfig(
        hidden_size=768,
        num_hidden_layers=12,
        ffn_dim=3072,
        num_attention_heads=12,
        vocab_size=50272,
        max_position_embeddings=2048,
        word_embed_proj_dim=768,
    )
    base = OPTForCausalLM(cfg).eval()
    base.save_pretrained(work / "base")
    get_shira_model(copy.deepcopy(base), ShiraConfig(r=8, init_weights=False, random_seed=1)).save_pretrained(
        work / "adapter"
    )
    del base
    task = "text-generation-with-past"
    export_merged(work / "base", work / "adapter", work / "merged", task=task, verify=False)
    export_sparse(work / "base", {"a": work / "adapter"}, work / "sparse", task=task, verify=False)
    folders = {f"{k} fp32": work / k for k in ("merged", "sparse")}
    for kind in ("merged", "sparse"):
        for mode in ("int8", "int4"):
            folders[f"{kind} {mode}"] = work / f"{kind}_{mode}"
            quantize_onnx_model(work / kind, folders[f"{kind} {mode}"], mode=mode)
    quality = {
        name: _quality(work / "base", folder, name.split()[1], tokens)
        for name, folder in tqdm(folders.items(), desc="verify", file=sys.stderr)
        if "fp32" not in name
    }
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
        fns = {name: functools.partial(fn, feeds(s, n, past)) for name, (s, fn) in runners.items()}
        ms = _median_ms(fns, rounds, 2 if n > 1 else 10)
        for name, value in ms.items():
            kind = name.split()[0]
            rows.append(
                {
                    "model": "OPT-125m-shaped",
                    "variant": name,
                    "phase": phase,
                    "mb": _mb(folders[name]),
                    "size_ratio": round(_mb(folders[name]) / _mb(folders[f"{kind} fp32"]), 3),
                    "ms": value,
                    "ratio": round(value / ms[f"{kind} fp32"], 3),
                    **quality.get(name, {}),
                }
            )
    return rows


def _cli(*args: str) -> int:
    import subprocess

    return subprocess.run([sys.executable, "-m", "shira_export.cli", *args], capture_output=True, text=True).returncode


GROUPS = ("demo", "cls", "emb")  # --only: the demo, the MiniLM classifier, MiniLM embeddings


def bench_quality(out: Path, only: tuple[str, ...] = GROUPS) -> list[dict]:
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from minilm_data import HELD_OUT, split
    from train_minilm_classifier import build_base, minilm_dir

    from shira_export import ShiraConfig, ShiraModel, get_shira_model
    from shira_export.training import train_adapter
    from shira_export.verify.sentences import SENTENCES

    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    print(f"machine at start: {_machine()}", flush=True)
    if "demo" in only and not (out / "demo").is_dir():
        _cli("demo", "--output", str(out / "demo"))
    demo = out / "demo"
    for kind in ("merged", "sparse"):
        for mode in ("int8", "int4"):
            if "demo" not in only:
                break
            folder = out / f"demo_{kind}_{mode}"
            args = (
                ["merged", "--format", "onnx", "--adapter", str(demo / "adapters/poet")]
                if kind == "merged"
                else [
                    "sparse",
                    "--adapter",
                    f"poet={demo / 'adapters/poet'}",
                    "--adapter",
                    f"engineer={demo / 'adapters/engineer'}",
                ]
            )
            rc = _cli(*args, "--model", str(demo / "base"), "--quantize", mode, "--output", str(folder), "--overwrite")
            rows.append({"model": "demo", "variant": f"{kind} {mode}", "exit": rc, **_verdict(folder)})
            print(rows[-1], flush=True)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    train_texts, train_labels = split(__import__("minilm_data").TRAIN)
    base_dir, adapter = out / "minilm_base", out / "minilm_adapter"
    if not (base_dir / "config.json").is_file():
        build_base(base_dir, tok, train_texts, train_labels)
    cls = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    if not (adapter / "adapter_config.json").is_file():
        torch.manual_seed(0)
        model = get_shira_model(copy.deepcopy(cls), ShiraConfig(r=16, target_modules=["query", "value"], random_seed=0))
        enc = tok(train_texts, padding=True, return_tensors="pt")
        train_adapter(model, [{**enc, "labels": torch.tensor(train_labels)}], steps=8, lr=5e-3)
        model.save_pretrained(adapter)
    held_out = split(HELD_OUT)[0]
    feeds = _encode(tok, held_out + list(SENTENCES))
    with torch.no_grad():
        ref = (
            ShiraModel.from_pretrained(copy.deepcopy(cls), adapter)
            .merge_and_unload()
            .eval()(**{k: torch.from_numpy(v) for k, v in feeds.items()})
            .logits.numpy()
        )
    for kind in ("merged", "sparse"):
        for mode in ("int8", "int4"):
            if "cls" not in only:
                break
            folder = out / f"cls_{kind}_{mode}"
            args = (
                ["merged", "--format", "onnx", "--adapter", str(adapter)]
                if kind == "merged"
                else ["sparse", "--adapter", f"topic={adapter}"]
            )
            rc = _cli(
                *args,
                "--model",
                str(base_dir),
                "--task",
                "text-classification",
                "--quantize",
                mode,
                "--output",
                str(folder),
                "--overwrite",
            )
            logits = _run(folder, feeds, "logits", None if kind == "merged" else "topic")
            agree = logits.argmax(-1) == ref.argmax(-1)
            rows.append(
                {
                    "model": "MiniLM classifier",
                    "variant": f"{kind} {mode}",
                    "exit": rc,
                    **_verdict(folder),
                    "agreement_held_out_42": round(float(agree[: len(held_out)].mean()), 4),
                    "agreement_builtin_48": round(float(agree[len(held_out) :].mean()), 4),
                }
            )
            print(rows[-1], flush=True)
    plain = AutoModel.from_pretrained(minilm_dir()).eval()
    for name, seed in (("fa", 1), ("fb", 2)):
        if not (out / name / "adapter_config.json").is_file():
            m = get_shira_model(
                copy.deepcopy(plain),
                ShiraConfig(r=16, target_modules=["query", "value"], init_weights=False, random_seed=seed),
            )
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if "shira_weight" in n:
                        p.mul_(0.02)  # about the size of the trained classifier adapter's values
            m.save_pretrained(out / name)
    feeds = _encode(tok, list(SENTENCES))
    mask = feeds["attention_mask"][..., None].astype(np.float32)
    for kind in ("merged", "sparse"):
        for mode in ("int8", "int4"):
            if "emb" not in only:
                break
            folder = out / f"emb_{kind}_{mode}"
            args = (
                ["merged", "--format", "onnx", "--adapter", str(out / "fa")]
                if kind == "merged"
                else ["sparse", "--adapter", f"fa={out / 'fa'}", "--adapter", f"fb={out / 'fb'}"]
            )
            rc = _cli(
                *args,
                "--model",
                str(minilm_dir()),
                "--task",
                "feature-extraction",
                "--quantize",
                mode,
                "--output",
                str(folder),
                "--overwrite",
            )
            worst = {}
            for name in ["fa"] if kind == "merged" else ["fa", "fb"]:
                with torch.no_grad():
                    ref_h = (
                        ShiraModel.from_pretrained(copy.deepcopy(plain), out / name)
                        .merge_and_unload()
                        .eval()(**{k: torch.from_numpy(v) for k, v in feeds.items()})
                        .last_hidden_state.numpy()
                    )
                h = _run(folder, feeds, "last_hidden_state", None if kind == "merged" else name)
                a, b = (h * mask).sum(1) / mask.sum(1), (ref_h * mask).sum(1) / mask.sum(1)
                worst[name] = round(
                    float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min()), 4
                )
            rows.append(
                {
                    "model": "MiniLM embeddings",
                    "variant": f"{kind} {mode}",
                    "exit": rc,
                    **_verdict(folder),
                    "pooled_cosine_min_builtin_48": min(worst.values()),
                    "per_adapter": worst,
                }
            )
            print(rows[-1], flush=True)
    return rows


def _encode(tok, texts) -> dict:
    enc = tok(list(texts), padding=True, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def _run(folder: Path, feeds: dict, output: str, adapter) -> np.ndarray:
    from shira_export.runtime import ShiraSession

    if adapter is None:
        session = ort.InferenceSession(str(folder / "model.onnx"), _options())
        names = {i.name for i in session.get_inputs()}
        return session.run([output], {k: v for k, v in feeds.items() if k in names})[0]
    s = ShiraSession(folder, mode="portable", session_options=_options())
    return s.run({k: v for k, v in feeds.items() if k in s.input_names}, adapter=adapter, output_names=[output])[output]


def _verdict(folder: Path) -> dict:
    """The export's own verification: verdict, failures, size, the choices it recorded."""
    try:
        parity = json.loads((folder / "parity.json").read_text())
        details = json.loads((folder / "shira_export.json").read_text())["quantization_details"]
    except (OSError, KeyError, ValueError) as exc:
        return {"verify": f"no report ({type(exc).__name__})"}
    failed = [
        f"{r['adapter']}:{r['output']}:{r['metric']}={r['value']:.4g}"
        for r in parity["records"]
        if r["passed"] is False
    ]
    plans = [p for passes in details["passes"].values() for p in passes if p["pass"] == "plan_bits"]
    out = {
        "verify": parity["verdict"],
        "failed": failed,
        "size_ratio": details["size_ratio"],
        "cpu": details["choices"]["cpu"]["kind"],
    }
    if details["mode"] == "int4" and plans:  # how much of the body the plan put at 4 bits, and why
        plan = plans[0]
        out["plan"] = plan["method"]
        out["matmuls_4bit"] = f"{plan['matmuls_4bit']}/{plan['matmuls_4bit'] + plan['matmuls_8bit']}"
        out["weights_4bit"] = plan["weight_fraction_4bit"]
        score = plan.get("measured", {}).get("chosen_score")
        if score:
            out["calibration_cosine"] = min(v for k, v in score.items() if k != "labels_predicted")
            out["target_cosine"] = plan["measured"]["target_cosine"]
            if "labels_predicted" in score:  # classifiers: agreement the plan predicts on unseen rows
                out["predicted_agreement"] = score["labels_predicted"]
    return out


def _machine() -> dict:
    """The CPU flags that decide ORT's integer kernels, and how busy the machine was."""
    import os

    from shira_export.export.quantize import cpu_features

    cpu = cpu_features()
    return {
        "cpu_model": cpu.model,
        "flags": list(cpu.flags),
        "kind": cpu.kind,
        "load_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "cores": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm", type=Path, help="output folder of examples/train_minilm_classifier.py")
    parser.add_argument("--opt", action="store_true", help="also build and time an OPT-125m-shaped decoder")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=16, help="greedy tokens per prompt in the OPT quality check")
    parser.add_argument("--quality", action="store_true", help="the quality table (demo and MiniLM, every variant)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "shira_qbench")
    parser.add_argument(
        "--only",
        default=",".join(GROUPS),
        help=f"--quality: comma-separated subset of {','.join(GROUPS)} (default: all)",
    )
    args = parser.parse_args()
    rows = []
    only = tuple(g.strip() for g in args.only.split(",") if g.strip())
    if set(only) - set(GROUPS):
        parser.error(f"--only: expected some of {','.join(GROUPS)}, found {args.only!r}")
    if args.quality:
        rows += bench_quality(args.out, only)
    if args.minilm:
        rows += bench_minilm(args.minilm, args.rounds)
    if args.opt:
        with tempfile.TemporaryDirectory(prefix="bench_quant_") as tmp:
            rows += bench_opt(Path(tmp), args.rounds, args.tokens)
    print(f"machine at end: {_machine()}")
    for r in rows:
        print("  ".join(f"{k}={v}" for k, v in r.items() if v is not None))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"rows": rows, "ort": ort.__version__, "machine_at_end": _machine()}, indent=2) + "\n"
    )
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
