"""What each of a ShiraLayer's cached derived values is worth (tuner/layer_state.py).

Reduced forms of tools/bench_switch.py (shira_export only) and tools/bench_train.py
(shira_export only), with one cache dropped at a time: the cached value is recomputed on
every use instead. The variants are interleaved round by round in one process, so that
drift on a shared machine cancels; CPU time is the steadier figure there.

    python tools/bench_layer_state.py --what opt --rounds 20     # 24 x 768x768 switches
    python tools/bench_layer_state.py --what llama --rounds 8    # 8 x 4096x4096 switches
    python tools/bench_layer_state.py --what train --rounds 4 --only support
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the two benchmarks this one reduces

import bench_switch  # noqa: E402
import bench_train  # noqa: E402

from shira_export.tuner import layer_state as ls  # noqa: E402
from shira_export.tuner.sparse_ops import SparsePlan, gather_flat, storage_index  # noqa: E402


def _no_merged(self, name, base, values, scale, dtype):
    return ls.merged_values(base, values, scale, dtype)


def _no_support(self, name, indices):
    return ls.Support(
        SparsePlan.build(indices, self.shape), storage_index(indices, self.shape, transposed=self.transposed)
    )


DROPS: dict[str, list[tuple[type, str, Callable]]] = {
    "int32_positions": [(ls.Support, "flat32", lambda self: self.flat.to(torch.int32))],
    "merged_entries": [(ls.LayerState, "merged_entries", _no_merged)],
    "base_entries": [
        (ls.LayerState, "base_entries", lambda self, n, i, w: gather_flat(w, self.support(n, i).flat)),
        (ls.LayerState, "cached_base_entries", lambda self, n, i, w: None),
    ],
    "support": [(ls.LayerState, "support", _no_support)],
}
_ORIGINAL = {(cls, attr): getattr(cls, attr) for patches in DROPS.values() for cls, attr, _ in patches}


def drop(which: str) -> None:
    for (cls, attr), fn in _ORIGINAL.items():
        setattr(cls, attr, fn)
    for cls, attr, fn in DROPS.get(which, []):
        setattr(cls, attr, fn)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--what", choices=["opt", "llama", "train"], default="opt")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=2, help="train: OPT layers")
    p.add_argument("--seq", type=int, default=64, help="train: tokens per row (batch 4)")
    p.add_argument("--only", nargs="*", choices=list(DROPS), help="the caches to drop (default: each)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    variants = ["none"] + (args.only if args.only is not None else list(DROPS))
    if args.what == "train":
        step = bench_train.Trainer(
            bench_train.wrap("shira_export", bench_train.build_base(args.layers), 32), 4, args.seq
        ).step
    else:
        model = bench_switch.wrap(
            "shira_export", bench_switch.build(args.what), bench_switch.SHAPES[args.what]["targets"], 32
        )
        names = iter(["b", "a"] * 10**6)

        def step() -> tuple[float, float]:
            t0, c0 = time.perf_counter(), time.process_time()
            model.switch_adapter(next(names))
            return time.perf_counter() - t0, time.process_time() - c0

    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:  # warm-up: a round trip with each
        drop(v)
        step(), step()
    for i in range(args.rounds):
        for v in variants[i % len(variants) :] + variants[: i % len(variants)]:
            drop(v)
            for _ in range(2):
                w, c = step()
                wall[v].append(w)
                cpu[v].append(c)
    drop("none")
    result = {
        v: {"wall_ms": 1e3 * statistics.median(wall[v]), "cpu_ms": 1e3 * statistics.median(cpu[v])} for v in variants
    }
    print(json.dumps({"what": args.what, "threads": args.threads, "rounds": args.rounds, "dropped": result}))
    for v in variants:
        print(
            f"  dropped {v:<16} {result[v]['cpu_ms']:9.2f} ms CPU  {result[v]['wall_ms']:9.2f} ms wall "
            f"({result[v]['cpu_ms'] / result['none']['cpu_ms']:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
