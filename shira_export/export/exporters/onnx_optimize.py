"""torch.onnx's `ONNXProgram.optimize()` with the same passes and rules, made cheap to run.

`optimize()` is onnxscript's `optimize_ir` (constant folding, its default rewrite rules,
dead code, constant lifting, deduplication, CSE) and then its ONNX fusions. The rewrite
pass tries every rule at every node, and most of its time is rules failing at nodes of
another op type: 46 rules x ~1800 nodes x 2 rounds took 10 of the 13 s of `optimize()` on
the OPT-125m shape, and `SlicesSplit` (a two-output pattern) indexes the whole graph at
every node it is tried on. Here each rule whose pattern ends in one known op is tried only
at nodes of that op, and `SlicesSplit` only at a Slice whose input feeds another Slice: a
rule skipped there could not have matched, so the result is the one `optimize()` gives
(`tests/test_torch_export_speed.py` checks that on a real export).

Where onnxscript's private names this relies on are missing (another onnxscript), the plain
`optimize()` path runs instead.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import onnx_ir as ir

__all__ = ["optimize_like_torch", "plain_optimize"]


def plain_optimize(model: ir.Model) -> ir.Model:
    """Exactly torch.onnx's `ONNXProgram.optimize()`; returns the optimized model."""
    import torch

    program = torch.onnx.ONNXProgram(model, None)
    program.optimize()
    return program.model


def _root_op(rule: Any) -> Optional[str]:
    """The op type of the node a single-output rule matches at, or None when unknown."""
    pattern = getattr(rule, "_target_pattern", None)
    outputs = getattr(pattern, "output_nodes", None)
    if not outputs or not getattr(pattern, "has_single_output_node", False):
        return None
    identifier = outputs[0].op_identifier() if hasattr(outputs[0], "op_identifier") else None
    return identifier[1] if identifier and identifier[1] else None


def _feeds_two_slices(node: ir.Node) -> bool:
    source = node.inputs[0] if node.inputs else None
    return source is not None and sum(1 for user in source.consumers() if user.op_type == "Slice") >= 2


def _guarded(rule: Any) -> Any:
    """A copy of `rule` that declines, without matching, nodes it cannot match."""
    test: Optional[Callable[[ir.Node], bool]] = None
    op = _root_op(rule)
    if op is not None:
        test = lambda node: node.op_type == op  # noqa: E731
    elif getattr(rule, "name", None) == "SlicesSplit":  # Slice(x), Slice(x) -> Split(x)
        test = lambda node: node.op_type == "Slice" and _feeds_two_slices(node)  # noqa: E731
    if test is None:
        return rule
    inner = rule.try_rewrite
    guarded = copy.copy(rule)

    def try_rewrite(model, graph_or_function, node, **kwargs):
        return inner(model, graph_or_function, node, **kwargs) if test(node) else None

    guarded.try_rewrite = try_rewrite
    return guarded


def _fast_passes() -> Optional[Any]:
    """onnxscript's `optimize_ir` pass list (its defaults), with the guarded rules; None
    when this onnxscript lacks a name it uses."""
    try:
        import onnx_ir.passes.common as common
        from onnxscript import rewriter
        from onnxscript.optimizer import _constant_folding as folding

        rules = [_guarded(rule) for rule in rewriter._DEFAULT_REWRITE_RULES]
        fold = folding.FoldConstantsPass(
            shape_inference=True,
            input_size_limit=folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
            output_size_limit=folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
            should_fold=lambda node: None,
        )
        return ir.passes.Sequential(
            common.InlinePass(),
            ir.passes.PassManager(
                [
                    fold,
                    rewriter.RewritePass(rules),
                    common.RemoveUnusedNodesPass(),
                    common.RemoveUnusedFunctionsPass(),
                    common.RemoveUnusedOpsetsPass(),
                ],
                steps=2,
                early_stop=True,
            ),
            common.RemoveUnusedNodesPass(),
            common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            common.LiftSubgraphInitializersToMainGraphPass(),
            common.DeduplicateInitializersPass(),
            common.CommonSubexpressionEliminationPass(),
            common.OutputFixPass(),
            common.NameFixPass(),
        )
    except (ImportError, AttributeError, TypeError):
        return None


def optimize_like_torch(model: ir.Model) -> ir.Model:
    """What `ONNXProgram.optimize()` does to `model`, without the failed matches; returns
    the optimized model (`model` itself, changed in place, unless the fallback ran)."""
    passes = _fast_passes()
    if passes is None:
        return plain_optimize(model)
    passes(model)
    from onnxscript.rewriter import onnx_fusions

    onnx_fusions.fuse(model)  # opset-23 fusions only; nothing at lower opsets, as in optimize()
    return model
