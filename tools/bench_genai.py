"""Benchmark (the genai rows of tools/bench_runtime.py): SHiRA in onnxruntime-genai.

Llama-shaped model of ~125M parameters from LlamaConfig (hidden 768, 12 layers, 12 heads,
4 kv heads, MLP 2048, vocab 32000; random weights, fp32), one r=8 adapter on q/k/v/o
(values scaled to the weights' std), CPU. In one run, medians of interleaved rounds, each
folder run by onnxruntime-genai with greedy search:

    builder merged    genai's model builder on the adapter-merged model (export_merged_genai)
    builder + delta   genai's builder graph + our sparse delta, adapter active (export_sparse_genai)
    builder base      the same folder with no adapter active
    ours <exporter>   our sparse graph (torch or optimum exporter) + genai_config.json, adapter active

prefill = time of append_tokens for a 128-token prompt (first logits included);
decode = tokens/s over the next N tokens.

    python tools/bench_runtime.py --genai [--rounds 3] [--tokens 32] [--work DIR]

The builder needs transformers 5 (the main environment, which also has the torch
exporter); for an optimum-route row too, export that folder in the old venv first:

    /work/venv-tf4/bin/python tools/bench_runtime.py --genai-export-ours --exporter optimum --work DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

VOCAB = 32000


def build_base(work: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = work / "llama125m"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        cfg = LlamaConfig(
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=1024,
            bos_token_id=1,
            eos_token_id=2,
        )
        LlamaForCausalLM(cfg).eval().save_pretrained(path)
        vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return path


def build_adapter(work: Path, base: Path, r: int = 8) -> Path:
    from transformers import LlamaForCausalLM

    from shira_export import ShiraConfig, get_shira_model
    from shira_export.tuner.checkpoint import read_adapter_dir, write_adapter_dir

    path = work / f"r{r}"
    if not (path / "adapter_config.json").exists():
        cfg = ShiraConfig(
            r=r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_weights=False, random_seed=1
        )
        get_shira_model(LlamaForCausalLM.from_pretrained(base), cfg).save_pretrained(path)
        ckpt = read_adapter_dir(path)
        for delta in ckpt.deltas.values():
            delta.values.mul_(0.02)
        write_adapter_dir(ckpt, path)
    return path


def export_ours(work: Path, exporter: str = "auto") -> Path:
    """Our sparse export (`exporter`: "torch", "optimum" or "auto") + genai_config.json,
    into work/ours_sparse_<exporter>."""
    import inspect

    from shira_export.export.genai_config import write_genai_config
    from shira_export.pipeline import export_sparse

    base = build_base(work)
    adapter = build_adapter(work, base)
    out = work / f"ours_sparse_{exporter}"
    if not (out / "genai_config.json").exists():
        kwargs = {"exporter": exporter} if "exporter" in inspect.signature(export_sparse).parameters else {}
        export_sparse(base, {"a": adapter}, out, verify=False, overwrite=True, **kwargs)
        write_genai_config(out)
    return out


def time_genai(folder: Path, adapter, prompt: np.ndarray, tokens: int):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    model = og.Model(config)
    adapters = None
    if adapter is not None:
        adapters = og.Adapters(model)
        adapters.load(str(folder / "adapters" / f"{adapter}.onnx_adapter"), adapter)

    def one():
        params = og.GeneratorParams(model)
        total = prompt.shape[1] + tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)
        if adapter is not None:
            gen.set_active_adapter(adapters, adapter)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)
        t1 = time.perf_counter()
        n = 0
        while not gen.is_done():
            gen.generate_next_token()
            n += 1
        t2 = time.perf_counter()
        return t1 - t0, n / (t2 - t1), np.asarray(gen.get_sequence(0))[prompt.shape[1] :]

    one()  # warm-up
    return one


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--genai-export-ours", action="store_true", help="only export 'ours sparse' (e.g. in the old venv)")
    ap.add_argument("--exporter", default="torch", help="our exporter for the 'ours' row: torch | optimum | auto")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_genai_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.genai_export_ours:
        print(f"wrote {export_ours(work, args.exporter)}")
        return
    from shira_export.export.genai_builder import export_merged_genai, export_sparse_genai

    base = build_base(work)
    adapter = build_adapter(work, base)
    folders = {
        "builder merged": (work / "builder_merged", None),
        "builder + delta": (work / "builder_sparse", "a"),
        "builder base": (work / "builder_sparse", None),
    }
    t = time.perf_counter()
    if not (work / "builder_merged" / "genai_config.json").exists():
        export_merged_genai(base, adapter, work / "builder_merged", adapter_name="a", overwrite=True)
    if not (work / "builder_sparse" / "genai_config.json").exists():
        export_sparse_genai(base, {"a": adapter}, work / "builder_sparse", overwrite=True)
    print(f"builder exports: {time.perf_counter() - t:.1f} s")
    try:
        export_ours(work, args.exporter)
    except Exception as exc:  # no such exporter in this environment: say how to make the folder
        print(
            f"ours sparse ({args.exporter}): not exported here ({type(exc).__name__}: {exc}); for the optimum route run\n"
            f"  /work/venv-tf4/bin/python tools/bench_runtime.py --genai-export-ours --exporter optimum --work {work}"
        )
    for folder in sorted(work.glob("ours_sparse_*")):
        if (folder / "genai_config.json").exists():
            folders[f"ours {folder.name.rsplit('_', 1)[1]}"] = (folder, "a")
    prompt = np.random.default_rng(0).integers(3, VOCAB, (1, 128), dtype=np.int64)
    threads = os.cpu_count() or 1
    runners = {k: time_genai(f, ad, prompt, args.tokens) for k, (f, ad) in folders.items()}
    samples = {k: {"prefill": [], "tps": []} for k in runners}
    tokens = {}
    for _ in range(args.rounds):
        for k, run in runners.items():
            prefill, tps, toks = run()
            samples[k]["prefill"].append(prefill)
            samples[k]["tps"].append(tps)
            tokens[k] = toks
    med = {
        k: {"prefill_ms": statistics.median(v["prefill"]) * 1000, "decode_tok_s": statistics.median(v["tps"])}
        for k, v in samples.items()
    }
    ref = med["builder merged"]
    flags = set()
    if Path("/proc/cpuinfo").exists():
        flags = set(
            next(
                (
                    ln.split(":")[1].split()
                    for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("flags")
                ),
                [],
            )
        )
    cpu = {
        "machine": platform.processor() or platform.machine(),
        "cores": threads,
        "avx512f": "avx512f" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx2": "avx2" in flags,
    }
    same = {k: bool(np.array_equal(tokens[k], tokens["builder merged"])) for k in tokens}
    print(
        f"\nLlama ~125M (12 layers), r=8 q/k/v/o, fp32, onnxruntime-genai CPU ({cpu}), "
        f"medians of {args.rounds} rounds, prompt 128, {args.tokens} new tokens"
    )
    print(
        f"{'variant':<16} {'prefill ms':>10} {'x merged':>8} {'decode tok/s':>12} {'merged/x':>8}  same tokens as merged"
    )
    for k, m in med.items():
        print(
            f"{k:<16} {m['prefill_ms']:>10.1f} {m['prefill_ms'] / ref['prefill_ms']:>8.2f} {m['decode_tok_s']:>12.1f} "
            f"{ref['decode_tok_s'] / m['decode_tok_s']:>8.2f}  {same[k]}"
        )
    dest = Path(__file__).resolve().parent / "results" / "bench_genai.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(
        json.dumps(
            {"cpu": cpu, "rounds": args.rounds, "tokens": args.tokens, "median": med, "same_tokens_as_merged": same},
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
