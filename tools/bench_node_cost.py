"""What one small node costs onnxruntime, in the model's graph and inside an If branch (#18).

Why the sparse site's decode delta runs in the model's graph (export/delta_sites.py): a
decode step is a dozen small ops per site, and their fixed cost, not their arithmetic, is
what a site adds to the merged GEMV. Three chains of `--layers` 768x768 MatMuls, x of one
token, ORT CPU, 2 threads, spinning off (as tools/bench_site.py), CPU time and wall clock, per-round
differences to the bare chain, medians:

    bare      MatMul(x, W)
    graph     MatMul(x, W) then `--ops` Adds of a [768] constant, in the model's graph
    branch    If(S > 64, MatMul(x, W), MatMul(x, W) then the same Adds): the Adds in a branch
    site      the package's site (graph_delta.insert_sparse_deltas) fed no adapter: every op
              on its default arrays, the fixed cost of a site at decode
    site_r8   the same site fed an r=8 adapter laid out as the package writes it

Prints us per node (graph), the extra per node in a branch, and the empty site's cost and
node count, by CPU time and by the wall clock (CPU time counts the two-thread GEMV twice and a
one-thread small op once, so a small op's share of a step is larger by the wall clock); writes
tools/results/bench_node_cost.json with the CPU flags and load.

Usage: python tools/bench_node_cost.py [--layers 12] [--ops 12] [--rounds 25]
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


def chain(kind: str, layers: int, ops: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "x"
    info = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)  # noqa: E731
    for i in range(layers):
        w, c, p = f"w{i}", f"c{i}", f"s{i}/"
        inits.append(numpy_helper.from_array((rng.standard_normal((768, 768)) / 28).astype(np.float32), w))
        inits.append(numpy_helper.from_array((0.01 * rng.standard_normal(768)).astype(np.float32), c))
        body = [helper.make_node("MatMul", [x, w], [p + "m"], name=p + "m")]
        for j in range(ops if kind != "bare" else 0):
            body.append(helper.make_node("Add", [body[-1].output[0], c], [p + f"a{j}"], name=p + f"a{j}"))
        y = f"y{i}"
        if kind == "branch":
            then = [helper.make_node("MatMul", [x, w], [p + "t"], name=p + "t")]
            nodes += [
                helper.make_node("Shape", [x], [p + "S"], name=p + "S", start=1, end=2),
                helper.make_node(
                    "Constant", [], [p + "lim"], name=p + "lim", value=numpy_helper.from_array(np.array([64], np.int64))
                ),
                helper.make_node("Greater", [p + "S", p + "lim"], [p + "long"], name=p + "long"),
                helper.make_node(
                    "If",
                    [p + "long"],
                    [y],
                    name=p + "If",
                    then_branch=helper.make_graph(then, p + "then", [], [info(p + "t")]),
                    else_branch=helper.make_graph(body, p + "else", [], [info(body[-1].output[0])]),
                ),
            ]
        else:
            body[-1].output[0] = y
            nodes += body
        x = y
    graph = helper.make_graph(
        nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", 768])], [info(x)], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def _per_site(times: dict[str, list[float]], args) -> dict:
    """us per site over the bare chain (per round, then the median), per node, per branch node."""
    bare = np.array(times["bare"])
    per = {k: float(np.median((np.array(v) - bare) / args.layers)) for k, v in times.items()}
    return {
        "us_per_node_in_graph": per["graph"] / args.ops,
        "us_extra_per_node_in_branch": (per["branch"] - per["graph"]) / args.ops,
        "empty_site_us": per["site"],
        "r8_site_us": per["site_r8"],
        "bare_us_per_matmul": float(np.median(bare) / args.layers),
    }


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--ops", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_node_cost.json")
    args = ap.parse_args()
    x = np.random.default_rng(2).standard_normal((1, 1, 768)).astype(np.float32)
    site = bench_site.build_new(bench_site.shapes("square", args.layers))
    site_nodes = sum(1 for n in site.graph.node if n.name.startswith("shira/0/") and n.op_type != "Constant")
    models = {k: chain(k, args.layers, args.ops) for k in ("bare", "graph", "branch")}
    models["site"] = models["site_r8"] = site
    sessions = {k: bench_site.session(m) for k, m in models.items()}
    dims = bench_site.shapes("square", args.layers)
    feeds = {k: {"x": x} for k in models}
    feeds["site_r8"] = {"x": x, **bench_site.laid_out(dims, bench_site.adapter_feeds(dims, 8))}
    outs = {k: s.run(None, feeds[k])[0] for k, s in sessions.items()}
    assert np.abs(outs["graph"] - outs["branch"]).max() < 1e-5
    load_start = os.getloadavg()
    runs = {k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()}
    times = bench_site.interleaved_times(runs, args.rounds, args.calls)
    result = {  # us per call; CPU time first: robust on a shared machine
        c: _per_site({k: [t * 1e6 for t in v] for k, v in times[c].items()}, args) for c in ("cpu", "wall")
    }
    result["cpu"]["empty_site_nodes"] = site_nodes
    result.update(
        {
            "layers": args.layers,
            "ops": args.ops,
            "threads": bench_site.THREADS,
            "machine": {"flags": bench_site.cpu_flags(), "load_start": load_start, "load_end": os.getloadavg()},
        }
    )
    print(
        f"{args.layers} x 768x768, one token, medians of {args.rounds} rounds "
        f"(load {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}; flags {' '.join(bench_site.cpu_flags())})"
    )
    # CPU time counts the GEMV's two threads and a small op's one: the wall clock is what a caller waits
    cpu, wall = result["cpu"], result["wall"]
    print("| what | us, CPU time | us, wall clock |\n|---|---|---|")
    rows = [
        ("the merged site (a 768x768 GEMV)", "bare_us_per_matmul", 1),
        ("one small node in the model's graph", "us_per_node_in_graph", 2),
        ("the same node inside an If branch, extra", "us_extra_per_node_in_branch", 2),
        (f"the package's site, no adapter ({site_nodes} nodes in the model's graph)", "empty_site_us", 1),
        ("the same site fed an r=8 adapter (12,288 entries)", "r8_site_us", 1),
    ]
    for what, key, digits in rows:
        print(f"| {what} | {cpu[key]:.{digits}f} | {wall[key]:.{digits}f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
