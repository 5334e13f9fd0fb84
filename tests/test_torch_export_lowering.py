"""The torch route's one-trace export (export/exporters/training_ir.py): it writes the graph
torch.onnx.export's own route writes (names, dynamic axes, the same outputs to the bit at
untraced shapes), its in-place rewrites compute what eager PyTorch computes, it refuses the
mutations it cannot prove safe, and the exporter falls back to torch.onnx.export (and says
so in the model's metadata) wherever it refuses or torch lacks a private name it uses."""

from __future__ import annotations

import collections
import shutil

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from shira_export._quiet import quiet_loggers
from shira_export.export.exporters import torch_export, training_ir
from shira_export.export.exporters.graph_rewrites import fuse_split_transposes
from shira_export.export.exporters.onnx_optimize import optimize_like_torch
from tiny_archs import ARCHS, available, build


def _finish(program) -> bytes:
    """What export_with_torch does to a traced graph before saving it."""
    graph = optimize_like_torch(program.model)
    fuse_split_transposes(graph)
    return ir.serde.serialize_model(graph).SerializeToString()


def _signature(session: ort.InferenceSession) -> list:
    return [(v.name, v.shape, v.type) for v in session.get_inputs() + session.get_outputs()]


def _feeds(session: ort.InferenceSession, batch: int, new: int, past: int) -> dict:
    rng = np.random.default_rng(10 * batch + new + past)
    feeds = {}
    for value in session.get_inputs():
        if value.name == "input_ids":
            feeds[value.name] = rng.integers(0, 128, (batch, new))
        elif value.name == "attention_mask":
            mask = np.ones((batch, past + new), np.int64)
            mask[0, :1] = 0  # a left-padded row
            feeds[value.name] = mask
        elif value.name == "position_ids":
            feeds[value.name] = np.arange(past, past + new)[None].repeat(batch, 0)
        elif value.name == "token_type_ids":
            feeds[value.name] = np.zeros((batch, new), np.int64)
        else:
            shape = (batch, value.shape[1], past, value.shape[3])
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _both_routes(model, task):
    with quiet_loggers(*torch_export._LOGGERS), torch.no_grad():
        wrapper, args, shapes, (inputs, outputs) = torch_export._program_for(model, task, 18)
        fast = torch_export._trace(wrapper, model, task, 18, args, shapes, inputs, outputs)
        route = fast.model.metadata_props[torch_export.ROUTE_KEY]
        wrapper, args, shapes, (inputs, outputs) = torch_export._program_for(model, task, 18)
        public = torch_export._trace_public(wrapper, model, task, 18, args, shapes, inputs, outputs)
        return route, _finish(fast), _finish(public)


# OPT and BERT take the one-trace route on transformers 4.55 and 5; on 4.55 the other
# decoders build their masks with vmap, which only run_decompositions removes
ALWAYS_LOWERED = {"opt", "bert", "roberta_cls"}


@pytest.mark.parametrize(
    "arch", [a if a in ("opt", "bert") else pytest.param(a, marks=pytest.mark.slow) for a in sorted(ARCHS)]
)
def test_one_trace_route_writes_torch_onnx_exports_graph(arch):
    if not available(arch):
        pytest.skip(f"{ARCHS[arch].config} is not in this transformers")
    spec = ARCHS[arch]
    decoder = spec.head == "AutoModelForCausalLM"
    task = "text-generation-with-past" if decoder else ("feature-extraction" if spec.task == "auto" else spec.task)
    route, fast, public = _both_routes(build(arch), task)
    assert route in (torch_export.ROUTE_TRAINING_IR, torch_export.ROUTE_TORCH_ONNX)
    if arch in ALWAYS_LOWERED:
        assert route == torch_export.ROUTE_TRAINING_IR
    a, b = ort.InferenceSession(fast), ort.InferenceSession(public)
    assert _signature(a) == _signature(b)  # names, dynamic axes (by name), dtypes
    shapes = [(1, 1, 0), (1, 5, 7), (3, 1, 9), (3, 6, 0)] if decoder else [(1, 1, 0), (3, 7, 0)]
    for shape in shapes:
        feeds = _feeds(a, *shape)
        for x, y in zip(a.run(None, feeds), b.run(None, feeds)):
            assert x.shape == y.shape and np.array_equal(x, y), (shape, float(np.abs(x - y).max()))
    # the same ops, less at most a reshape to its own shape that run_decompositions keeps (with its shape Concat)
    ops_fast = collections.Counter(n.op_type for n in ir.serde.deserialize_model(_parse(fast)).graph)
    ops_public = collections.Counter(n.op_type for n in ir.serde.deserialize_model(_parse(public)).graph)
    assert set((ops_public - ops_fast).keys()) <= {"Reshape", "Concat"} and not ops_fast - ops_public


def _parse(data: bytes):
    import onnx

    return onnx.load_from_string(data)


class _MaskEdits(torch.nn.Module):
    """The in-place patterns of transformers' masks: an op on a new tensor, a slice of a
    clone overwritten (read before, through the slice, and after, whole), an int + float add."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        causal = torch.triu(torch.ones(n, n), diagonal=1)
        causal.mul_(-2.0)
        full = x[:, None, :].expand(-1, n, -1).clone()
        full[:, :, : n - 1] = full[:, :, : n - 1].masked_fill(mask[:, None, : n - 1] == 0, -1.0)
        return full + causal + mask[:, None, :]


class _ViewReadAfterWrite(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x * 1.5
        before = a[:, :2]  # a view made before the write below, read after it
        a[:, 1:3] = x[:, :2] * 3.0
        return before + a[:, :2]


class _InputWrite(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)
        return x + 1.0


def _export_small(module, args, shapes, names):
    with quiet_loggers(*torch_export._LOGGERS), torch.no_grad():
        return training_ir.export_training_ir(module, args, shapes, names, ["out"], 18)


def test_in_place_rewrites_compute_what_eager_computes():
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=3)
    x = torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 1]])
    shapes = {"x": {0: batch, 1: seq}, "mask": {0: batch, 1: seq}}
    with torch.no_grad():
        graph = torch.export.export(_MaskEdits(), (x, mask), dynamic_shapes=shapes).graph_module
    aten = torch.ops.aten
    mutations = {aten.mul_.Tensor, aten.copy_.default}
    assert mutations <= {n.target for n in graph.graph.nodes}  # the patterns under test are there
    training_ir.lower_in_place(graph, training_ir.translated_ops(18))
    assert not mutations & {n.target for n in graph.graph.nodes}

    program = _export_small(_MaskEdits(), (x, mask), shapes, ["x", "mask"])
    assert program.model.graph.inputs[0].shape[1] != 5  # the sequence stayed dynamic
    session = ort.InferenceSession(ir.serde.serialize_model(program.model).SerializeToString())
    torch.manual_seed(3)
    for b, s in [(1, 3), (3, 7), (2, 5)]:
        xs = torch.randn(b, s)
        ms = (torch.rand(b, s) > 0.4).long()
        got = session.run(None, {"x": xs.numpy(), "mask": ms.numpy()})[0]
        expected = _MaskEdits()(xs, ms).numpy()
        assert got.shape == expected.shape and float(np.abs(got - expected).max()) < 1e-6


@pytest.mark.parametrize("module", [_ViewReadAfterWrite(), _InputWrite()], ids=["view-read-after", "input-write"])
def test_mutations_it_cannot_prove_safe_are_refused_and_the_exporter_falls_back(module, monkeypatch):
    x = torch.randn(2, 6)
    dims = {"x": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", min=4)}}
    with pytest.raises(training_ir.Unsupported) as refused:
        _export_small(module, (x.clone(),), dims, ["x"])
    assert refused.value.program is None  # refused mid-rewrite: the caller traces afresh

    class _Model:  # what _trace reads off a model for its error message
        config = type("C", (), {"model_type": "toy"})()

    with quiet_loggers(*torch_export._LOGGERS), torch.no_grad():
        program = torch_export._trace(module, _Model(), "toy", 18, (x.clone(),), dims, ["x"], ["out"])
    assert program.model.metadata_props[torch_export.ROUTE_KEY] == torch_export.ROUTE_TORCH_ONNX
    session = ort.InferenceSession(ir.serde.serialize_model(program.model).SerializeToString())
    x3 = torch.randn(3, 7)
    expected = module(x3.clone()).numpy()
    inputs = [v.name for v in program.model.graph.inputs]
    assert float(np.abs(session.run(None, {inputs[0]: x3.numpy()})[0] - expected).max()) < 1e-6


def test_a_torch_without_the_private_names_gets_torch_onnx_export(monkeypatch):
    from torch.onnx._internal.exporter import _core

    monkeypatch.delattr(_core, "_exported_program_to_onnx_program")
    model = build("opt")
    task = "text-generation-with-past"
    with quiet_loggers(*torch_export._LOGGERS), torch.no_grad():
        wrapper, args, shapes, (inputs, outputs) = torch_export._program_for(model, task, 18)
        with pytest.raises(training_ir.Unsupported):
            training_ir.export_training_ir(wrapper, args, shapes, inputs, outputs, 18)
    monkeypatch.undo()
    monkeypatch.setattr(
        training_ir,
        "export_training_ir",
        lambda *a, **k: (_ for _ in ()).throw(training_ir.Unsupported("no such name")),
    )
    with quiet_loggers(*torch_export._LOGGERS), torch.no_grad():
        program = torch_export._trace(wrapper, model, task, 18, args, shapes, inputs, outputs)
    assert program.model.metadata_props[torch_export.ROUTE_KEY] == torch_export.ROUTE_TORCH_ONNX
    assert [v.name for v in program.model.graph.inputs][:3] == ["input_ids", "attention_mask", "position_ids"]


def test_the_trace_cache_key_covers_the_lowering_source(tmp_path, monkeypatch):
    model = build("opt")
    wrapper, *_ = torch_export._program_for(model, "text-generation", 18)
    here = torch_export.__file__
    copy = tmp_path / "torch_export.py"
    shutil.copy(here, copy)
    shutil.copy(training_ir.__file__, tmp_path / "training_ir.py")
    monkeypatch.setattr(torch_export, "__file__", str(copy))
    same = torch_export._structure_key(wrapper, model, "text-generation", 18)
    (tmp_path / "training_ir.py").write_text(open(training_ir.__file__).read() + "\n# changed\n")
    changed = torch_export._structure_key(wrapper, model, "text-generation", 18)
    monkeypatch.setattr(torch_export, "__file__", here)
    assert same == torch_export._structure_key(wrapper, model, "text-generation", 18)
    assert changed != same
