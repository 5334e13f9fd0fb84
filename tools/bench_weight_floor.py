"""What a prefill site costs at the least when W + delta is built per call (#18).

The sparse graph's prefill branch multiplies x by W + delta, a tensor made at run time, so
onnxruntime cannot prepack it as it does a constant weight. This measures that floor on a
chain of `--layers` 768x768 MatMuls, x of `--rows` tokens, ORT CPU, 2 threads, spinning off
(as tools/bench_site.py), by the wall clock and by CPU time, medians over `--sessions`
sessions per graph taken in turn, us per site over the bare chain:

    bare      MatMul(x, W), W a constant: prepacked (the merged model)
    fed       MatMul(x, W), W a graph input fed per call (what dense mode does): no prepacking
    runtime   MatMul(x, W + z), z a fed [1] zero: W copied by an Add, then not prepacked
    site      the package's site (graph_delta.insert_sparse_deltas) fed an r=8 adapter
              (12,288 entries, laid out as the package writes it): copy of W, one scatter of
              every entry, MatMul

`fed` is the floor of any weight-side form; `runtime` adds the copy of W that a functional
graph needs before a scatter. Writes tools/results/bench_weight_floor.json with the CPU flags.

Usage: python tools/bench_weight_floor.py [--rows 128] [--layers 12] [--rounds 30] [--sessions 2]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import bench_site


def _fed(dims) -> onnx.ModelProto:
    model = bench_site.build("bare", dims)
    for init in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(init.name, TensorProto.FLOAT, list(init.dims)))
    return model


def _runtime(dims) -> onnx.ModelProto:
    model = bench_site.build("bare", dims)
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1]))
    nodes = []
    for node in graph.node:
        if node.op_type == "MatMul":
            w = node.input[1]
            nodes.append(helper.make_node("Add", [w, "z"], [w + "_rt"], name=w + "_rt"))
            node.input[1] = w + "_rt"
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def main() -> dict:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--sessions", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_weight_floor.json")
    args = ap.parse_args()
    dims = bench_site.shapes("square", args.layers)
    models = {"bare": bench_site.build("bare", dims), "fed": _fed(dims), "runtime": _runtime(dims)}
    models["site"] = bench_site.build_new(dims)
    x = np.random.default_rng(2).standard_normal((1, args.rows, 768)).astype(np.float32)
    weights = {
        i.name: ort.OrtValue.ortvalue_from_numpy(numpy_helper.to_array(i)) for i in models["bare"].graph.initializer
    }
    feeds = {
        "bare": {"x": x},
        "fed": {"x": x, **weights},
        "runtime": {"x": x, "z": np.zeros(1, np.float32)},
        "site": {"x": x, **bench_site.laid_out(dims, bench_site.adapter_feeds(dims, 8))},
    }
    sessions = {(k, j): bench_site.session(m) for k, m in models.items() for j in range(args.sessions)}
    outs = {k: s.run(None, feeds[k])[0] for (k, j), s in sessions.items() if j == 0}
    assert np.abs(outs["fed"] - outs["bare"]).max() < 1e-4 and np.abs(outs["runtime"] - outs["bare"]).max() < 1e-4
    load_start = os.getloadavg()
    runs = {key: (lambda s=s, f=feeds[key[0]]: s.run(None, f)) for key, s in sessions.items()}
    times = bench_site.interleaved_times(runs, args.rounds)
    result: dict = {"rows": args.rows, "layers": args.layers, "rounds": args.rounds, "sessions": args.sessions}
    for c in bench_site.CLOCKS:  # us per site
        med = {k: v * 1e6 / args.layers for k, v in bench_site.session_medians(times[c], models, args.sessions).items()}
        result[c] = {"bare_us_per_site": med["bare"], **{f"{k}_extra_us": med[k] - med["bare"] for k in models}}
    result["machine"] = {"flags": bench_site.cpu_flags(), "load_start": load_start, "load_end": os.getloadavg()}
    print(
        f"{args.layers} x 768x768, {args.rows} rows, medians of {args.rounds} rounds x {args.sessions} sessions "
        f"(load {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}; flags {' '.join(bench_site.cpu_flags())})"
    )
    print("| per site | us, wall clock | x bare | us, CPU time | x bare |\n|---|---|---|---|---|")
    for key, what in (
        ("bare", "MatMul, W a constant (prepacked)"),
        ("fed", "MatMul, W fed per call (no prepacking)"),
        ("runtime", "MatMul on a run-time copy of W"),
        ("site", "the package's site, r=8"),
    ):
        cells = []
        for c in ("wall", "cpu"):
            bare = result[c]["bare_us_per_site"]
            us = bare + (0.0 if key == "bare" else result[c][f"{key}_extra_us"])
            cells += [f"{us:.0f}", f"{us / bare:.2f}"]
        print(f"| {what} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
