"""The runtime's dense variant on onnx-ir (runtime.dense_variant): the sparse graph it is
given stays as it was, the weights it keeps are not serialized again (dense mode opens
models of GBs), each site is its base op again reading `shira.<m>.weight`, and feeding a
merged weight there gives the adapter's result."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from test_graph_delta import _numpy, _random_adapter, _session, _synthetic

from shira_export.export.graph_delta import insert_sparse_deltas, locate_targets, weight_name
from shira_export.runtime.dense_variant import to_dense_variant


def _sparse() -> tuple[onnx.ModelProto, list, dict[str, np.ndarray], np.ndarray]:
    model, weights, bias = _synthetic()
    sites, _ = locate_targets(model, weights)
    insert_sparse_deltas(model, sites)
    return model, sites, weights, bias


def test_the_sparse_graph_stays_and_kept_weights_are_not_serialized_again(monkeypatch):
    model, sites, _, _ = _sparse()
    before = model.SerializeToString()
    serialized: list[str] = []
    serialize = ir.serde.serialize_tensor_into

    def counting(proto, tensor):
        serialized.append(tensor.name or "")
        return serialize(proto, tensor)

    monkeypatch.setattr(ir.serde, "serialize_tensor_into", counting)
    dense, arrays = to_dense_variant(model, sites)
    assert model.SerializeToString() == before
    assert arrays == {}
    kept = [i.name for i in dense.graph.initializer]
    assert kept == ["shira.m.weight", "shira.g.weight", "bias"]  # renamed in place, in the graph's order
    assert not set(serialized) & set(kept), serialized  # Constant nodes' tensors only
    base = {i.name: i for i in model.graph.initializer}
    for site in sites:  # the same bytes under the contract's name
        renamed = next(i for i in dense.graph.initializer if i.name == weight_name(site.module))
        assert renamed.raw_data == base[site.initializer].raw_data


def test_each_site_is_its_base_op_reading_the_fed_weight():
    model, sites, weights, bias = _sparse()
    dense, arrays = to_dense_variant(model, sites, defaults=False)
    assert not any(n.name.startswith("shira/") for n in dense.graph.node)
    ops = {n.name: n for n in dense.graph.node}
    assert {s.module: (ops[s.node].op_type, ops[s.node].input[1]) for s in sites} == {
        "m": ("MatMul", "shira.m.weight"),
        "g": ("Gemm", "shira.g.weight"),
    }
    assert [i.name for i in dense.graph.input] == ["x", *(weight_name(s.module) for s in sites)]  # sites' order
    assert [i.name for i in dense.graph.initializer] == ["bias"]  # no default: the runtime feeds the base
    np.testing.assert_array_equal(arrays["m"], weights["m"].T)  # the graph's [in, out] layout
    np.testing.assert_array_equal(arrays["g"], weights["g"])  # Gemm transB: [out, in]
    adapter = _random_adapter(4, 7, weights)
    merged = {m: w.copy() for m, w in weights.items()}
    for m, (idx, vals) in adapter.deltas.items():
        np.add.at(merged[m].reshape(-1), idx, vals)
    x = np.random.default_rng(5).standard_normal((2, 3, weights["m"].shape[1])).astype(np.float32)
    feeds = {"x": x, "shira.m.weight": np.ascontiguousarray(merged["m"].T), "shira.g.weight": merged["g"]}
    got = _session(dense).run(None, feeds)[0]
    assert np.abs(got - _numpy(x, weights, bias, adapter)).max() < 1e-4
    assert np.abs(got - _numpy(x, weights, bias, None)).max() > 1e-2  # the fed weight matters
