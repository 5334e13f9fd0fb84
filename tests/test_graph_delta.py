"""The [R, nnz] sparse-delta graph (issue #18): R = 1 applies one adapter to the batch,
R = B gives each batch row its own adapter (a mixed batch). Checked on a synthetic graph
against numpy (MatMul on [B, S, in] and a Gemm on flattened [B*S, in] rows, short and
long inputs), and on tiny OPT exports in fp32, int8 and int4: a mixed batch with left
padding and a KV cache (past length > 0) equals each row run alone, within 1e-5."""

from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparse_models import make_adapters, make_base  # noqa: E402

from shira_export.errors import ShiraInputError  # noqa: E402
from shira_export.export.adapter_file import (  # noqa: E402
    AdapterArrays,
    batch_parameters,
    read_adapter_file,
    short_fingerprint,
)
from shira_export.export.graph_delta import (  # noqa: E402
    TargetSite,
    ell_indices_name,
    ell_values_name,
    indices_name,
    insert_sparse_deltas,
    locate_targets,
    values_name,
)
from shira_export.export.site_layout import SiteArrays, split  # noqa: E402
from shira_export.runtime.dense_variant import to_dense_variant  # noqa: E402
from shira_export.export.manifest import read_sparse_manifest  # noqa: E402

IN, HID, OUT = 6, 8, 5


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _synthetic() -> tuple[onnx.ModelProto, dict[str, np.ndarray], np.ndarray]:
    """x [B, S, IN] -> MatMul (module m) -> flatten to [B*S, HID] -> Gemm transB=1 + bias (module g) -> [B, S, OUT]."""
    rng = np.random.default_rng(0)
    wm = rng.standard_normal((HID, IN)).astype(np.float32)
    wg = rng.standard_normal((OUT, HID)).astype(np.float32)
    bias = rng.standard_normal(OUT).astype(np.float32)
    c = lambda name, v: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(v), name))  # noqa: E731
    nodes = [
        helper.make_node("MatMul", ["x", "wmT"], ["h"], name="mm"),
        c("flat", np.array([-1, HID], np.int64)),
        helper.make_node("Reshape", ["h", "flat"], ["h2"]),
        helper.make_node("Gemm", ["h2", "wg", "bias"], ["z2"], name="gemm", transB=1),
        helper.make_node("Shape", ["x"], ["lead"], end=-1),
        c("o", np.array([OUT], np.int64)),
        helper.make_node("Concat", ["lead", "o"], ["zs"], axis=0),
        helper.make_node("Reshape", ["z2", "zs"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", IN])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(wm.T.copy(), "wmT"),
            numpy_helper.from_array(wg, "wg"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model, {"m": wm, "g": wg}, bias


def _random_adapter(seed: int, nnz: int, weights: dict[str, np.ndarray]) -> AdapterArrays:
    rng = np.random.default_rng(seed)
    return AdapterArrays.from_flat(
        {
            m: (
                np.sort(rng.choice(w.size, nnz, replace=False)).astype(np.int32),
                rng.standard_normal(nnz).astype(np.float32),
            )
            for m, w in weights.items()
        },
        {m: w.shape for m, w in weights.items()},
    )


def _numpy(x: np.ndarray, weights, bias, adapter) -> np.ndarray:
    w = {m: a.astype(np.float64).copy() for m, a in weights.items()}
    if adapter is not None:
        for m, (idx, vals) in adapter.deltas.items():
            np.add.at(w[m].reshape(-1), idx, vals)
    return (x @ w["m"].T) @ w["g"].T + bias


@pytest.mark.parametrize("tokens", [1, 2, 3, 9])  # threshold 2: 1-2 rows per adapter row take the activation branch
def test_synthetic_graph_r1_and_mixed_rows_match_numpy(tokens):
    model, weights, bias = _synthetic()
    sites, unused = locate_targets(model, weights)
    assert unused == [] and {s.module: s.transposed for s in sites} == {"m": False, "g": True}
    insert_sparse_deltas(model, sites)
    names = {n.name for n in model.graph.node}
    assert "shira/m/x3" not in names and "shira/m/lead" in names  # [B, S, in]: read as it is
    assert "shira/g/x3" in names  # the flattened Gemm input: viewed as [R, n, in]
    inputs = {i.name: i for i in model.graph.input}
    assert [d.dim_value for d in inputs[indices_name("m")].type.tensor_type.shape.dim] == [0, 1, 0]  # symbolic
    assert {tuple(i.dims) for i in model.graph.initializer if i.name.startswith("shira.")} == {
        (1, 1, 0),
        (1, 1, HID),  # K = 1 of padding slots
        (1, 1, OUT),
    }
    session = _session(model)
    rows = [_random_adapter(1, 9, weights), _random_adapter(2, 4, weights), None]
    x = np.random.default_rng(3).standard_normal((3, tokens, IN)).astype(np.float32)
    assert np.abs(session.run(None, {"x": x})[0] - _numpy(x, weights, bias, None)).max() < 1e-4
    for adapter in rows[:2]:  # R = 1: one adapter for the whole batch, as a file feeds it
        got = session.run(None, {"x": x, **adapter.parameters()})[0]
        assert np.abs(got - _numpy(x, weights, bias, adapter)).max() < 1e-4
    mixed = session.run(None, {"x": x, **batch_parameters(rows, ["m", "g"])})[0]
    for b, adapter in enumerate(rows):
        alone = session.run(None, {"x": x[b : b + 1], **(adapter.parameters() if adapter else {})})[0]
        assert np.abs(mixed[b] - alone[0]).max() <= 1e-5, (tokens, b)
        assert np.abs(mixed[b] - _numpy(x[b : b + 1], weights, bias, adapter)[0]).max() < 1e-4
    dense, _ = to_dense_variant(model, sites)
    assert not any(n.op_type == "If" for n in dense.graph.node)
    assert np.abs(_session(dense).run(None, {"x": x})[0] - _numpy(x, weights, bias, None)).max() < 1e-4


def test_wrong_row_count_is_an_error_not_a_result():
    model, weights, _ = _synthetic()
    sites, _ = locate_targets(model, weights)
    insert_sparse_deltas(model, sites)
    feeds = batch_parameters([_random_adapter(1, 5, weights)] * 2, ["m", "g"])  # R = 2 on a batch of 3
    errors = (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument)
    with pytest.raises(errors, match="(?i)expand|broadcast|reshape"):
        _session(model).run(None, {"x": np.zeros((3, 1, IN), np.float32), **feeds})


def test_batch_parameters_pads_both_parts_with_noop_entries():
    def part(k_rows, flat, vals, out_f=3):  # ELL slots given as rows of [K, out]
        ell_i = np.array(k_rows, np.int32).reshape(-1, out_f)
        return SiteArrays(ell_i, (ell_i + 1).astype(np.float32), np.array(flat, np.int32), np.array(vals, np.float32))

    a = AdapterArrays({"m": part([[1, 2, 0]], [3, 7], [1.0, 2.0])}, {"m": 4})
    b = AdapterArrays({"m": part([[0, 1, 1], [2, 0, 3]], [5], [4.0]), "g": part([], [1], [0.5])}, {"m": 4, "g": 4})
    p = batch_parameters([a, None, b], ["m", "g", "other"])
    assert p[indices_name("m")].tolist() == [[[3, 7]], [[0, 0]], [[5, 0]]]  # [R, 1, nnz]
    assert p[values_name("m")].tolist() == [[[1.0, 2.0]], [[0.0, 0.0]], [[4.0, 0.0]]]
    assert p[ell_indices_name("m")].tolist() == [  # [R, 1, K * out], slot k of feature j at k * out + j
        [[1, 2, 0, 0, 0, 0]],
        [[0, 0, 0, 0, 0, 0]],
        [[0, 1, 1, 2, 0, 3]],
    ]
    assert p[ell_values_name("m")][0].tolist() == [[2.0, 3.0, 1.0, 0.0, 0.0, 0.0]]
    assert p[indices_name("g")].tolist() == [[[0]], [[0]], [[1]]]
    assert p[values_name("g")].tolist() == [[[0.0]], [[0.0]], [[0.5]]]
    assert p[ell_indices_name("g")].tolist() == [[[0, 0, 0]]] * 3  # K >= 1: one slot of padding
    assert indices_name("other") not in p  # no row touches it: the graph's empty defaults


def test_schema_1_adapter_is_refused_with_re_export(tmp_path):
    site = TargetSite("m", "mm", "w", 4, 4, False, "0" * 40)
    fingerprint = "a" * 64
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(short_fingerprint(fingerprint))
    keep = {indices_name("m"): np.array([1, 2], np.int32), values_name("m"): np.array([0.5, 1.5], np.float32)}
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in keep.items()})
    path = tmp_path / "old.onnx_adapter"
    fmt.export_adapter(str(path))
    with pytest.raises(ShiraInputError) as err:
        read_adapter_file(path, [site], fingerprint=fingerprint)
    text = str(err.value)
    assert (
        "old.onnx_adapter" in text
        and "schema 1" in text
        and "expected one of [2, 3, 4]" in text
        and "re-export" in text
    )


def test_schema_2_adapter_reads_as_the_scattered_part(tmp_path):
    site = TargetSite("m", "mm", "w", 4, 4, False, "0" * 40)
    fingerprint = "b" * 64
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(2)
    fmt.set_model_version(short_fingerprint(fingerprint))
    keep = {indices_name("m"): np.array([[1, 6]], np.int32), values_name("m"): np.array([[0.5, 1.5]], np.float32)}
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in keep.items()})
    fmt.export_adapter(str(tmp_path / "v2.onnx_adapter"))
    arrays = read_adapter_file(tmp_path / "v2.onnx_adapter", [site], fingerprint=fingerprint)
    assert arrays.parts["m"].ell_indices.shape == (0, 4)
    idx, vals = arrays.deltas["m"]
    assert idx.tolist() == [1, 6] and vals.tolist() == [0.5, 1.5]


def _adapter_file(path, version: int, fingerprint: str, params: dict) -> None:
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(version)
    fmt.set_model_version(short_fingerprint(fingerprint))
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    fmt.export_adapter(str(path))


def test_schema_3_adapter_reads_and_feeds_schema_4_shapes(tmp_path):
    """A release-before file ([1, nnz], [1, K, out]) loads; what it feeds is schema 4's."""
    site = TargetSite("m", "mm", "w", 3, 4, False, "0" * 40)  # out 3, in 4
    fingerprint = "c" * 64
    ell_i = np.array([[[1, 2, 0], [3, 0, 1]]], np.int32)  # [1, K=2, out=3]
    ell_v = np.array([[[0.5, 1.0, 0.0], [2.0, 0.0, 3.0]]], np.float32)
    old = {
        indices_name("m"): np.array([[5, 9]], np.int32),
        values_name("m"): np.array([[4.0, 5.0]], np.float32),
        ell_indices_name("m"): ell_i,
        ell_values_name("m"): ell_v,
    }
    _adapter_file(tmp_path / "v3.onnx_adapter", 3, fingerprint, old)
    arrays = read_adapter_file(tmp_path / "v3.onnx_adapter", [site], fingerprint=fingerprint)
    fed = arrays.parameters()
    assert fed[indices_name("m")].tolist() == [[[5, 9]]] and fed[values_name("m")].shape == (1, 1, 2)
    assert fed[ell_indices_name("m")].tolist() == [[[1, 2, 0, 3, 0, 1]]]  # slot k of feature j at k * out + j
    assert fed[ell_values_name("m")].tolist() == [[[0.5, 1.0, 0.0, 2.0, 0.0, 3.0]]]
    _adapter_file(tmp_path / "v4.onnx_adapter", 4, fingerprint, fed)  # and back: the same adapter
    again = read_adapter_file(tmp_path / "v4.onnx_adapter", [site], fingerprint=fingerprint)
    for (i1, v1), (i2, v2) in zip(arrays.deltas.values(), again.deltas.values()):
        assert i1.tolist() == i2.tolist() and v1.tolist() == v2.tolist()


@pytest.mark.parametrize(
    "ell_shape", [(1, 1, 0), (1, 1, 5), (1, 2, 3), (3, 3)]
)  # K = 0, not a multiple of out, a second axis, rank 2
def test_schema_4_ell_part_of_a_wrong_shape_is_refused(tmp_path, ell_shape):
    site = TargetSite("m", "mm", "w", 3, 4, False, "0" * 40)
    fingerprint = "d" * 64
    bad = {
        ell_indices_name("m"): np.zeros(ell_shape, np.int32),
        ell_values_name("m"): np.zeros(ell_shape, np.float32),
    }
    _adapter_file(tmp_path / "bad.onnx_adapter", 4, fingerprint, bad)
    with pytest.raises(ShiraInputError) as err:
        read_adapter_file(tmp_path / "bad.onnx_adapter", [site], fingerprint=fingerprint)
    text = str(err.value)
    assert "bad.onnx_adapter" in text and "[1, 1, K * 3] with K >= 1" in text and str(list(ell_shape)) in text


# ---- tiny OPT exports: a mixed batch with padding and a KV cache equals each row alone ----


@pytest.fixture(scope="module")
def opt_folders(tmp_path_factory):
    from shira_export.export.quantize import quantize_onnx_model
    from shira_export.pipeline import export_sparse

    root = tmp_path_factory.mktemp("graph_opt")
    base = make_base("opt", root)
    export_sparse(base, make_adapters("opt", base, root), root / "fp32", verify=False)
    folders = {"fp32": root / "fp32"}
    for mode in ("int8", "int4"):
        quantize_onnx_model(root / "fp32", root / mode, mode=mode, block_size=32)
        folders[mode] = root / mode
    return folders


def _decoder_feeds(session, ids, mask, past=None):
    feeds = {"input_ids": ids, "attention_mask": mask}
    names = {i.name: i for i in session.get_inputs()}
    if "position_ids" in names:
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        feeds["position_ids"] = pos[:, -ids.shape[1] :]
    for name, info in names.items():
        if name.startswith("past_key_values."):
            if past is not None:
                feeds[name] = past[name.replace("past_key_values.", "present.")]
            else:
                heads, dim = info.shape[1], info.shape[3]
                feeds[name] = np.zeros((ids.shape[0], heads, 0, dim), np.float32)
    return feeds


def _two_steps(session, ids, mask, adapter_feeds):
    """Prefill, then one decode step over its cache: (prefill logits, decode logits)."""
    outs = [o.name for o in session.get_outputs()]
    first = dict(zip(outs, session.run(None, {**_decoder_feeds(session, ids, mask), **adapter_feeds})))
    step_mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
    step = np.array([[11]] * ids.shape[0], np.int64)
    second = dict(zip(outs, session.run(None, {**_decoder_feeds(session, step, step_mask, first), **adapter_feeds})))
    return first["logits"], second["logits"]


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_opt_mixed_batch_with_padding_and_cache_equals_rows_alone(opt_folders, precision):
    folder = opt_folders[precision]
    manifest = read_sparse_manifest(folder)
    session = _session(onnx.load(str(folder / "model.onnx")))
    adapters = {
        name: read_adapter_file(folder / e["file"], manifest.targets, fingerprint=manifest.base_fingerprint)
        for name, e in manifest.adapters.items()
    }
    rows = [adapters["a"], adapters["b"], None, adapters["b"]]
    ids = np.random.default_rng(5).integers(3, 100, (4, 6)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding on a row with an adapter
    mask[2, :1] = 0
    modules = [s.module for s in manifest.targets]
    mixed = _two_steps(session, ids, mask, batch_parameters(rows, modules))
    real = mask.astype(bool)
    differs = 0.0
    for b, adapter in enumerate(rows):
        alone = _two_steps(session, ids[b : b + 1], mask[b : b + 1], adapter.parameters() if adapter else {})
        assert np.abs(mixed[0][b][real[b]] - alone[0][0][real[b]]).max() <= 1e-5, (precision, b, "prefill")
        assert np.abs(mixed[1][b] - alone[1][0]).max() <= 1e-5, (precision, b, "decode")
        base = _two_steps(session, ids[b : b + 1], mask[b : b + 1], {})
        differs = max(differs, float(np.abs(alone[1][0] - base[1][0]).max()))
    assert differs > 1e-3  # the adapters change the logits: the comparison above can fail


def _laid_out(adapter: AdapterArrays, weights, k: int | None) -> AdapterArrays:
    """The same adapter with K forced (None: the layout's own choice)."""
    parts = {
        m: split(idx, vals, weights[m].shape[1], weights[m].shape[0], k=k) for m, (idx, vals) in adapter.deltas.items()
    }
    return AdapterArrays(parts, {m: weights[m].shape[1] for m in parts})


@pytest.mark.parametrize("tokens", [1, 9])  # the activation branch and the weight branch
def test_both_parts_any_k_match_numpy_alone_and_mixed(tokens):
    model, weights, bias = _synthetic()
    sites, _ = locate_targets(model, weights)
    insert_sparse_deltas(model, sites)
    session = _session(model)
    x = np.random.default_rng(4).standard_normal((4, tokens, IN)).astype(np.float32)
    dense = _random_adapter(5, 20, weights)  # 20 of 48 / 40 positions: rows of 2-4 entries
    full_k = max(int(np.bincount(idx // weights[m].shape[1]).max()) for m, (idx, _) in dense.deltas.items())
    layouts = [_laid_out(dense, weights, k) for k in (0, 1, full_k, None)]
    assert [sum(p.ell_indices.shape[0] > 0 for p in a.parts.values()) for a in layouts[:3]] == [0, 2, 2]
    assert all(a.parts[m].indices.size == 0 for a in layouts[2:3] for m in a.parts)  # K = max: all ELL
    want = _numpy(x, weights, bias, dense)
    for adapter in layouts:
        got = session.run(None, {"x": x, **adapter.parameters()})[0]
        assert np.abs(got - want).max() < 1e-4
    rows = [layouts[0], None, layouts[2], layouts[1]]  # rows with different K (0, -, max, 1) in one batch
    mixed = session.run(None, {"x": x, **batch_parameters(rows, ["m", "g"])})[0]
    for b, adapter in enumerate(rows):
        alone = session.run(None, {"x": x[b : b + 1], **(adapter.parameters() if adapter else {})})[0]
        assert np.abs(mixed[b] - alone[0]).max() <= 1e-5, (tokens, b)
    # one part fed with R = B, the other left at its R = 1 empty default
    ell_only = {k: v for k, v in batch_parameters(rows[2:3] * 4, ["m", "g"]).items() if ".ell_" in k}
    got = session.run(None, {"x": x, **ell_only})[0]
    assert np.abs(got - want).max() < 1e-4


def _with_limit(model: onnx.ModelProto, limit: int) -> onnx.ModelProto:
    """A copy whose sites all take the decode branch below `limit` rows (the `<site>/limit` constants)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    limits = [n for n in out.graph.node if n.op_type == "Constant" and n.name.endswith("/limit")]
    assert len(limits) == len(_site_ifs(out))  # one per site: the copy really differs
    for node in limits:
        node.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array(limit, np.int64), node.name))
    return out


def _site_ifs(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "If" and n.name.endswith("/If")]


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_long_inputs_prefill_branch_equals_decode_branch(opt_folders, precision):
    """The weight branch (int4: MatMulNBits dequantized by GatherBlockQuantized) and the decode
    branch, each forced through every site's limit, give the same logits on 40 tokens."""
    folder = opt_folders[precision]
    manifest = read_sparse_manifest(folder)
    model = onnx.load(str(folder / "model.onnx"))
    if precision == "int4":

        def ops(nodes) -> set:  # every op type, If branches included
            found = set()
            for n in nodes:
                found.add(n.op_type)
                for a in n.attribute:
                    if a.type == onnx.AttributeProto.GRAPH:
                        found |= ops(a.g.node)
            return found

        assert "GatherBlockQuantized" in ops(model.graph.node)  # the packed sites dequantize in their prefill branch
    prefill, decode = _session(_with_limit(model, 0)), _session(_with_limit(model, 10**15))  # every site forced
    adapters = [
        read_adapter_file(folder / e["file"], manifest.targets, fingerprint=manifest.base_fingerprint)
        for e in manifest.adapters.values()
    ]
    ids = np.random.default_rng(6).integers(3, 100, (2, 40)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    modules = [s.module for s in manifest.targets]
    for feeds in (adapters[0].parameters(), batch_parameters([adapters[0], adapters[1]], modules)):
        got = prefill.run(["logits"], {**_decoder_feeds(prefill, ids, mask), **feeds})[0]
        want = decode.run(["logits"], {**_decoder_feeds(decode, ids, mask), **feeds})[0]
        base = decode.run(["logits"], _decoder_feeds(decode, ids, mask))[0]
        real = mask.astype(bool)
        diff = np.abs(got[real] - want[real]).max(axis=-1)  # per position
        scale = max(1.0, float(np.abs(want).max()))
        if precision == "int4":  # its 8-bit sites quantize activations per block: a 1e-7 change of an input
            # (the two branches sum the delta in another order) can flip one rounding at a position
            assert diff.max() <= 5e-3 * scale and (diff > 1e-4 * scale).mean() <= 0.05
        else:
            assert diff.max() <= 1e-4 * scale
        assert np.abs(want[real] - base[real]).max() > 1e-3  # the adapter changes the logits
