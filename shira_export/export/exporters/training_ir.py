"""torch.onnx's dynamo export without `run_decompositions`: one trace instead of two.

`torch.onnx.export(dynamo=True)` traces the module with torch.export (the training IR),
then `run_decompositions` traces the whole program a second time, through functionalization
and torch's decomposition table, and only then translates it. That second trace is the
slowest stage of a first export (12 of ~34 s on the OPT-125m shape) and it changes little
here: it decomposes only ops torchlib cannot translate, and in the graphs of the models this
package exports those are a handful. So the training IR is lowered in place instead:

- an op torchlib translates is kept (what `run_decompositions` does with it too), except a
  `reshape` to the shape its input provably has, which is dropped (its decomposition is a
  view of the input);
- assertion ops are left for torch.onnx's `remove_assertion_nodes`, as after decomposing;
- `aten.to.*` becomes `_to_copy` to the new dtype, or the input itself when nothing changes
  (what its decomposition gives); `__and__` / `__or__` become `bitwise_and` / `bitwise_or`;
- an in-place op on a tensor that nothing else aliases (made by an op that returns a new
  tensor, no view of it taken) becomes its out-of-place op, and later readers read the new
  value; `copy_` into a chain of slices of such a tensor becomes `slice_scatter`s back into
  it, provided no view of it made before the copy is read after it; `detach_` is dropped.

Anything else (another op without a translation, a higher-order op, a mutation of an input,
of a view, or of a tensor whose views are read later) raises `Unsupported`, and the caller
runs `torch.onnx.export` itself. Then come the passes torch.onnx runs after decomposing:
type promotion (its own interpreter, re-running only the nodes it changes; the others keep
the value torch.export recorded), assertion removal, translation, opset conversion, names.

Everything here is torch.onnx's private API (torch 2.13); where a name is missing the caller
gets `Unsupported` too. `tests/test_torch_export_lowering.py` checks that both routes write
the same graph for every architecture of the test table.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence, cast

import torch
import torch.fx

__all__ = ["Unsupported", "check_lowerable", "export_training_ir", "lower_in_place", "translated_ops"]

_A = torch.ops.aten
_LATE = 1 << 60  # the position of a node added after the order was taken
_TORCHLIB: dict[str, Any] = {}  # torchlib's functions by qualified name: (torch op or None, functions)
_METAS: dict[str, list] = {}  # the registry entries made for a qualified name (kept for the process)


class Unsupported(Exception):
    """This graph, or this torch, needs torch.onnx.export's own route. `program`: the
    ExportedProgram torch.export gave, untouched, where the refusal came before any rewrite
    (torch.onnx.export can take it instead of tracing again), else None."""

    def __init__(self, why: str, program: Any = None) -> None:
        super().__init__(why)
        self.program = program


def _aliases(target: Any) -> bool:
    """Whether the op's output may alias an input (a view or an in-place op); True when unknown."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return True  # getitem of a split, a Python callable: assume it may
    return any(r.alias_info is not None for r in schema.returns)


def _is_fresh(node: Any) -> bool:
    """A tensor no other value aliases when made: the output of an op that returns a new one."""
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and not _aliases(node.target)


_ASSERTS = {
    _A._assert_tensor_metadata.default,
    _A._assert_scalar.default,
    _A._assert_async.default,
    _A._assert_async.msg,
    _A.sym_constrain_range_for_size.default,
}
_TO = {_A.to.dtype, _A.to.device, _A.to.dtype_layout}
_RENAMED = {_A.__and__.Tensor: _A.bitwise_and.Tensor, _A.__or__.Tensor: _A.bitwise_or.Tensor}


def check_lowerable(gm: torch.fx.GraphModule, translated: set) -> None:
    """Raise Unsupported, leaving `gm` as it is, where the graph has a node of a kind
    `lower_in_place` does not handle (it may still refuse a mutation it cannot prove safe)."""
    if any(isinstance(m, torch.fx.GraphModule) for name, m in gm.named_modules() if name):
        raise Unsupported("the graph has subgraphs (higher-order ops)")
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op != "call_function":
            raise Unsupported(f"node {node.name}: {node.op}")
        target = node.target
        if target in translated or target in _ASSERTS or target in _RENAMED or target in _TO:
            continue
        if isinstance(target, torch._ops.HigherOrderOperator):
            raise Unsupported(f"higher-order op {target}")
        schema = getattr(target, "_schema", None)
        if schema is None or not schema.is_mutable:
            raise Unsupported(f"{target} has no ONNX translation")


def lower_in_place(gm: torch.fx.GraphModule, translated: set) -> None:
    """Rewrite `gm` (a training-IR graph) so that every op is in `translated` or an assertion;
    raises Unsupported (the graph then possibly half rewritten) where it cannot."""
    check_lowerable(gm, translated)
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        target = node.target
        if target is _A.reshape.default and _same_shape(node):
            node.replace_all_uses_with(node.args[0])  # as its decomposition does (a view of itself)
            graph.erase_node(node)
        elif target in translated or target in _ASSERTS:
            continue
        elif target in _RENAMED:
            node.target = _RENAMED[target]
        elif target in _TO:
            _lower_to(graph, node)
        else:  # a mutation (check_lowerable let nothing else through)
            _functionalize(graph, node, translated, order)
    graph.lint()
    gm.recompile()


def _same_shape(node: torch.fx.Node) -> bool:
    """Whether the op's output provably has its input's shape (no guard needed)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    source = node.args[0]
    before = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
    after = node.meta.get("val")
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor) or before.dim() != after.dim():
        return False
    return all(statically_known_true(a == b) for a, b in zip(before.shape, after.shape))


_TO_COPY_ARG: dict[Any, int] = {_A.to.dtype: 3, _A.to.device: 4}  # where `copy` sits among the positional arguments


def _lower_to(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """`aten.to.*` as its decomposition gives it: the input itself when neither dtype nor
    device changes (and no copy is asked for), else `_to_copy` to the new dtype."""
    source = node.args[0]
    if not isinstance(source, torch.fx.Node):
        raise Unsupported(f"{node.target} of a constant")
    before, after = source.meta.get("val"), node.meta.get("val")
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
        raise Unsupported(f"{node.name}: no recorded tensor value")
    if after.device != before.device:
        raise Unsupported(f"{node.name}: a device change")
    at = _TO_COPY_ARG.get(cast(Any, node.target))
    copy = node.kwargs.get("copy", node.args[at] if at is not None and len(node.args) > at else False)
    if after.dtype == before.dtype and not copy:
        node.replace_all_uses_with(source)
    else:
        with graph.inserting_before(node):
            converted = graph.call_function(_A._to_copy.default, (source,), {"dtype": after.dtype})
        converted.meta = dict(node.meta)
        node.replace_all_uses_with(converted)
    graph.erase_node(node)


def _out_of_place(target: Any) -> Optional[Any]:
    name = target._schema.name.split("::")[-1]
    packet = getattr(_A, name[:-1], None) if name.endswith("_") else None
    return getattr(packet, target._overloadname, None) if packet is not None else None


def _read_later_from(old: torch.fx.Node, new: torch.fx.Node, mutation: torch.fx.Node, order: dict) -> None:
    """Users of `old` after `mutation` (in graph order) read `new` instead."""
    for user in list(old.users):
        if user is not mutation and user is not new and order.get(user, _LATE) > order[mutation]:
            user.replace_input_with(old, new)


def _views_read_after(base: torch.fx.Node, mutation: torch.fx.Node, order: dict) -> bool:
    """Whether a view of `base` made before `mutation` is read (or viewed) after it. Views
    made after it are fine: they are rewired to the new value."""
    at = order[mutation]
    stack = [u for u in base.users if order.get(u, _LATE) < at and _aliases(u.target)]
    while stack:
        view = stack.pop()
        for user in view.users:
            if user is mutation:
                continue
            if order.get(user, _LATE) > at:
                return True
            if user.op != "call_function" or _aliases(user.target):
                stack.append(user)
    return False


def _val(node: torch.fx.Node) -> Any:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        raise Unsupported(f"{node.name}: no recorded tensor value")
    return value


def _new_node(graph: torch.fx.Graph, target: Any, args: tuple, like: torch.fx.Node, val: Any) -> torch.fx.Node:
    node = graph.call_function(target, args, {})
    node.meta = {**like.meta, "val": val}
    return node


def _functionalize(graph: torch.fx.Graph, node: torch.fx.Node, translated: set, order: dict) -> None:
    target, x = node.target, cast(Any, node.args[0])
    if target is _A.detach_.default:  # metadata only; nothing to compute in an inference graph
        node.replace_all_uses_with(x)
        graph.erase_node(node)
        return
    if target is _A.copy_.default:
        _functionalize_copy(graph, node, order)
        return
    functional = _out_of_place(target)
    if functional is None or functional not in translated or not _is_fresh(x):
        raise Unsupported(f"{target} on {getattr(x, 'name', x)} (an input, a view, or no out-of-place op)")
    if any(u is not node and _aliases(u.target) for u in x.users):
        raise Unsupported(f"{target}: {x.name} has views")
    with graph.inserting_before(node):
        new = graph.call_function(functional, node.args, node.kwargs)
    new.meta = dict(node.meta)
    order[new] = order[node]
    _read_later_from(x, new, node, order)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _functionalize_copy(graph: torch.fx.Graph, node: torch.fx.Node, order: dict) -> None:
    """`copy_(slice(...slice(base)), src)`: base's later readers read slice_scatter(s)."""
    destination, source = cast(Any, node.args[0]), node.args[1]
    if node.kwargs or len(node.args) > 2:
        raise Unsupported("copy_ with options")
    chain: list[torch.fx.Node] = []
    base: Any = destination
    while isinstance(base, torch.fx.Node) and base.op == "call_function" and base.target is _A.slice.Tensor:
        if base.kwargs:
            raise Unsupported(f"{base.name}: slice with keyword arguments")
        chain.append(base)
        base = base.args[0]
    if not chain or not _is_fresh(base):
        raise Unsupported("copy_ into something other than slices of a new tensor")
    if _views_read_after(base, node, order):
        raise Unsupported(f"copy_: a view of {base.name} made before it is read after it")
    with graph.inserting_before(node):
        value = _new_node(graph, _A.copy.default, (destination, source), node, _val(destination))
        for view in chain:  # innermost first: scatter each slice back into what it was cut from
            inner, dim, start, end, step = cast(Any, list(view.args) + [0, None, None, 1][len(view.args) - 1 :])[:5]
            value = _new_node(graph, _A.slice_scatter.default, (inner, value, dim, start, end, step), node, _val(inner))
    order[value] = order[node]
    _read_later_from(base, value, node, order)
    node.replace_all_uses_with(value)
    graph.erase_node(node)


def _promote_types(gm: torch.fx.GraphModule) -> None:
    """torch.onnx's type-promotion pass, with its interpreter running only the nodes whose
    rule changes an argument: every other node keeps the value torch.export recorded (the
    pass would compute the same one), so its fake-tensor run over the whole graph is skipped."""
    from torch.onnx._internal.fx import type_utils
    from torch.onnx._internal.fx.passes import type_promotion

    table = type_promotion.TypePromotionTable()

    def changes(value: Any, dtype: Any) -> bool:
        if dtype is None:
            return False
        if isinstance(value, torch.Tensor):
            return value.dtype != dtype
        scalar = type_utils.from_scalar_type_to_torch_dtype(type(value))
        if scalar is not None:
            return scalar != dtype
        if isinstance(value, (list, tuple)):
            return any(changes(v, dtype) for v in value)
        return True  # unknown: let the pass look

    class Interpreter(type_promotion._TypePromotionInterpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            if n.op != "call_function":
                return super().run_node(n)
            rule = type_promotion.get_type_promotion_rule(n, self.type_promotion_table)
            if rule:
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                info = rule.preview_type_promotion(args, kwargs)
                if any(changes(a, info.args_dtypes.get(i)) for i, a in enumerate(args)) or any(
                    changes(a, info.kwargs_dtypes.get(k)) for k, a in kwargs.items()
                ):
                    return super().run_node(n)
            return n.meta.get("val")

    pass_ = type_promotion.InsertTypePromotion(gm, table)
    pass_.interpreter = Interpreter(gm, table)
    pass_.run()


def _registry_opset(opset: int) -> int:
    from torch.onnx._internal.exporter import _constants

    return max(opset, _constants.TORCHLIB_OPSET)  # as torch.onnx.export picks it


def _torchlib_names() -> dict[str, Any]:
    """torchlib's functions by qualified name, and the torch op each translates (None: not in this torch)."""
    if not _TORCHLIB:
        from onnxscript.function_libs.torch_lib import ops  # noqa: F401  # registers the functions
        from onnxscript.function_libs.torch_lib import registration
        from torch.onnx._internal.exporter import _registration

        for name, functions in registration.default_registry.items():
            if not name.startswith("internal::"):
                _TORCHLIB[name] = (_registration._get_overload(name), functions)
    return _TORCHLIB


def translated_ops(opset: int) -> set:
    """The torch ops torchlib translates at `opset` (what the registry torch.onnx.export builds
    holds, read off the names: building that registry takes ~1 s, mostly parsing the source of
    ~500 functions this graph does not use)."""
    from torch.onnx._internal.exporter._torchlib import _torchlib_registry

    own = {m.fx_target for m in _torchlib_registry.get_torchlib_ops() if m.opset_introduced <= _registry_opset(opset)}
    return own | {target for target, _ in _torchlib_names().values() if target is not None}


def _registry_for(opset: int, targets: set) -> Any:
    """torch.onnx.export's registry (`ONNXRegistry.from_torchlib`), built the same way but for
    the ops in `targets` only: the graph's, which are all its translation looks up."""
    from torch.onnx._internal.exporter import _registration
    from torch.onnx._internal.exporter._torchlib import _torchlib_registry

    registry = _registration.ONNXRegistry()
    registry._opset_version = _registry_opset(opset)
    for meta in _torchlib_registry.get_torchlib_ops():
        registry._register(meta.fx_target, meta)
    for name, (target, functions) in _torchlib_names().items():
        if target is None or target not in targets:
            continue
        if name not in _METAS:
            _METAS[name] = [
                _registration.OnnxDecompMeta(
                    onnx_function=function, fx_target=target, signature=None, is_custom=False, is_complex=complex_
                )
                for functions_, complex_ in ((functions.overloads, False), (functions.complex, True))
                for function in functions_
            ]
        for meta in _METAS[name]:
            registry._register(target, meta)
    registry._cleanup_registry_based_on_opset_version()
    return registry


@contextlib.contextmanager
def _no_stack_traces() -> Iterator[None]:
    """torch.fx's switch off for the trace: recording every node's Python stack is ~5% of it,
    and it only fills the ONNX nodes' `pkg.torch.onnx.stack_trace` debug field."""
    config = getattr(torch.fx, "config", None)
    before = getattr(config, "do_not_emit_stack_traces", None)
    if before is None:
        yield
        return
    config.do_not_emit_stack_traces = True  # type: ignore[union-attr]
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = before  # type: ignore[union-attr]


def export_training_ir(
    wrapper: torch.nn.Module, args: tuple, shapes: Any, inputs: Sequence[str], outputs: Sequence[str], opset: int
) -> Any:
    """What `torch.onnx.export(wrapper, args, dynamo=True, dynamic_shapes=shapes, input_names=
    inputs, output_names=outputs, opset_version=opset, optimize=False)` gives (its ONNXProgram),
    with the training IR lowered in place of `run_decompositions`; Unsupported where it cannot."""
    try:
        from torch.onnx._internal._lazy_import import onnxscript_apis
        from torch.onnx._internal.exporter import (
            _capture_strategies,
            _core,
            _dynamic_shapes,
            _flags,
            _fx_passes,
            _ir_passes,
        )
    except ImportError as exc:
        raise Unsupported(f"this torch lacks {exc.name}") from None

    @_flags.set_onnx_exporting_flag  # torch.onnx.is_in_onnx_export() is True inside, as in export()
    def run() -> Any:
        export_shapes, rename_axes = _dynamic_shapes.convert_str_to_export_dim(shapes)
        capture = _capture_strategies.TorchExportNonStrictStrategy(verbose=False)
        with _no_stack_traces():
            result = capture(wrapper, tuple(args), None, export_shapes)
        if result.exported_program is None:
            raise Unsupported(f"torch.export (non-strict) failed: {type(result.exception).__name__}")
        program = result.exported_program
        translated = translated_ops(opset)
        try:
            check_lowerable(program.graph_module, translated)
        except Unsupported as why:
            raise Unsupported(str(why), program) from None
        lower_in_place(program.graph_module, translated)
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]  # as torch.onnx
            _promote_types(program.graph_module)
            program._graph_module = _fx_passes.remove_assertion_nodes(program.graph_module)
        targets = {n.target for m in program.graph_module.modules() for n in m.graph.nodes if n.op == "call_function"}
        registry = _registry_for(opset, targets)
        onnx_program = _core._exported_program_to_onnx_program(program, registry=registry)
        onnx_program.model = onnxscript_apis.convert_version(onnx_program.model, opset)
        _ir_passes.rename_inputs(onnx_program.model, list(inputs))
        _ir_passes.rename_outputs(onnx_program.model, list(outputs))
        if rename_axes:  # the graph's dynamic axes get the Dims' names
            onnx_program._rename_dynamic_axes(shapes)
        return onnx_program

    try:
        return run()
    except torch.onnx.errors.OnnxExporterError as exc:  # a translation failure: the public route decides
        raise Unsupported(f"translation failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    except (AttributeError, TypeError, ImportError, KeyError) as exc:  # another torch: a private name moved
        raise Unsupported(f"torch.onnx internals differ ({type(exc).__name__}: {exc})") from None
    except (AssertionError, NotImplementedError) as exc:  # how torch.onnx's type-promotion pass fails
        raise Unsupported(f"type promotion failed ({type(exc).__name__}: {exc})") from None
