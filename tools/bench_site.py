"""Microbenchmark of ONE sparse-delta site formulation against the bare MatMul (issue #18).

A chain of `--layers` sites (768x768 each; or 768->3072 / 3072->768 pairs, an MLP's
shape) with random constant weights, so that per-call Python overhead is spread over
many sites as in a model. Each formulation is a graph of the same chain whose sites
read `shira.<i>.indices` int32 [1, nnz] / `.values` fp32 [1, nnz]
(graph contract: /work/notes/graph_contract.md, docs/sparse_format.md). Rows N = 1 x N
tokens. nnz = r * (in + out) as PEFT's SHiRA budget. ORT CPU, 2 threads, spinning off
(as tools/bench_runtime.py); interleaved rounds, medians; per site = (chain - bare) / layers.

    bare      MatMul(x, W) with W a constant (prepacked by ORT): the merged model
    v1        the graph of releases before #18: If(nnz > 0, If(long, weight scatter, activation scatter), base)
    act       no If: y = MatMul(x, W) + activation-side delta (GatherElements / Mul / ScatterElements)
    act_if    act inside one If(nnz > 0)
    ws_nd     weight side: MatMul(x, ScatterND(W, (col, row), values, add)) (copy of W, not prepacked)
    ws_se     weight side through ScatterElements on the flat W^T
    new       the package's current graph (graph_delta.insert_sparse_deltas), fed as the package
              lays an adapter out (export.site_layout: ELL slots per output row + scattered rest)
    int4      the bare chain with MatMulNBits int4 weights (block 32): the int4 merged model
    int4_new  int4 + the package's quantized site (quant_delta), ratio to int4

Usage: python tools/bench_site.py [--rounds 5] [--layers 12] [--shape square|mlp|all] [--ranks 8 32]
       [--rows 1 2 4 8 16 128] [--only act,new] [--profile FORMULATION]
Prints a table and writes tools/results/bench_site.json (with uptime and CPU flags).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F, I32, I64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64
Nodes = list[onnx.NodeProto]


def _c(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(np.asarray(value), name))


def _n(op: str, ins: list[str], out: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, ins, [out], name=out, **attrs)


def _rowcol(p: str, idx: str, in_f: int) -> Nodes:
    return [
        _c(p + "in", np.int32(in_f)),
        _n("Div", [idx, p + "in"], p + "row"),
        _n("Mul", [p + "row", p + "in"], p + "rs"),
        _n("Sub", [idx, p + "rs"], p + "col"),
    ]


def f_bare(p, x, w, y, idx, vals, in_f, out_f) -> Nodes:
    return [_n("MatMul", [x, w], y)]


def _act(p, x, y0, y, vals, out_f) -> Nodes:
    """y = y0 + delta(x) on [B, S, *] with [R, nnz] row/col/values (R = 1 or B)."""
    return [
        _c(p + "ax1", np.array([1], np.int64)),
        _n("Unsqueeze", [p + "col", p + "ax1"], p + "col3"),
        _n("Unsqueeze", [p + "row", p + "ax1"], p + "row3"),
        _n("Unsqueeze", [vals, p + "ax1"], p + "val3"),
        _n("Shape", [x], p + "bs", start=0, end=2),
        _c(p + "one", np.array([1], np.int64)),
        _n("Concat", [p + "bs", p + "one"], p + "bs1", axis=0),
        _n("Expand", [p + "col3", p + "bs1"], p + "cols"),
        _n("Expand", [p + "row3", p + "bs1"], p + "rows"),
        _n("GatherElements", [x, p + "cols"], p + "g", axis=2),
        _n("Mul", [p + "g", p + "val3"], p + "u"),
        _n("ScatterElements", [y0, p + "rows", p + "u"], y, axis=2, reduction="add"),
    ]


def f_act(p, x, w, y, idx, vals, in_f, out_f) -> Nodes:
    return _rowcol(p, idx, in_f) + [_n("MatMul", [x, w], p + "y0")] + _act(p, x, p + "y0", y, vals, out_f)


def _if(p: str, cond: str, y: str, then: Nodes, then_out: str, other: Nodes, other_out: str) -> onnx.NodeProto:
    info = lambda n: helper.make_tensor_value_info(n, F, None)  # noqa: E731
    return helper.make_node(
        "If",
        [cond],
        [y],
        name=p + "If",
        then_branch=helper.make_graph(then, p + "t", [], [info(then_out)]),
        else_branch=helper.make_graph(other, p + "e", [], [info(other_out)]),
    )


def _nnz_pos(p, vals) -> Nodes:
    return [
        _n("Size", [vals], p + "nnz"),
        _c(p + "zero", np.int64(0)),
        _n("Greater", [p + "nnz", p + "zero"], p + "any"),
    ]


def f_act_if(p, x, w, y, idx, vals, in_f, out_f) -> Nodes:
    then = _rowcol(p, idx, in_f) + [_n("MatMul", [x, w], p + "y0")] + _act(p, x, p + "y0", p + "yd", vals, out_f)
    return _nnz_pos(p, vals) + [_if(p, p + "any", y, then, p + "yd", [_n("MatMul", [x, w], p + "yb")], p + "yb")]


def _ws_nd(p, x, w, y, vals) -> Nodes:
    return [
        _c(p + "ax2", np.array([2], np.int64)),
        _n("Unsqueeze", [p + "col", p + "ax2"], p + "c3"),
        _n("Unsqueeze", [p + "row", p + "ax2"], p + "r3"),
        _n("Concat", [p + "c3", p + "r3"], p + "pairs32", axis=2),
        _n("Cast", [p + "pairs32"], p + "pairs", to=I64),
        _n("ScatterND", [w, p + "pairs", vals], p + "w_eff", reduction="add"),
        _n("MatMul", [x, p + "w_eff"], y),
    ]


def f_ws_nd(p, x, w, y, idx, vals, in_f, out_f) -> Nodes:
    return _rowcol(p, idx, in_f) + _ws_nd(p, x, w, y, vals)


def f_ws_se(p, x, w, y, idx, vals, in_f, out_f) -> Nodes:
    return _rowcol(p, idx, in_f) + [
        _c(p + "out", np.int32(out_f)),
        _n("Mul", [p + "col", p + "out"], p + "t0"),
        _n("Add", [p + "t0", p + "row"], p + "t"),
        _c(p + "flat", np.array([1, -1], np.int64)),
        _n("Reshape", [w, p + "flat"], p + "wf"),
        _n("ScatterElements", [p + "wf", p + "t", vals], p + "wf2", axis=1, reduction="add"),
        _c(p + "wshape", np.array([in_f, out_f], np.int64)),
        _n("Reshape", [p + "wf2", p + "wshape"], p + "w_eff"),
        _n("MatMul", [x, p + "w_eff"], y),
    ]


def f_v1(p, x, w, y, idx, vals, in_f, out_f) -> Nodes:
    """The pre-#18 graph (1-D adapter arrays: its inputs get a Reshape to [nnz] first)."""
    info = lambda n: helper.make_tensor_value_info(n, F, None)  # noqa: E731
    flat = [
        _c(p + "m1", np.array([-1], np.int64)),
        _n("Reshape", [idx, p + "m1"], p + "i1"),
        _n("Reshape", [vals, p + "m1"], p + "v1"),
    ]
    i1, v1 = p + "i1", p + "v1"
    long_nodes = [
        _c(p + "a1", np.array([1], np.int64)),
        _n("Unsqueeze", [p + "col", p + "a1"], p + "a2"),
        _n("Unsqueeze", [p + "row", p + "a1"], p + "b2"),
        _n("Concat", [p + "a2", p + "b2"], p + "pr", axis=1),
        _n("Cast", [p + "pr"], p + "pairs", to=I64),
        _n("ScatterND", [w, p + "pairs", v1], p + "w_eff", reduction="add"),
        _n("MatMul", [x, p + "w_eff"], p + "yl"),
    ]
    short_nodes = [
        _n("MatMul", [x, w], p + "y0"),
        _c(p + "x2s", np.array([-1, in_f], np.int64)),
        _n("Reshape", [x, p + "x2s"], p + "x2"),
        _n("Shape", [p + "x2"], p + "n", start=0, end=1),
        _c(p + "o1", np.array([1], np.int64)),
        _n("Concat", [p + "n", p + "o1"], p + "n1", axis=0),
        _n("Expand", [p + "col", p + "n1"], p + "cols"),
        _n("GatherElements", [p + "x2", p + "cols"], p + "g", axis=1),
        _n("Mul", [p + "g", v1], p + "u"),
        _n("Expand", [p + "row", p + "n1"], p + "rows"),
        _c(p + "y2s", np.array([-1, out_f], np.int64)),
        _n("Reshape", [p + "y0", p + "y2s"], p + "y2"),
        _n("ScatterElements", [p + "y2", p + "rows", p + "u"], p + "ys", axis=1, reduction="add"),
        _n("Shape", [p + "y0"], p + "ysh"),
        _n("Reshape", [p + "ys", p + "ysh"], p + "yshort"),
    ]
    delta = _rowcol(p, i1, in_f) + [
        _n("Size", [x], p + "xs"),
        _c(p + "lim", np.int64(2 * in_f)),
        _n("Greater", [p + "xs", p + "lim"], p + "long"),
        helper.make_node(
            "If",
            [p + "long"],
            [p + "yd"],
            name=p + "If_long",
            then_branch=helper.make_graph(long_nodes, p + "lg", [], [info(p + "yl")]),
            else_branch=helper.make_graph(short_nodes, p + "sg", [], [info(p + "yshort")]),
        ),
    ]
    return flat + _nnz_pos(p, v1) + [_if(p, p + "any", y, delta, p + "yd", [_n("MatMul", [x, w], p + "yb")], p + "yb")]


FORMULATIONS: dict[str, Callable[..., Nodes]] = {
    "bare": f_bare,
    "v1": f_v1,
    "act": f_act,
    "act_if": f_act_if,
    "ws_nd": f_ws_nd,
    "ws_se": f_ws_se,
}


def shapes(kind: str, layers: int) -> list[tuple[int, int]]:
    if kind == "square":
        return [(768, 768)] * layers
    return [(768, 3072), (3072, 768)] * (layers // 2)


def build(name: str, dims: list[tuple[int, int]], seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes: Nodes = []
    inits, inputs = [], [helper.make_tensor_value_info("x", F, [1, "S", dims[0][0]])]
    x = "x"
    for i, (in_f, out_f) in enumerate(dims):
        w, idx, vals, y = f"w{i}", f"shira.{i}.indices", f"shira.{i}.values", f"y{i}"
        inits.append(
            numpy_helper.from_array((rng.standard_normal((in_f, out_f)) / np.sqrt(in_f)).astype(np.float32), w)
        )
        if name != "bare":
            inputs += [
                helper.make_tensor_value_info(idx, I32, [1, f"n{i}"]),
                helper.make_tensor_value_info(vals, F, [1, f"n{i}"]),
            ]
            inits += [helper.make_tensor(idx, I32, [1, 0], []), helper.make_tensor(vals, F, [1, 0], [])]
        nodes += FORMULATIONS[name](f"s{i}/", x, w, y, idx, vals, in_f, out_f)
        x = y
    graph = helper.make_graph(nodes, name, inputs, [helper.make_tensor_value_info(x, F, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def build_new(dims: list[tuple[int, int]]) -> onnx.ModelProto:
    """The package's graph: the bare chain rewritten by graph_delta.insert_sparse_deltas."""
    from shira_export.export.graph_delta import insert_sparse_deltas, locate_targets

    bare = build("bare", dims)
    weights = {f"{i}": numpy_helper.to_array(init).T for i, init in enumerate(bare.graph.initializer)}
    sites, _ = locate_targets(bare, weights)
    insert_sparse_deltas(bare, sites)  # module "i" -> inputs shira.i.indices / shira.i.values
    return bare


def build_int4(dims: list[tuple[int, int]], delta: bool) -> onnx.ModelProto:
    """The bare chain with MatMulNBits int4 weights (block 32), and with the package's
    quantized site (quant_delta: y_base + delta on the activations) when `delta`."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from shira_export.export.graph_delta import locate_targets
    from shira_export.export.quant_delta import attach_quantized_deltas, site_io

    bare = build("bare", dims)
    weights = {f"{i}": numpy_helper.to_array(init).T for i, init in enumerate(bare.graph.initializer)}
    sites, _ = locate_targets(bare, weights)
    io = site_io(bare, sites)
    quant = MatMulNBitsQuantizer(bare, bits=4, block_size=32, is_symmetric=True)
    quant.process()
    model = quant.model.model
    if delta:
        attach_quantized_deltas(model, sites, io, threshold=2)
    return model


def adapter_feeds(dims, r: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i, (in_f, out_f) in enumerate(dims):
        nnz = r * (in_f + out_f)
        flat = np.sort(rng.choice(in_f * out_f, nnz, replace=False)).astype(np.int32)
        feeds[f"shira.{i}.indices"] = flat[None]
        feeds[f"shira.{i}.values"] = (0.02 * rng.standard_normal(nnz)).astype(np.float32)[None]
    return feeds


def laid_out(dims, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same adapter as the package writes it (export.site_layout: ELL slots + scattered rest)."""
    from shira_export.export.adapter_file import AdapterArrays

    deltas = {str(i): (feeds[f"shira.{i}.indices"][0], feeds[f"shira.{i}.values"][0]) for i in range(len(dims))}
    return AdapterArrays.from_flat(deltas, {str(i): (o, n) for i, (n, o) in enumerate(dims)}).parameters()


THREADS = 2


def session(model: onnx.ModelProto, profile: bool = False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_profiling = profile
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def reference(dims, x: np.ndarray, feeds: dict, model: onnx.ModelProto) -> np.ndarray:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    y = x.astype(np.float64)
    for i, (in_f, out_f) in enumerate(dims):
        w = inits[f"w{i}"].astype(np.float64).copy()
        idx, vals = feeds[f"shira.{i}.indices"][0], feeds[f"shira.{i}.values"][0]
        np.add.at(w, (idx % in_f, idx // in_f), vals)
        y = y @ w
    return y


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved_times(runs: dict, rounds: int, calls: int = 1) -> dict[str, dict]:
    """{clock: {key: [seconds per call, one per round]}} by the wall clock and by CPU time; each
    round times `calls` calls of every run in turn. CPU time counts a two-thread GEMV twice and
    a one-thread small op once, so both are kept."""
    times: dict[str, dict] = {c: {k: [] for k in runs} for c in CLOCKS}
    for _ in range(rounds):
        for k, run in runs.items():
            t0 = {c: f() for c, f in CLOCKS.items()}
            for _ in range(calls):
                run()
            for c, f in CLOCKS.items():
                times[c][k].append((f() - t0[c]) / calls)
    return times


def session_medians(times: dict, names, sessions: int) -> dict[str, float]:
    """Per name, the mean over its sessions (keys (name, j)) of each session's median."""
    return {k: float(np.mean([np.median(times[(k, j)]) for j in range(sessions)])) for k in names}


def cpu_flags() -> list[str]:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f in {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512bw"})


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--shape", choices=["square", "mlp", "all"], default="square")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 128])
    ap.add_argument("--only", default="", help="comma-separated formulations (bare always runs)")
    ap.add_argument("--profile", default="", help="print per-op-type time of this formulation (one r, rows)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: process CPU time per call (robust on a shared, loaded machine); wall: elapsed",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_site.json")
    args = ap.parse_args(argv)
    global THREADS
    THREADS = args.threads
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    names = ["bare"] + [n for n in (args.only.split(",") if args.only else [*FORMULATIONS, "new"]) if n and n != "bare"]
    kinds = ["square", "mlp"] if args.shape == "all" else [args.shape]
    load = os.getloadavg()
    results = {
        "uptime_load": load,
        "cpu_flags": cpu_flags(),
        "layers": args.layers,
        "rounds": args.rounds,
        "threads": args.threads,
        "clock": args.clock,
        "rows": {},
    }
    print(
        f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; CPU flags {' '.join(cpu_flags())}; ORT {args.threads} "
        f"thread(s), no spinning; {args.clock} time per call"
    )
    for kind in kinds:
        dims = shapes(kind, args.layers)

        def make(n: str) -> onnx.ModelProto:
            if n == "new":
                return build_new(dims)
            if n in ("int4", "int4_new"):
                return build_int4(dims, n == "int4_new")
            return build(n, dims)

        models = {n: make(n) for n in names}
        sessions = {n: session(m) for n, m in models.items()}
        for r in args.ranks:
            ad = adapter_feeds(dims, r)
            ad_pkg = laid_out(dims, ad)  # what the package's graphs are fed
            for rows in args.rows:
                x = np.random.default_rng(2).standard_normal((1, rows, dims[0][0])).astype(np.float32)
                feeds = {
                    n: dict(x=x, **({} if n in ("bare", "int4") else ad_pkg if n in ("new", "int4_new") else ad))
                    for n in names
                }
                want = reference(dims, x, ad, models["bare"])
                err = {}
                for n in names:
                    got = sessions[n].run(None, feeds[n])[0]
                    if n.startswith(
                        "int4"
                    ):  # int4 weights change every layer's input: exactness is tests/test_graph_delta.py's
                        err[n] = float("nan")
                        continue
                    err[n] = float(
                        np.abs(
                            got
                            - (
                                reference(dims, x, {k: v[:, :0] for k, v in ad.items()}, models["bare"])
                                if n == "bare"
                                else want
                            )
                        ).max()
                    )
                iters = max(3, int(600 / (rows + 5)))
                times: dict[str, list[float]] = {n: [] for n in names}
                for _ in range(args.rounds):
                    for n in names:
                        s, f = sessions[n], feeds[n]
                        t = clock()
                        for _ in range(iters):
                            s.run(None, f)
                        times[n].append((clock() - t) / iters * 1e6)
                med = {n: statistics.median(v) for n, v in times.items()}
                key = f"{kind} r={r} rows={rows}"
                ref_of = lambda n: "int4" if n.startswith("int4") and "int4" in med else "bare"  # noqa: E731
                results["rows"][key] = {
                    "us_per_call": med,
                    "ratio": {n: med[n] / med[ref_of(n)] for n in names},
                    "extra_us_per_site": {n: (med[n] - med["bare"]) / len(dims) for n in names},
                    "max_abs_err": err,
                }
                cells = "  ".join(f"{n} {med[n] / med[ref_of(n)]:.3f}" for n in names if n not in ("bare", "int4"))
                print(f"{key:<24} bare {med['bare']:8.0f} us | {cells}", flush=True)
                bad = [n for n in names if err[n] > 1e-3]  # NaN (int4) compares False
                if bad:
                    print(f"   WRONG RESULT: {bad} {[err[n] for n in bad]}")
    if args.profile:
        _profile(args.profile, shapes(kinds[0], args.layers), args.ranks[0], args.rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return results


def _profile(name: str, dims, r: int, rows_list) -> None:
    """Per op type: microseconds per call summed over the chain (ORT's own profiler)."""
    model = build_new(dims) if name == "new" else build(name, dims)
    for rows in rows_list:
        s = session(model, profile=True)
        x = np.random.default_rng(2).standard_normal((1, rows, dims[0][0])).astype(np.float32)
        ad = adapter_feeds(dims, r)
        f = dict(x=x, **(laid_out(dims, ad) if name == "new" else ad))
        calls = 50
        for _ in range(calls):
            s.run(None, f)
        events = json.loads(Path(s.end_profiling()).read_text())
        by_op: dict[str, float] = {}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                op = e["args"].get("op_name", "?")
                by_op[op] = by_op.get(op, 0.0) + e["dur"] / calls
        total = sum(by_op.values())
        print(
            f"profile {name} r={r} rows={rows}: {total:.0f} us of kernels per call; "
            + ", ".join(f"{k} {v:.0f}" for k, v in sorted(by_op.items(), key=lambda kv: -kv[1]))
        )


if __name__ == "__main__":
    main()
