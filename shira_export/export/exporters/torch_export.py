"""ONNX export with `torch.onnx.export(..., dynamo=True)`: no optimum-onnx, any transformers.

The graph contract is optimum's, so every reader of an export folder (the runtime, verify,
genai, users' own code) sees the same names whichever exporter ran:

    causal LM with past: input_ids, attention_mask, position_ids, past_key_values.N.key/value
                         -> logits, present.N.key/value   (attention_mask spans past + new)
    causal LM:           input_ids, attention_mask, position_ids -> logits
    feature extraction:  input_ids, attention_mask[, token_type_ids] -> last_hidden_state
    text classification: input_ids, attention_mask[, token_type_ids] -> logits

The KV cache crosses the graph boundary as flat tensors; inside, a transformers
`DynamicCache` is rebuilt from them (its lazy initialisation makes a 1-D empty tensor,
which torch.export refuses, so the layers are filled directly). torch.export specialises a
dynamic axis whose sample size is 0 or 1, so the sample has batch 2, 3 new tokens and a past
of 4 (all different, so no two axes are unified); parity is checked at other shapes.

Tracing goes through `training_ir` (one torch.export trace, lowered in place, instead of the
trace and re-trace of `torch.onnx.export`), else `torch.onnx.export` itself. Both write the
same names, axes and outputs (to the bit; the one-trace graph at most drops reshapes to a
tensor's own shape); the model's metadata (`shira_export.trace_route`) says which ran.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import onnx_ir as ir
import torch

from shira_export.artifacts.tasks import spec_for
from shira_export.errors import ShiraInputError
from shira_export._quiet import quiet_loggers

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["export_with_torch", "graph_input_names"]

logger = logging.getLogger(__name__)

_SAMPLE_BATCH, _SAMPLE_NEW, _SAMPLE_PAST = 2, 3, 4
_ENCODER_SAMPLE_LEN = 8
_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch._export", "onnxscript", "transformers")


def _past_names(n_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]


def _present_names(n_layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]


def _accepts(model: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


class _CausalLMWithPast(torch.nn.Module):
    """Flat past tensors in, logits and flat present tensors out."""

    def __init__(self, model: "PreTrainedModel", n_layers: int, positions: bool) -> None:
        super().__init__()
        self.model, self.n_layers, self.positions = model, n_layers, positions

    def forward(self, input_ids, attention_mask, position_ids, past: Sequence[torch.Tensor]):
        from transformers.cache_utils import DynamicCache, DynamicLayer

        cache = DynamicCache()
        layers: list[Any] = []
        for i in range(self.n_layers):
            layer: Any = DynamicLayer()
            layer.keys, layer.values = past[2 * i], past[2 * i + 1]
            layer.dtype, layer.device = past[2 * i].dtype, past[2 * i].device
            layer.is_initialized = True
            layers.append(layer)
        cache.layers = layers
        kwargs: dict[str, Any] = {"position_ids": position_ids} if self.positions else {}
        kwargs[_cache_argument(self.model)] = cache
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, return_dict=True, **kwargs)
        present = []
        for layer in _returned_cache(out).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


class _CausalLM(torch.nn.Module):
    def __init__(self, model: "PreTrainedModel", positions: bool) -> None:
        super().__init__()
        self.model, self.positions = model, positions

    def forward(self, input_ids, attention_mask, position_ids):
        kwargs: dict[str, Any] = {"position_ids": position_ids} if self.positions else {}
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True, **kwargs
        ).logits


class _Encoder(torch.nn.Module):
    def __init__(self, model: "PreTrainedModel", output: str, token_types: bool) -> None:
        super().__init__()
        self.model, self.output, self.token_types = model, output, token_types

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"token_type_ids": token_type_ids} if self.token_types else {}
        return getattr(
            self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs), self.output
        )


def _cache_argument(model: torch.nn.Module) -> str:
    # transformers 5.2x renamed `past_key_values` to `cache` (the old name still works, with a notice)
    return "cache" if _accepts(model, "cache") else "past_key_values"


def _returned_cache(out: Any) -> Any:
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _cache_layout(model: "PreTrainedModel") -> list[tuple[int, int]]:
    """(kv heads, head dim) per layer, read off one real forward (configs spell them many ways)."""
    from transformers.cache_utils import DynamicCache

    ids = torch.zeros((1, 2), dtype=torch.long)
    # an empty cache passed in (some 4.x models return legacy tuples unless given one), laid
    # out from the config where the cache takes one (hybrid models need their layer types)
    try:
        empty = DynamicCache(config=model.config)
    except TypeError:
        empty = DynamicCache()
    try:
        with torch.no_grad():
            out = model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                use_cache=True,
                return_dict=True,
                **{_cache_argument(model): empty},
            )
    except Exception as exc:  # the model's own code: any class; each means "not this cache contract"
        raise ShiraInputError(
            f"model_type {model.config.model_type!r}: a forward with a KV cache failed "
            f"({type(exc).__name__}: {str(exc)[:200]}); export with task 'text-generation'"
        ) from None
    cache = _returned_cache(out)
    if cache is None or not hasattr(cache, "layers"):
        raise ShiraInputError(
            f"model_type {model.config.model_type!r}: the model returns no DynamicCache "
            f"(found {type(cache).__name__}); export with task 'text-generation'"
        )
    layout = []
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or keys.dim() != 4:
            raise ShiraInputError(
                f"model_type {model.config.model_type!r}: cache layer {type(layer).__name__} "
                f"holds no [batch, heads, past, head_dim] keys; export with task 'text-generation'"
            )
        layout.append((int(keys.shape[1]), int(keys.shape[3])))
    return layout


def _positions(model: "PreTrainedModel") -> bool:
    # the contract has position_ids for every decoder (left padding needs them)
    if not _accepts(model, "position_ids"):
        raise ShiraInputError(
            f"model_type {model.config.model_type!r}: its forward takes no position_ids, which the "
            f"decoder graph contract needs; try --exporter optimum on transformers 4.x"
        )
    return True


def _token_types(model: "PreTrainedModel") -> bool:
    return _accepts(model, "token_type_ids") and int(getattr(model.config, "type_vocab_size", 0) or 0) > 1


def graph_input_names(model: "PreTrainedModel", task: str) -> list[str]:
    """The graph inputs the torch route writes for `model` and `task` (before the cache): the
    task table's, token_type_ids only where the model uses them."""
    return [n for n in spec_for(task).graph_inputs if n != "token_type_ids" or _token_types(model)]


def _sample_ids(model: "PreTrainedModel", shape: tuple[int, int]) -> torch.Tensor:
    vocab = int(getattr(model.config, "vocab_size", 0) or 2)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, max(vocab, 2), shape, generator=generator)


def _program_for(model: "PreTrainedModel", task: str, opset: int) -> tuple[torch.nn.Module, tuple, dict, tuple]:
    dim = torch.export.Dim
    batch, seq = dim("batch"), dim("sequence_length")
    dtype = next(model.parameters()).dtype
    if task == "text-generation-with-past":
        layout = _cache_layout(model)
        wrapper: torch.nn.Module = _CausalLMWithPast(model, len(layout), _positions(model))
        past_len, total = dim("past_sequence_length"), dim("total_sequence_length")
        ids = _sample_ids(model, (_SAMPLE_BATCH, _SAMPLE_NEW))
        mask = torch.ones((_SAMPLE_BATCH, _SAMPLE_PAST + _SAMPLE_NEW), dtype=torch.long)
        pos = torch.arange(_SAMPLE_PAST, _SAMPLE_PAST + _SAMPLE_NEW).expand(_SAMPLE_BATCH, -1).contiguous()
        past = [
            torch.zeros((_SAMPLE_BATCH, heads, _SAMPLE_PAST, head_dim), dtype=dtype)
            for heads, head_dim in layout
            for _ in range(2)
        ]
        shapes = {
            "input_ids": {0: batch, 1: seq},
            "attention_mask": {0: batch, 1: total},
            "position_ids": {0: batch, 1: seq},
            "past": [{0: batch, 2: past_len} for _ in past],
        }
        names = (
            ["input_ids", "attention_mask", "position_ids"] + _past_names(len(layout)),
            ["logits"] + _present_names(len(layout)),
        )
        return wrapper, (ids, mask, pos, past), shapes, names
    if task == "text-generation":
        wrapper = _CausalLM(model, _positions(model))
        ids = _sample_ids(model, (_SAMPLE_BATCH, _ENCODER_SAMPLE_LEN))
        mask = torch.ones_like(ids)
        pos = torch.arange(_ENCODER_SAMPLE_LEN).expand(_SAMPLE_BATCH, -1).contiguous()
        shapes = {
            "input_ids": {0: batch, 1: seq},
            "attention_mask": {0: batch, 1: seq},
            "position_ids": {0: batch, 1: seq},
        }
        return wrapper, (ids, mask, pos), shapes, (["input_ids", "attention_mask", "position_ids"], ["logits"])
    output = next(iter(spec_for(task).outputs))  # the task table's: last_hidden_state or logits
    token_types = _token_types(model)
    wrapper = _Encoder(model, output, token_types)
    ids = _sample_ids(model, (_SAMPLE_BATCH, _ENCODER_SAMPLE_LEN))
    args: tuple = (ids, torch.ones_like(ids)) + ((torch.zeros_like(ids),) if token_types else ())
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    if token_types:
        shapes["token_type_ids"] = {0: batch, 1: seq}
    return wrapper, args, shapes, (graph_input_names(model, task), [output])


def _structure_key(wrapper: torch.nn.Module, model: "PreTrainedModel", task: str, opset: int) -> str:
    """The trace cache's key: everything the traced graph depends on (see trace_cache)."""
    import hashlib
    import json

    import onnx
    import onnx_ir
    import onnxscript
    import transformers

    from shira_export.export.exporters.trace_cache import cache_key

    def source_hash(path: Optional[str]) -> str:
        try:
            return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""
        except OSError:
            return ""

    state = [[name, list(t.shape), str(t.dtype)] for name, t in wrapper.state_dict().items()]
    config = model.config.to_dict()
    for where in ("_name_or_path", "_commit_hash"):  # where it came from, not what it is
        config.pop(where, None)
    return cache_key(
        {
            "versions": [
                torch.__version__,
                transformers.__version__,
                onnxscript.__version__,
                onnx_ir.__version__,
                onnx.__version__,
            ],
            "exporter": [source_hash(__file__), source_hash(str(Path(__file__).with_name("training_ir.py")))],
            "class": [
                type(model).__module__,
                type(model).__qualname__,
                source_hash(inspect.getsourcefile(type(model))),
            ],
            "config": json.dumps(config, sort_keys=True, default=str),
            "attention": str(getattr(model.config, "_attn_implementation", None)),
            "task": task,
            "opset": opset,
            "state": state,
        }
    )


ROUTE_KEY = "shira_export.trace_route"  # model metadata: which of the two routes below traced the graph
ROUTE_TRAINING_IR = "torch.export training IR, lowered in place (export/exporters/training_ir.py)"
ROUTE_TORCH_ONNX = "torch.onnx.export (dynamo, run_decompositions)"


def _trace(wrapper, model, task: str, opset: int, args, shapes, inputs, outputs):
    """torch.onnx.export (dynamo) of the wrapper, unoptimized: the ONNXProgram. First by one
    trace with the training IR lowered in place (training_ir: the same graph, without the
    second trace of run_decompositions), else, where that route does not apply to this model
    or this torch, by torch.onnx.export itself. The model's metadata says which ran."""
    from shira_export.export.exporters import training_ir

    try:
        program = training_ir.export_training_ir(wrapper, args, shapes, inputs, outputs, opset)
        route = ROUTE_TRAINING_IR
    except training_ir.Unsupported as why:
        logger.debug("torch route: %s; torch.onnx.export runs", why)
        # torch.export's program where it was left untouched (torch.onnx.export takes one), else the wrapper again
        traced = why.program if why.program is not None else wrapper
        program = _trace_public(traced, model, task, opset, args, shapes, inputs, outputs)
        route = ROUTE_TORCH_ONNX
    program.model.metadata_props[ROUTE_KEY] = route
    return program


def _trace_public(traced, model, task: str, opset: int, args, shapes, inputs, outputs):
    """torch.onnx.export of `traced` (the wrapper, or torch.export's program of it)."""
    try:
        return torch.onnx.export(
            traced,
            args,
            dynamo=True,
            dynamic_shapes=shapes,
            input_names=inputs,
            output_names=outputs,
            opset_version=opset,
            optimize=False,
            verbose=False,
        )
    except Exception as exc:  # torch.export's failures are many classes; each means "this model"
        raise ShiraInputError(
            f"model_type {model.config.model_type!r}: torch.onnx (dynamo) cannot export it for task {task!r} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); try --exporter optimum on "
            f"transformers 4.x"
        ) from None


def _graph_with_weights(wrapper, model, task: str, opset: int, args, shapes, names) -> "ir.Model":
    """The unoptimized graph with this model's weights: from the trace cache when the same
    structure was traced before (any process, unless the disk cache is off), else traced
    (and kept, without weights)."""
    from shira_export.export.exporters import trace_cache

    inputs, outputs = names
    state = wrapper.state_dict()
    key = _structure_key(wrapper, model, task, opset)
    cached = trace_cache.lookup(key)
    if cached is not None:
        contract = [v.name for v in cached.graph.inputs] == inputs and [v.name for v in cached.graph.outputs] == outputs
        if contract and trace_cache.fill_weights(cached, state):
            return cached
        trace_cache.discard(key)  # a graph that does not fit this model is never used
    program = _trace(wrapper, model, task, opset, args, shapes, inputs, outputs)
    graph = program.model
    trace_cache.store(key, trace_cache.weightless_bytes(graph, {n for n in state if n in graph.graph.initializers}))
    return graph


def export_with_torch(model: "PreTrainedModel", output_dir: Path, *, task: str, opset: int = 18) -> Path:
    """Write `output_dir/model.onnx` for `task`; returns its path."""
    import onnx
    from onnxscript.optimizer import remove_unused_nodes

    from shira_export.export.exporters.graph_rewrites import fuse_split_transposes
    from shira_export.export.exporters.onnx_optimize import optimize_like_torch
    from shira_export.export.onnx_io import save_onnx

    model = model.eval()
    wrapper, args, shapes, names = _program_for(model, task, opset)
    inputs, outputs = names
    with quiet_loggers(*_LOGGERS), torch.no_grad():
        graph = _graph_with_weights(wrapper, model, task, opset, args, shapes, names)
        # constant folding (the weight transposes) and fusions: torch.onnx's optimize(), same result
        graph = optimize_like_torch(graph)
        if fuse_split_transposes(graph):
            remove_unused_nodes(graph)
        proto = ir.serde.serialize_model(graph)
        del graph
    _check_contract(proto, inputs, outputs, model.config.model_type)
    path = Path(output_dir) / "model.onnx"
    save_onnx(proto, path)
    del proto
    onnx.checker.check_model(str(path))  # by path: works past 2 GB too
    return path


def _check_contract(proto, inputs: list[str], outputs: list[str], model_type: str) -> None:
    """Every input the contract names must be a graph input (torch drops unused ones)."""
    have_in = [i.name for i in proto.graph.input]
    have_out = [o.name for o in proto.graph.output]
    missing = [n for n in inputs if n not in have_in] + [n for n in outputs if n not in have_out]
    if missing:
        raise ShiraInputError(
            f"model_type {model_type!r}: the exported graph lacks {missing} (inputs {have_in}, outputs {have_out})"
        )
