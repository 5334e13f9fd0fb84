"""A ShiraLayer's derived state (tuner/layer_state.py) follows what it was derived from,
and the native kernels check their arguments explicitly, also under `python -O`."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

from shira_export import ShiraConfig, _native, get_shira_model
from shira_export.tuner.mixed import mixed_batch, mixed_head_forward
from shira_export.tuner.modules_to_save import ModulesToSaveWrapper
from shira_export.tuner.sparse_ops import SparsePlan
from tiny_models import tiny_opt

native = pytest.mark.skipif(_native._lib() is None, reason=f"native kernels: {_native.status()}")


def _model(r: int = 3):
    torch.manual_seed(0)
    base = tiny_opt()
    reference = copy.deepcopy(base)
    model = get_shira_model(base, ShiraConfig(r=r, init_weights=False, random_seed=1))
    model.add_adapter("b", ShiraConfig(r=r, init_weights=False, random_seed=2))
    return model, reference


def _expected(reference, path: str, layer, active: str) -> torch.Tensor:
    weight = reference.get_submodule(path).weight.detach().clone()
    rows, cols = layer.shira_indices[active]
    weight[rows, cols] += layer.delta_values(active)
    return weight


# ---- native argument checks ------------------------------------------------------------------
def _bad_calls() -> dict:
    w, w2 = torch.zeros(64), torch.zeros(8, 8)
    i64, i32, v = torch.tensor([1, 5, 9]), torch.tensor([1, 5, 9], dtype=torch.int32), torch.ones(3)
    a, b = torch.ones(4, 8), torch.ones(4, 8)
    crow, bptr = torch.zeros(9, dtype=torch.int64), torch.zeros(1, 9, dtype=torch.int64)
    bcol, dest = torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.int32)
    plan = SparsePlan.build(torch.tensor([[0, 1, 5, 7], [2, 7, 0, 3]]), (8, 8))
    pattern = plan.sddmm_pattern("out")  # (crow, bptr, bcol, dest) of a real 4-nonzero pattern
    bad_dest, bad_bptr = pattern[3].clone(), pattern[1].clone()
    bad_dest[2], bad_bptr[0, 3] = 4, 5
    return {
        "scatter int32 positions": (TypeError, "flat must be torch.int64", lambda: _native.scatter_(w, i32, v)),
        "scatter fp64 values": (
            TypeError,
            "values must be torch.float32",
            lambda: _native.scatter_(w, i64, v.double()),
        ),
        "scatter lengths": (ValueError, "flat has 3 entries but values has 2", lambda: _native.scatter_(w, i64, v[:2])),
        "scatter not a tensor": (
            TypeError,
            "flat must be a torch.Tensor, got list",
            lambda: _native.scatter_(w, [1, 5], v),
        ),
        "scatter non-contiguous": (
            ValueError,
            "weight must be a contiguous CPU tensor",
            lambda: _native.scatter_(w2.t(), i64, v),
        ),
        "switch int64 positions": (
            TypeError,
            "old_flat must be torch.int32",
            lambda: _native.switch_(w, i64, v, i32, v),
        ),
        "switch lengths": (
            ValueError,
            "new_flat has 3 entries but new_values has 1",
            lambda: _native.switch_(w, i32, v, i32, v[:1]),
        ),
        "switch block": (
            ValueError,
            "block must be a positive int",
            lambda: _native.switch_(w, i32, v, i32, v, block=0),
        ),
        "sddmm tokens": (ValueError, "a has 4 rows", lambda: _native.sddmm(a, b[:3], crow, bptr, bcol, dest)),
        "sddmm pattern shape": (
            ValueError,
            "the pattern is for another shape",
            lambda: _native.sddmm(a, b, crow[:5], bptr, bcol, dest),
        ),
        "sddmm crow dtype": (
            TypeError,
            "crow must be torch.int64",
            lambda: _native.sddmm(a, b, crow.int(), bptr, bcol, dest),
        ),
        "sddmm nnz": (ValueError, "crow ends at 3", lambda: _native.sddmm(a, b, torch.full((9,), 3), bptr, bcol, dest)),
        # contents: positions outside the weight, a pattern pointing outside its nonzeros (checked in C)
        "scatter out of range": (
            ValueError,
            "positions outside the weight's 64 elements",
            lambda: _native.scatter_(w, torch.tensor([1, 64, 9]), v),
        ),
        "scatter negative": (ValueError, "positions outside", lambda: _native.scatter_(w, torch.tensor([-1, 5, 9]), v)),
        "switch out of range": (
            ValueError,
            "positions outside the weight's 64 elements",
            lambda: _native.switch_(w, i32, v, torch.tensor([1, 5, 64], dtype=torch.int32), v),
        ),
        "sddmm dest": (
            ValueError,
            "points outside its nonzeros",
            lambda: _native.sddmm(a, b, pattern[0], pattern[1], pattern[2], bad_dest),
        ),
        "sddmm bptr": (
            ValueError,
            "points outside its nonzeros",
            lambda: _native.sddmm(a, b, pattern[0], bad_bptr, pattern[2], pattern[3]),
        ),
    }


@native
@pytest.mark.parametrize("case", list(_bad_calls()))
def test_native_arguments_are_checked(case):
    error, message, call = _bad_calls()[case]
    with pytest.raises(error, match=message):
        call()


@native
def test_valid_native_calls_still_run():
    w = torch.zeros(64)
    _native.scatter_(w, torch.tensor([1, 63]), torch.tensor([2.0, 3.0]))
    _native.switch_(
        w,
        torch.tensor([1, 63], dtype=torch.int32),
        torch.zeros(2),
        torch.tensor([0, 5], dtype=torch.int32),
        torch.tensor([4.0, 5.0]),
    )
    assert w[0].item() == 4.0 and w[5].item() == 5.0 and w.abs().sum().item() == 9.0


def test_native_without_the_kernels_says_so(monkeypatch):
    monkeypatch.setitem(_native._state, "lib", None)
    monkeypatch.setitem(_native._state, "tried", True)
    with pytest.raises(RuntimeError, match="native kernels are not loaded"):
        _native.scatter_(torch.zeros(4), torch.tensor([1]), torch.ones(1))


@native
def test_the_checks_hold_under_python_O():
    """Asserts vanish under -O; these checks must not (a wrong dtype would reach C)."""
    script = textwrap.dedent("""
        import sys, torch
        from shira_export import _native
        assert False, "not stripped"  # -O removes this line
        w = torch.zeros(16)
        out = []
        for call in (lambda: _native.scatter_(w, torch.tensor([1, 2], dtype=torch.int32), torch.ones(2)),
                     lambda: _native.scatter_(w, torch.tensor([1, 2]), torch.ones(3)),
                     lambda: _native.scatter_(w, torch.tensor([1, 16]), torch.ones(2)),
                     lambda: _native.switch_(w, torch.tensor([1]), torch.ones(1), torch.tensor([2]), torch.ones(1))):
            try:
                call()
                out.append("ran")
            except (TypeError, ValueError) as exc:
                out.append(type(exc).__name__)
        print(sys.flags.optimize, _native.loaded(), *out, float(w.abs().sum()))
    """)
    done = subprocess.run([sys.executable, "-O", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # the out-of-range call wrote its one valid position (w[1] = 1) and nothing else
    assert done.stdout.split() == ["1", "True", "TypeError", "ValueError", "ValueError", "TypeError", "1.0"]


def test_an_empty_mixed_batch_through_a_head_gives_the_heads_empty_output():
    head = ModulesToSaveWrapper(torch.nn.Linear(4, 3))
    head.add_adapter("a", trainable=False)
    with mixed_batch(["a"]):
        out = mixed_head_forward(head, torch.zeros(0, 4))
    assert out.shape == (0, 3)


# ---- the layer state ------------------------------------------------------------------------
def test_derived_data_is_reused_until_its_indices_change():
    model, _ = _model()
    path, layer = next(iter(model.shira_layers()))
    plan = layer.plan("default")
    assert layer.plan("default") is plan  # one build per indices buffer
    layer.shira_indices["default"] = layer.shira_indices["default"].clone()  # what .to(device) does
    rebuilt = layer.plan("default")
    assert rebuilt is not plan and torch.equal(rebuilt.rows, plan.rows)


def test_a_write_while_one_adapter_is_merged_survives_a_stacked_merge_and_unmerge():
    """The entries saved before the write are not restored: that adapter's delta is
    subtracted instead (the entries saved after it are restored bit for bit)."""
    model, reference = _model()
    model.merge_adapter(["default"])
    with torch.no_grad():
        for _, layer in model.shira_layers():
            layer.base_layer.weight.add_(1.0)  # someone else writes while "default" is merged
    with pytest.warns(UserWarning, match="Already following adapters were merged"):
        model.merge_adapter(["b"])
    model.unmerge_adapter()
    for path, layer in model.shira_layers():
        expected = reference.get_submodule(path).weight.detach() + 1.0
        torch.testing.assert_close(layer.base_layer.weight.detach(), expected, rtol=0, atol=1e-6, msg=path)


def test_a_deleted_and_re_added_adapter_merges_its_new_support():
    model, reference = _model()
    model.merge_adapter(["default"])
    model.switch_adapter("b")
    model.switch_adapter("default")  # base entries and merged entries of both cached
    model.unmerge_adapter()
    model.delete_adapter("b")
    model.add_adapter("b", ShiraConfig(r=3, init_weights=False, random_seed=7))
    model.set_adapter("b")
    model.merge_adapter()
    model.switch_adapter("default")
    model.switch_adapter("b")
    for path, layer in model.shira_layers():
        torch.testing.assert_close(
            layer.base_layer.weight.detach(), _expected(reference, path, layer, "b"), rtol=0, atol=1e-6, msg=path
        )


def test_a_dtype_change_while_merged_keeps_unmerge_exact_and_switches_right():
    model, reference = _model()
    model.merge_adapter(["default"])
    model.switch_adapter("b")
    model.switch_adapter("default")  # fp32 base entries cached
    model.model.double()  # the same Parameter objects, same versions, new dtype
    model.switch_adapter("b")  # the fp32 entries must not be used as they are
    for path, layer in model.shira_layers():
        torch.testing.assert_close(
            layer.base_layer.weight.detach(),
            _expected(reference, path, layer, "b").double(),
            rtol=0,
            atol=1e-6,
            msg=path,
        )
    model.unmerge_adapter()
    for path, layer in model.shira_layers():
        assert torch.equal(layer.base_layer.weight.detach(), reference.get_submodule(path).weight.detach().double())
