"""Adapter-switch benchmark: ShiraModel.switch_adapter (write the old support's saved
entries back and the new support's merged entries in, O(nnz): with the native kernels in
one blocked pass over each weight, else two scatters) vs PEFT LoRA unmerge + merge and
PEFT SHiRA unmerge + merge, r=32, two adapters with different masks, alternating a <-> b.

Shapes: an OPT-125m-shaped model (q/v of all 12 layers: 24 matrices 768x768) and a
LLaMA-7B-shaped slice (hidden 4096, 2 layers, q/k/v/o: 8 matrices 4096x4096). Medians
over interleaved switches. Also: the memory traffic a switch must do (indices + values
+ saved entries + weight cache lines touched, read and written) and the bandwidth that
the measured time implies, next to a measured large-copy bandwidth.

    python tools/bench_switch.py                       # writes tools/results/bench_switch.json
    python tools/bench_switch.py --switches 6 --shapes opt   # quick run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "bench_switch.json"
VARIANTS = ("shira_export", "peft_lora", "peft_shira")
SHAPES = {
    "opt": {"targets": ["q_proj", "v_proj"], "label": "OPT-125m-shaped, q/v x 12 layers (24 x 768x768)"},
    "llama": {
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "label": "LLaMA-7B-shaped slice, q/k/v/o x 2 layers (8 x 4096x4096)",
    },
}
CACHE_LINE = 64


def build(shape: str):
    """Targeted weights get seeded random values; the rest stays unallocated-by-touch
    (to_empty), which keeps the 4096-wide slice's resident memory to its targets."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    if shape == "opt":
        cfg, cls = OPTConfig(), OPTForCausalLM  # opt-125m's shape
    else:
        cfg = LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=2,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=1024,
        )
        cls = LlamaForCausalLM
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    for path, module in model.named_modules():
        if path.split(".")[-1] in SHAPES[shape]["targets"]:
            module.weight.data.normal_(0.0, 0.02, generator=g)
    return model


def wrap(variant: str, model, targets: list[str], r: int):
    """Two adapters, "a" and "b", with different masks; "a" merged."""
    if variant == "shira_export":
        from shira_export import ShiraConfig, get_shira_model

        m = get_shira_model(model, ShiraConfig(r=r, target_modules=targets, random_seed=1, init_weights=False), "a")
        m.add_adapter("b", ShiraConfig(r=r, target_modules=targets, random_seed=2, init_weights=False))
        m.set_adapter("a")
        m.merge_adapter()
        return m
    from peft import LoraConfig, get_peft_model
    from peft import ShiraConfig as PeftShiraConfig

    if variant == "peft_lora":
        cfgs = [LoraConfig(r=r, lora_alpha=r, target_modules=targets, init_lora_weights=False) for _ in range(2)]
    else:
        cfgs = [PeftShiraConfig(r=r, target_modules=targets, random_seed=s, init_weights=False) for s in (1, 2)]
    m = get_peft_model(model, cfgs[0], adapter_name="a")
    m.add_adapter("b", cfgs[1])
    m.set_adapter("a")
    m.merge_adapter()
    return m


def switch(variant: str, model, name: str) -> None:
    if variant == "shira_export":
        model.switch_adapter(name)
    else:
        model.unmerge_adapter()
        model.set_adapter(name)
        model.merge_adapter()


def traffic_bytes(model) -> dict:
    """Bytes a switch a -> b must move at the least, summed over the targeted layers: the
    flat int32 positions of both supports, a's saved base entries and b's merged entries
    (fp32, read), and every weight cache line either support touches, read and written
    back once (what the one-pass blocked switch does; two whole scatters move more)."""
    index_bytes = value_bytes = lines = 0
    for _, layer in model.shira_layers():
        in_f = layer.in_features
        flats = []
        for name in ("a", "b"):
            idx = layer.shira_indices[name]
            index_bytes += 4 * idx.shape[1]
            value_bytes += 4 * idx.shape[1]
            flats.append(idx[0] * in_f + idx[1])
        elem = layer.base_layer.weight.element_size()
        lines += int(torch.unique(torch.cat(flats) * elem // CACHE_LINE).numel())
    line_bytes = 2 * CACHE_LINE * lines  # each touched line is read and written back
    return {
        "index_bytes": index_bytes,
        "value_bytes": value_bytes,
        "weight_line_bytes": line_bytes,
        "total_bytes": index_bytes + value_bytes + line_bytes,
    }


def copy_bandwidth_gbs(nbytes: int = 256 << 20) -> float:
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        ts.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(ts) / 1e9  # read + write


@torch.no_grad()
def exactness(model, base_weights: dict[str, torch.Tensor]) -> float:
    """max |W - (W0 + S_active)| over targeted layers after all the switches."""
    worst = 0.0
    for path, layer in model.shira_layers():
        name = model.active_adapter
        expected = base_weights[path].clone()
        expected[layer.shira_indices[name][0], layer.shira_indices[name][1]] += layer.delta_values(name)
        worst = max(worst, float((layer.base_layer.weight - expected).abs().max()))
    return worst


def run_shape(shape: str, switches: int, r: int) -> dict:
    targets = SHAPES[shape]["targets"]
    models = {}
    base_weights = None
    for v in VARIANTS:
        base = build(shape)
        if v == "shira_export":
            base_weights = {
                p: m.weight.detach().clone() for p, m in base.named_modules() if p.split(".")[-1] in targets
            }
        models[v] = wrap(v, base, targets, r)
    state = {v: "a" for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for v in VARIANTS:  # warm-up: one round trip each
        for name in ("b", "a"):
            switch(v, models[v], name)
    for i in range(switches):
        for v in VARIANTS[i % 3 :] + VARIANTS[: i % 3]:
            state[v] = "b" if state[v] == "a" else "a"
            t0 = time.perf_counter()
            switch(v, models[v], state[v])
            times[v].append(time.perf_counter() - t0)
    ms = {v: 1e3 * statistics.median(ts) for v, ts in times.items()}
    traffic = traffic_bytes(models["shira_export"])
    out = {
        "label": SHAPES[shape]["label"],
        "switch_ms": {v: {"median": ms[v], "all": [1e3 * t for t in times[v]]} for v in VARIANTS},
        "speedup_vs_peft_lora": ms["peft_lora"] / ms["shira_export"],
        "speedup_vs_peft_shira": ms["peft_shira"] / ms["shira_export"],
        "max_abs_error_after_switches": exactness(models["shira_export"], base_weights),
        "traffic": traffic,
        "implied_gbs": traffic["total_bytes"] / (ms["shira_export"] / 1e3) / 1e9,
    }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--switches", type=int, default=20)
    p.add_argument("--r", type=int, default=32)
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-native", action="store_true", help="torch ops only (SHIRA_EXPORT_NATIVE=0), for comparison")
    args = p.parse_args()
    if args.no_native:
        os.environ["SHIRA_EXPORT_NATIVE"] = "0"  # read when the kernels are first needed; children inherit it
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = next(
        (
            l.split(":", 1)[1].strip()
            for l in Path("/proc/cpuinfo").read_text().splitlines()
            if l.startswith("model name")
        ),
        platform.processor(),
    )
    from shira_export import _native

    result: dict = {
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "copy_bandwidth_gbs": copy_bandwidth_gbs(),
            "native_kernels": _native.status(),
        },
        "setup": {"r": args.r, "switches": args.switches},
        "shapes": {},
    }
    for shape in args.shapes:
        print(f"{SHAPES[shape]['label']} ...", file=sys.stderr)
        result["shapes"][shape] = res = run_shape(shape, args.switches, args.r)
        t = res["traffic"]
        print(f"\n{res['label']}")
        for v in VARIANTS:
            print(f"  {v:<14}{res['switch_ms'][v]['median']:>10.2f} ms")
        print(
            f"  speedup vs PEFT LoRA {res['speedup_vs_peft_lora']:.1f}x, vs PEFT SHiRA {res['speedup_vs_peft_shira']:.1f}x; "
            f"max |W - (W0 + S)| after {args.switches} switches: {res['max_abs_error_after_switches']:.1e}"
        )
        print(
            f"  traffic {t['total_bytes'] / 1e6:.1f} MB (indices {t['index_bytes'] / 1e6:.1f}, values "
            f"{t['value_bytes'] / 1e6:.1f}, weight lines {t['weight_line_bytes'] / 1e6:.1f}) -> "
            f"{res['implied_gbs']:.1f} GB/s implied; large copy {result['machine']['copy_bandwidth_gbs']:.1f} GB/s"
        )
    from shira_export._io import atomic_write_text

    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
