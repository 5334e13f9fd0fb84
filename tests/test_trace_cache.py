"""The torch route's trace cache and optimizer: an export from a cached graph is the export a
fresh trace gives (graph and weights), a bad entry is never used (it is removed and the model
traced again), `SHIRA_EXPORT_TRACE_CACHE=off` writes nothing, and the guarded optimizer
gives the graph torch.onnx's own `optimize()` gives."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from transformers import DynamicCache, OPTConfig, OPTForCausalLM

from shira_export.export.exporters import trace_cache
from shira_export.export.exporters.onnx_optimize import optimize_like_torch, plain_optimize
from shira_export.export.exporters.torch_export import export_with_torch

TASK = "text-generation-with-past"
CONFIG = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    ffn_dim=32,
    num_attention_heads=2,
    max_position_embeddings=64,
    word_embed_proj_dim=16,
)


def _model(seed: int) -> OPTForCausalLM:
    torch.manual_seed(seed)
    return OPTForCausalLM(OPTConfig(**CONFIG)).eval()


def _export(model, folder):
    folder.mkdir(parents=True, exist_ok=True)
    return export_with_torch(model, folder, task=TASK)


def _entries(folder) -> list:
    return sorted(folder.glob("*.onnxgraph"))


def _structure(path) -> tuple:
    """An exported model.onnx without its generated names (torch.onnx numbers values and
    nodes with process-wide counters): the op sequence, the graph inputs and outputs, and
    every initializer's dims, dtype and data digest."""
    proto = onnx.load(str(path))
    tensors = sorted(
        (tuple(t.dims), t.data_type, hashlib.sha256(onnx.numpy_helper.to_array(t).tobytes()).hexdigest())
        for t in proto.graph.initializer
    )
    return [n.op_type for n in proto.graph.node], list(proto.graph.input), list(proto.graph.output), tensors


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(trace_cache.ENV, str(folder))
    trace_cache.clear_memory()
    yield folder
    trace_cache.clear_memory()


def _parity(path, model) -> float:
    """Worst |ORT - PyTorch| of the logits at an untraced shape: batch 3, 2 new tokens over a
    past of 5, row 0 left-padded by 3."""
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (3, 2))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -2:]
    past = [torch.randn(3, 2, 5, 8) for _ in range(4)]
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    feeds.update({f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": p.numpy() for i, p in enumerate(past)})
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # transformers 4.5x builds its layers without the config
        cache = DynamicCache()
    for layer in range(2):
        cache.update(past[2 * layer], past[2 * layer + 1], layer)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    return float(np.abs(got - expected.numpy()).max())


def test_cached_graph_gives_the_fresh_export_and_bad_entries_are_rebuilt(cache, tmp_path, monkeypatch):
    first, second = _model(0), _model(1)
    _export(first, tmp_path / "a")  # traces, keeps the graph
    (entry,) = _entries(cache)
    trace_cache.clear_memory()  # the next export reads the disk entry, as a new process would
    traced = {"n": 0}
    from shira_export.export.exporters import torch_export

    real_trace = torch_export._trace

    def counting_trace(*args, **kwargs):
        traced["n"] += 1
        return real_trace(*args, **kwargs)

    monkeypatch.setattr(torch_export, "_trace", counting_trace)
    cached = _export(second, tmp_path / "b")
    assert traced["n"] == 0  # from the cache
    assert _parity(cached, second) < 1e-4
    assert _parity(tmp_path / "a" / "model.onnx", first) < 1e-4
    proto = onnx.load(str(cached))
    assert [i.name for i in proto.graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims["past_key_values.1.value"] == ["batch", 2, "past_sequence_length", 8]
    assert dims["attention_mask"] == ["batch", "total_sequence_length"]

    # the same model traced afresh (cache off) writes the same file, weights included
    monkeypatch.setenv(trace_cache.ENV, "off")
    trace_cache.clear_memory()
    fresh = _export(second, tmp_path / "c")
    assert traced["n"] == 1
    assert _structure(fresh) == _structure(cached)
    assert _parity(fresh, second) == _parity(cached, second)  # the same numbers, to the bit
    assert _entries(cache) == [entry]  # off: nothing written

    monkeypatch.setenv(trace_cache.ENV, str(cache))
    good = entry.read_bytes()
    key = entry.stem

    # a flipped byte in the graph (its last bytes: tensor and graph data, not the header): the digest fails, the entry is removed and rebuilt
    damaged = bytearray(good)
    damaged[-10] ^= 0xFF
    entry.write_bytes(bytes(damaged))
    trace_cache.clear_memory()
    assert trace_cache.lookup(key) is None and not entry.exists()
    _export(second, tmp_path / "d")
    assert traced["n"] == 2 and trace_cache.lookup(key) is not None

    # a well-formed entry whose weight slot does not fit the model is not used
    model = trace_cache.lookup(key)
    assert model is not None
    slot = next(v for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor))
    t = slot.const_value
    slot.const_value = ir.ExternalTensor(t.location, 0, t.nbytes, t.dtype, shape=ir.Shape([3, 3]), name=t.name)
    trace_cache.store(key, ir.serde.serialize_model(model).SerializeToString())
    trace_cache.clear_memory()
    _export(second, tmp_path / "e")
    assert traced["n"] == 3 and trace_cache.lookup(key) is not None

    # an entry that points a tensor at a real file is refused without reading it
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 4096)
    model = trace_cache.lookup(key)
    assert model is not None
    slot = next(v for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor))
    t = slot.const_value
    slot.const_value = ir.ExternalTensor(str(secret), 0, t.nbytes, t.dtype, shape=t.shape, name=t.name)
    assert not trace_cache.fill_weights(
        model, second.state_dict() | {f"model.{k}": v for k, v in second.state_dict().items()}
    )
    # and a truncated file, or one filed under another key, is ignored too
    entry.write_bytes(good[:100])
    trace_cache.clear_memory()
    assert trace_cache.lookup(key) is None and not entry.exists()
    other = cache / ("0" * 64 + ".onnxgraph")
    other.write_bytes(good)
    assert trace_cache.lookup("0" * 64) is None and not other.exists()


def test_guarded_optimizer_gives_torch_onnx_optimize_result(cache, tmp_path, monkeypatch):
    from shira_export.export.exporters import torch_export

    model = _model(2)
    wrapper, args, shapes, names = torch_export._program_for(model, TASK, 18)
    with torch.no_grad():
        program = torch_export._trace(wrapper, model, TASK, 18, args, shapes, *names)
    proto = ir.serde.serialize_model(program.model)
    results = []
    for optimize in (optimize_like_torch, plain_optimize):
        graph = ir.serde.deserialize_model(proto)
        graph = optimize(graph)
        results.append(ir.serde.serialize_model(graph).SerializeToString(deterministic=True))
    assert hashlib.sha256(results[0]).hexdigest() == hashlib.sha256(results[1]).hexdigest()
    assert len(onnx.load_from_string(results[0]).graph.node) < len(proto.graph.node)  # it did optimize
