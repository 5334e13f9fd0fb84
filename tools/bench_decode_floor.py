"""How near the merged model a decode step could get with the package's delta ops (#18).

The exported sparse graph (tools/bench_runtime.py's `--work` folder: run that first) against
the merged model of the same adapter, and against two edits of the sparse graph that are
valid for decode only (one token, one adapter), which say what the If and the index
Expands cost:

    portable   the sparse graph through plain onnxruntime + LoraAdapter (as exported)
    no_if      each site's If replaced by its decode branch (base op + delta in the model's graph)
    floor      no_if, and the gathers read the adapter's indices with no Expand to [B, n, ...]:
               the delta ops alone, the least any graph of these ops does per decode step

Decode with a 128-token cache, medians of interleaved calls over `--sessions` sessions per
graph, by the wall clock and by CPU time. Every edited graph's logits are checked against
the exported one's. Writes tools/results/bench_decode_floor.json.

Usage: python tools/bench_decode_floor.py --work DIR [--adapter r8a] [--int4] [--rounds 40] [--sessions 2]
(--int4: the int4 folder and merged int4 model that tools/bench_runtime_int4.py left in DIR)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

import bench_runtime as br
import bench_site


def no_if(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each site's If (`shira*/<m>/If`) replaced by the nodes of its decode (else) branch."""
    model = copy.deepcopy(model)
    nodes = []
    for node in model.graph.node:
        if node.op_type == "If" and node.name.endswith("/If") and node.name.startswith("shira"):
            branch = next(a.g for a in node.attribute if a.name == "else_branch")
            nodes += list(branch.node)
            nodes.append(helper.make_node("Identity", [branch.output[0].name], [node.output[0]], name=node.name))
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def no_expand(model: onnx.ModelProto) -> onnx.ModelProto:
    """The decode gathers read the parts as fed: every site Expand (`/eks`, `/cols`, `/rows`) bypassed."""
    model = copy.deepcopy(model)
    renamed, keep = {}, []
    for node in model.graph.node:
        if node.op_type == "Expand" and node.output[0].rsplit("/", 1)[-1] in ("eks", "cols", "rows"):
            renamed[node.output[0]] = node.input[0]
        else:
            keep.append(node)
    for node in keep:
        node.input[:] = [renamed.get(i, i) for i in node.input]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def main() -> dict:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--adapter", default="r8a")
    ap.add_argument("--int4", action="store_true")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--sessions", type=int, default=2)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_decode_floor.json")
    args = ap.parse_args()
    folder = args.work / ("sparse_int4" if args.int4 else "sparse")
    merged = args.work / f"merged_{args.adapter}{'_int4' if args.int4 else ''}.onnx"
    for need in (folder / "model.onnx", merged):
        if not need.exists():
            raise SystemExit(f"{need} is missing: run tools/bench_runtime.py --work {args.work} first")
    exported = onnx.load(str(folder / "model.onnx"))
    graphs = {"portable": exported, "no_if": no_if(exported)}
    graphs["floor"] = no_expand(graphs["no_if"])
    lora = ort.LoraAdapter()
    lora.Load(str(folder / "adapters" / f"{args.adapter}.onnx_adapter"))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(lora)
    opts = br.session_options

    def make(model) -> ort.InferenceSession:
        return ort.InferenceSession(model.SerializeToString(), opts(), providers=["CPUExecutionProvider"])

    sessions = {}
    for j in range(args.sessions):
        sessions[("merged", j)] = (ort.InferenceSession(str(merged), opts(), providers=["CPUExecutionProvider"]), None)
        for k, g in graphs.items():
            sessions[(k, j)] = (make(g), run_options)
    outs = [o.name for o in sessions[("merged", 0)][0].get_outputs()]
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, br.VOCAB, (1, 128), dtype=np.int64)
    step = rng.integers(0, br.VOCAB, (1, 1), dtype=np.int64)
    portable, options = sessions[("portable", 0)]
    cache = br.as_past(outs, portable.run_with_ort_values(outs, br.feeds(args.layers, prompt), options))
    step_feeds = br.feeds(args.layers, step, cache, 128)
    want = portable.run_with_ort_values(outs, step_feeds, options)[0].numpy()
    for k in ("no_if", "floor"):
        got = sessions[(k, 0)][0].run_with_ort_values(outs, step_feeds, run_options)[0].numpy()
        assert np.abs(got - want).max() < 1e-4, k  # the edits keep the decode's result
    load_start = os.getloadavg()
    runs = {key: (lambda s=s, o=o: s.run_with_ort_values(outs, step_feeds, o)) for key, (s, o) in sessions.items()}
    times = bench_site.interleaved_times(runs, args.rounds)
    result: dict = {"adapter": args.adapter, "int4": args.int4, "rounds": args.rounds, "sessions": args.sessions}
    for c in bench_site.CLOCKS:  # ms per step
        med = {k: v * 1000 for k, v in bench_site.session_medians(times[c], ("merged", *graphs), args.sessions).items()}
        result[c] = {"merged_ms": med["merged"], **{f"{k}_x_merged": med[k] / med["merged"] for k in graphs}}
    result["machine"] = {**br.machine(), "load_start": load_start, "load_end": list(os.getloadavg())}
    print(
        f"decode, 128-token cache, {args.adapter}{' int4' if args.int4 else ''}, medians of {args.rounds} rounds x "
        f"{args.sessions} sessions (load {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f})"
    )
    print("| graph | x merged, wall clock | x merged, CPU time |\n|---|---|---|")
    print(f"| merged | {result['wall']['merged_ms']:.2f} ms | {result['cpu']['merged_ms']:.2f} ms |")
    for k in graphs:
        print(f"| {k} | {result['wall'][f'{k}_x_merged']:.3f} | {result['cpu'][f'{k}_x_merged']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
