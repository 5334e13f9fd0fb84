"""Training-step benchmark: shira_export's SHiRA vs PEFT's SHiRA vs PEFT's LoRA (same r).

OPT-125m-shaped model from OPTConfig (random weights, fp32, CPU), q/k/v/out/fc1/fc2
targeted, r=32, batch 4 x 128 tokens, AdamW. Step time = forward + backward + optimizer
step, medians over interleaved rounds in one process (the rotation changes each round).
Peak memory = peak RSS over two training steps minus RSS before them, each variant in
a fresh subprocess (VmHWM reset through /proc/self/clear_refs), so one variant's freed
heap cannot hide another's peak.

    python tools/bench_train.py                # full run, writes tools/results/bench_train.json
    python tools/bench_train.py --ops          # also the per-layer op comparison
    python tools/bench_train.py --with-base    # also the frozen base: what each adapter adds to a step
    python tools/bench_train.py --rounds 2 --seq 32 --layers 2   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
VARIANTS = ("shira_export", "peft_shira", "peft_lora")
RESULTS = Path(__file__).resolve().parent / "results" / "bench_train.json"


def build_base(layers: int):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(num_hidden_layers=layers))  # the rest: opt-125m's shape


def wrap(variant: str, base, r: int):
    if variant == "frozen_base":  # no adapter; one trainable table keeps backward running through every layer
        base.requires_grad_(False)
        base.model.decoder.embed_positions.weight.requires_grad_(True)
        return base
    if variant == "shira_export":
        from shira_export import ShiraConfig, get_shira_model

        return get_shira_model(base, ShiraConfig(r=r, target_modules=TARGETS, random_seed=0, init_weights=False))
    from peft import LoraConfig, get_peft_model
    from peft import ShiraConfig as PeftShiraConfig

    if variant == "peft_shira":
        return get_peft_model(base, PeftShiraConfig(r=r, target_modules=TARGETS, random_seed=0, init_weights=False))
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=TARGETS))


class Trainer:
    def __init__(self, model, batch: int, seq: int) -> None:
        self.model = model.train()
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 50272, (batch, seq), generator=g)

    def step(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process): on a shared machine the CPU time
        is the steadier figure, the wall time the one a user sees."""
        t0, c0 = time.perf_counter(), time.process_time()
        self.model(input_ids=self.ids, labels=self.ids).loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, time.process_time() - c0


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _release_free_heap() -> None:
    """Hand freed heap back to the OS (glibc), so that memory freed while wrapping the
    model (mask drawing's temporaries) is not counted in "before" and then reused by the
    steps unseen: measured without this, "before" moved by 150 MiB between runs of one
    variant and the delta by as much the other way."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the delta is then less steady


def memory_probe(args) -> dict:
    """Run in a fresh process: peak RSS delta of two steps of one variant."""
    trainer = Trainer(wrap(args.memory_probe, build_base(args.layers), args.r), args.batch, args.seq)
    _release_free_heap()
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(2):
        trainer.step()
    return {"peak_delta_mib": (_rss_kib("VmHWM") - before) / 1024, "rss_before_mib": before / 1024}


def op_benchmark(rounds: int, tokens: int, r: int) -> list[dict]:
    """One layer's forward + backward of the adapter's delta, per formulation."""
    from shira_export import _native
    from shira_export.tuner.sparse_ops import (
        SparsePlan,
        merged_weight_linear,
        scatter_flat_,
        sparse_linear_delta,
        storage_index,
    )

    rows = []
    for out_f, in_f in ((768, 768), (3072, 768)):
        nnz = r * (out_f + in_f)
        g = torch.Generator().manual_seed(0)
        flat = torch.randperm(out_f * in_f, generator=g)[:nnz].sort().values
        idx = torch.stack([flat // in_f, flat % in_f])
        plan = SparsePlan.build(idx, (out_f, in_f))
        weight = torch.randn(out_f, in_f)
        x = torch.randn(tokens, in_f, requires_grad=True)
        vals = torch.randn(nnz, requires_grad=True)
        a = torch.randn(r, in_f, requires_grad=True)
        b = torch.randn(out_f, r, requires_grad=True)

        flat_index = storage_index(idx, (out_f, in_f))

        base_entries = weight.view(-1)[flat_index].clone()

        def training_path():  # what a SHiRA layer runs in train mode: W + S rewritten (new values), then the step
            scatter_flat_(weight, flat_index, base_entries + vals.detach())
            return merged_weight_linear(x, weight, None, vals, plan).sum().backward()

        def training_path_torch_ops():  # the same with the native kernels off
            lib = _native._state["lib"]
            _native._state["lib"] = None
            try:
                return training_path()
            finally:
                _native._state["lib"] = lib

        def csr():
            return (x @ weight.t() + sparse_linear_delta(x, vals, plan)).sum().backward()

        def gather_index_add():  # the previous formulation: a [tokens, nnz] temporary
            prod = x[:, idx[1]] * vals
            return (x @ weight.t() + x.new_zeros(tokens, out_f).index_add(1, idx[0], prod)).sum().backward()

        def peft_shira():  # clone W, add a COO delta, dense linear: dense weight gradient
            w = weight.clone() + torch.sparse_coo_tensor(idx, vals, (out_f, in_f))
            return torch.nn.functional.linear(x, w).sum().backward()

        def lora():
            return (x @ weight.t() + (x @ a.t()) @ b.t()).sum().backward()

        def base_only():
            return (x @ weight.t()).sum().backward()

        fns = {
            "base (no adapter)": base_only,
            "shira_export train": training_path,
            "shira_export torch ops": training_path_torch_ops,
            "shira_export CSR": csr,
            "gather/index_add": gather_index_add,
            "peft_shira clone+coo": peft_shira,
            "lora": lora,
        }
        times = {k: [] for k in fns}
        for k, f in fns.items():
            f()  # warm-up
        for i in range(rounds):
            names = list(fns)[i % len(fns) :] + list(fns)[: i % len(fns)]
            for k in names:
                t0 = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t0)
        for k, ts in times.items():
            rows.append({"shape": f"{out_f}x{in_f}", "formulation": k, "ms": 1e3 * statistics.median(ts)})
    return rows


def machine() -> dict:
    cpu = next(
        (
            l.split(":", 1)[1].strip()
            for l in Path("/proc/cpuinfo").read_text().splitlines()
            if l.startswith("model name")
        ),
        platform.processor(),
    )
    from shira_export import _native

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "native_kernels": _native.status(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds (single steps move by +-10 %%)")
    p.add_argument("--r", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--ops", action="store_true", help="also time the per-layer formulations")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-native", action="store_true", help="torch ops only (SHIRA_EXPORT_NATIVE=0), for comparison")
    p.add_argument(
        "--with-base",
        action="store_true",
        help="also time the frozen base model (no adapter): what each adapter adds to a step",
    )
    p.add_argument("--memory-probe", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.no_native:
        os.environ["SHIRA_EXPORT_NATIVE"] = "0"  # read when the kernels are first needed; children inherit it
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(args)))
        return 0

    result: dict = {
        "machine": machine(),
        "setup": {k: getattr(args, k) for k in ("r", "batch", "seq", "layers", "rounds")},
    }
    base = build_base(args.layers)
    timed = VARIANTS + (("frozen_base",) if args.with_base else ())
    trainers = {v: Trainer(wrap(v, copy.deepcopy(base), args.r), args.batch, args.seq) for v in timed}
    del base
    times: dict[str, list[float]] = {v: [] for v in timed}
    cpu: dict[str, list[float]] = {v: [] for v in timed}
    for v in timed:
        trainers[v].step()  # warm-up (optimizer state, first-call allocations)
    for i in range(args.rounds):
        for v in timed[i % len(timed) :] + timed[: i % len(timed)]:
            wall, cpu_s = trainers[v].step()
            times[v].append(wall)
            cpu[v].append(cpu_s)
        print(f"round {i + 1}/{args.rounds}: " + ", ".join(f"{v} {times[v][-1]:.2f}s" for v in timed), file=sys.stderr)
    del trainers
    step = {v: statistics.median(ts) for v, ts in times.items()}
    step_cpu = {v: statistics.median(ts) for v, ts in cpu.items()}
    result["step_s"] = {v: {"median": step[v], "all": times[v]} for v in timed}
    result["step_cpu_s"] = {v: {"median": step_cpu[v], "all": cpu[v]} for v in timed}

    memory = {}
    if not args.no_memory:
        for v in VARIANTS:
            cmd = [sys.executable, __file__, "--memory-probe", v] + [
                f"--{k}={getattr(args, k)}" for k in ("r", "batch", "seq", "layers", "threads")
            ]
            memory[v] = json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            )
        result["memory"] = memory
    if args.ops:
        result["ops"] = op_benchmark(max(args.rounds, 5), args.batch * args.seq, args.r)

    ratios = {
        "step vs peft_shira (target <= 0.8)": step["shira_export"] / step["peft_shira"],
        "step vs peft_lora (target <= 1.0)": step["shira_export"] / step["peft_lora"],
        "step CPU time vs peft_shira": step_cpu["shira_export"] / step_cpu["peft_shira"],
        "step CPU time vs peft_lora": step_cpu["shira_export"] / step_cpu["peft_lora"],
    }
    for peer in ("peft_shira", "peft_lora"):  # within a round the three steps run back to back: drift cancels
        ratios[f"median of per-round ratios vs {peer}"] = statistics.median(
            ours / theirs for ours, theirs in zip(times["shira_export"], times[peer])
        )
    if args.with_base:  # paired within rounds: what each variant adds to the frozen base's step
        result["added_over_base_s"] = {
            v: statistics.median(a - b for a, b in zip(times[v], times["frozen_base"])) for v in VARIANTS
        }
    if memory:
        ratios["peak memory vs peft_shira (target <= 0.9)"] = (
            memory["shira_export"]["peak_delta_mib"] / memory["peft_shira"]["peak_delta_mib"]
        )
    result["ratios"] = ratios

    print(f"native kernels: {result['machine']['native_kernels']}")
    print(f"\n{'variant':<14}{'step s (median)':>17}{'CPU s (median)':>16}{'peak RSS delta MiB':>20}")
    for v in timed:
        mem = f"{memory[v]['peak_delta_mib']:.0f}" if memory and v in memory else "-"
        print(f"{v:<14}{step[v]:>17.3f}{step_cpu[v]:>16.3f}{mem:>20}")
    for v, added in result.get("added_over_base_s", {}).items():
        print(f"{v} adds {1e3 * added:.0f} ms to the frozen base's step (median of per-round differences)")
    for k, val in ratios.items():
        print(f"{k}: {val:.2f}")
    for row in result.get("ops", []):
        print(f"op {row['shape']:<9} {row['formulation']:<22} {row['ms']:8.2f} ms")
    from shira_export._io import atomic_write_text

    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
