"""The native kernels against the torch ops they replace, and the fallback when they
cannot be built."""

from __future__ import annotations

import copy
import ctypes
import subprocess

import pytest
import torch

from shira_export import ShiraConfig, _native, get_shira_model
from shira_export.tuner.sparse_ops import SparsePlan, sparse_values_grad
from tiny_models import tiny_opt

pytestmark = pytest.mark.skipif(_native._lib() is None, reason=f"native kernels: {_native.status()}")


def _kernels_off(monkeypatch) -> None:
    """Run the torch fallback even though the kernels are built."""
    monkeypatch.setitem(_native._state, "lib", None)
    monkeypatch.setitem(_native._state, "tried", True)  # or the next call would load them again


def _plan(out_f: int, in_f: int, nnz: int, seed: int) -> SparsePlan:
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(out_f * in_f, generator=g)[:nnz].sort().values
    return SparsePlan.build(torch.stack([flat // in_f, flat % in_f]), (out_f, in_f))


@pytest.mark.parametrize(
    "shape", [(48, 40), (40, 96), (7, 300), (300, 260)], ids=["tall", "wide", "few_rows", "column_blocks"]
)
@pytest.mark.parametrize("tokens", [1, 13, 130])
@pytest.mark.parametrize("threads", [1, 3])
def test_sddmm_equals_sampled_addmm(shape, tokens, threads, monkeypatch):
    out_f, in_f = shape
    plan = _plan(out_f, in_f, nnz=(out_f * in_f) // 5, seed=tokens)  # some rows/columns empty
    g = torch.Generator().manual_seed(1)
    grad_out, x = torch.randn(tokens, out_f, generator=g), torch.randn(tokens, in_f, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the rows are split between this many threads
    try:
        native = sparse_values_grad(grad_out, x, plan)
    finally:
        torch.set_num_threads(before)
    _kernels_off(monkeypatch)
    reference = sparse_values_grad(grad_out, x, plan)
    exact = (grad_out.t().double() @ x.double())[plan.rows, plan.cols]  # plan's order = CSR order here
    assert native.shape == reference.shape == (plan.nnz,)
    torch.testing.assert_close(native, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(native.double(), exact, rtol=1e-5, atol=1e-5)


def test_scatter_writes_exactly_the_positions():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 301, generator=g)
    flat = torch.randperm(weight.numel(), generator=g)[:40000]  # any order, above the threads' threshold
    values = torch.randn(40000, generator=g)
    expected = weight.clone().view(-1)
    expected[flat] = values
    _native.scatter_(weight, flat, values)
    assert torch.equal(weight.view(-1), expected)


def _train_step(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    torch.manual_seed(seed)
    base = tiny_opt()
    model = get_shira_model(base, ShiraConfig(r=2, init_weights=False, random_seed=3)).train()
    ids = torch.randint(0, base.config.vocab_size, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.eval()  # the trained adapter leaves the weights
    weights = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if not p.requires_grad])
    return grads, weights


def test_training_gradients_equal_the_torch_path(monkeypatch):
    grads, weights = _train_step()  # the kernels
    _kernels_off(monkeypatch)
    ref_grads, ref_weights = _train_step()  # the torch ops
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert torch.equal(weights, ref_weights)  # the base restored bit for bit on both paths


def test_build_failure_falls_back_to_torch(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", "/bin/false")  # a "compiler" that always fails
    monkeypatch.setenv("SHIRA_EXPORT_CACHE", str(tmp_path))
    _native._reset_for_tests()
    try:
        assert not _native.available(torch.zeros(1))
        assert "could not build" in _native.status() and "using torch ops" in _native.status()
        assert "could not build" in caplog.text
        grads, _ = _train_step()  # training still works, on the torch ops
        assert all(torch.isfinite(g).all() for g in grads.values())
        assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob(".kernels-*"))  # no half-built file
    finally:
        monkeypatch.undo()
        _native._reset_for_tests()
    assert _native.available(torch.zeros(1))


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("SHIRA_EXPORT_NATIVE", "0")
    _native._reset_for_tests()
    try:
        assert _native.status() == "disabled by SHIRA_EXPORT_NATIVE=0"
        assert not _native.available(torch.zeros(1))
    finally:
        monkeypatch.undo()
        _native._reset_for_tests()


def test_other_dtypes_use_torch_ops():
    assert not _native.available(torch.zeros(1, dtype=torch.float16))
    assert not _native.available(torch.zeros(1, dtype=torch.bfloat16))
    assert not _native.available(torch.zeros(4, 4).t())  # not contiguous


def test_switch_in_one_pass_is_exact_and_visible_to_autograd(monkeypatch):
    """Overlapping supports (r=6 on 16x16 layers: ~75% dense), the blocked pass used once
    the base entries are cached, and the result equal to unmerge + merge, bit for bit."""
    calls = []
    real_switch = _native.switch_
    monkeypatch.setattr(_native, "switch_", lambda *a, **k: calls.append(1) or real_switch(*a, **k))
    torch.manual_seed(0)
    base = tiny_opt()
    fast = get_shira_model(base, ShiraConfig(r=6, init_weights=False, random_seed=1))
    fast.add_adapter("b", ShiraConfig(r=5, init_weights=False, random_seed=2))
    fast.merge_adapter()
    weights = {p: layer.base_layer.weight for p, layer in fast.shira_layers()}
    expected = {}
    for name in ("b", "default"):  # reference: the two-scatter path (kernels off)
        with monkeypatch.context() as off:
            _kernels_off(off)
            fast.switch_adapter(name)
            expected[name] = {p: w.clone() for p, w in weights.items()}
    assert not calls
    for name in ["b", "default", "b", "b", "default"] * 2:
        versions = {p: w._version for p, w in weights.items()}
        fast.switch_adapter(name)
        assert all(torch.equal(w, expected[name][p]) for p, w in weights.items()), name
        assert all(w._version > versions[p] for p, w in weights.items())  # a write autograd can see
    assert len(calls) == 8 * len(weights)  # every switch to another adapter went through the kernel


def test_unusable_cache_folder_falls_back_to_the_temp_folder(monkeypatch, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setenv("SHIRA_EXPORT_CACHE", str(tmp_path / "a_file" / "cache"))
    monkeypatch.setattr(_native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    _native._reset_for_tests()
    try:
        assert _native.loaded(), _native.status()
        assert list((tmp_path / "tmp").glob("shira_export-*/kernels-*.so"))
    finally:
        monkeypatch.undo()
        _native._reset_for_tests()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_switch_kernel_equals_two_scatters(threads):
    """Overlapping supports, ranges split between threads (above the kernel's threshold)."""
    g = torch.Generator().manual_seed(threads)
    weight = torch.randn(300, 301, generator=g)
    old = torch.randperm(weight.numel(), generator=g)[:45000].sort().values
    new = torch.randperm(weight.numel(), generator=g)[:45000].sort().values  # ~half overlap
    old_vals, new_vals = torch.randn(45000, generator=g), torch.randn(45000, generator=g)
    expected = weight.clone().view(-1)
    expected[old] = old_vals
    expected[new] = new_vals
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _native.switch_(weight.view(-1), old.int(), old_vals, new.int(), new_vals, block=1000)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(weight.view(-1), expected)


def test_portable_build_gives_the_same_values_gradient(monkeypatch, tmp_path):
    """The plain-C build (no AVX2 intrinsics: what a CPU without them compiles) against
    the intrinsics build, on a pattern with several token and column blocks."""
    cc = _native._compiler()
    lib_path = tmp_path / "generic.so"
    for extra in _native._VARIANTS:  # the flags the main build may have fallen back to
        cmd = [cc, *_native._FLAGS, *extra, "-DSHIRA_GENERIC", "-o", str(lib_path), str(_native._SOURCE)]
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            break
    else:
        pytest.fail(f"{cc} could not build the portable kernels")
    plan = _plan(300, 260, nnz=9000, seed=5)
    g = torch.Generator().manual_seed(2)
    grad_out, x = torch.randn(150, 300, generator=g), torch.randn(150, 260, generator=g)
    fast = sparse_values_grad(grad_out, x, plan)
    monkeypatch.setitem(_native._state, "lib", _native._declare(ctypes.CDLL(str(lib_path))))
    portable = sparse_values_grad(grad_out, x, plan)
    exact = (grad_out.t().double() @ x.double())[plan.rows, plan.cols]
    torch.testing.assert_close(portable.double(), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, portable, rtol=1e-5, atol=1e-5)


def test_backward_through_a_graph_built_before_a_switch_is_refused():
    model = get_shira_model(tiny_opt(), ShiraConfig(r=2, init_weights=False, random_seed=1))
    model.add_adapter("b", ShiraConfig(r=2, init_weights=False, random_seed=2))
    model.merge_adapter()
    model.switch_adapter("b")
    model.switch_adapter("default")  # base entries cached: the next switch takes the kernel
    model.eval()
    embeds = model.model.get_input_embeddings()(torch.tensor([[1, 2, 3]])).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds).logits.sum()  # F.linear saved the merged weights
    model.switch_adapter("b")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_switch_caches_follow_value_scale_and_weight_changes():
    torch.manual_seed(0)
    base = tiny_opt()
    reference = copy.deepcopy(base)
    model = get_shira_model(base, ShiraConfig(r=3, init_weights=False, random_seed=1))
    model.add_adapter("b", ShiraConfig(r=3, init_weights=False, random_seed=2))
    model.merge_adapter()
    for name in ("b", "default", "b", "default"):  # caches warm: the kernel path from here on
        model.switch_adapter(name)
    layers = dict(model.shira_layers())

    def check(active: str) -> None:
        for path, layer in layers.items():
            expected = reference.get_submodule(path).weight.detach().clone()
            rows, cols = layer.shira_indices[active]
            expected[rows, cols] += layer.delta_values(active)
            torch.testing.assert_close(layer.base_layer.weight, expected, rtol=0, atol=1e-6, msg=path)

    with torch.no_grad():
        for layer in layers.values():
            layer.shira_weight["b"].mul_(3.0)  # an optimizer step on the adapter that is not merged
    model.switch_adapter("b")
    check("b")
    model.set_scale("default", 0.5)
    model.switch_adapter("default")
    check("default")
    with torch.no_grad():  # someone else writes a base weight (bumps its version)
        path, layer = next(iter(layers.items()))
        layer.base_layer.weight.add_(1.0)
        reference.get_submodule(path).weight.add_(1.0)
    model.switch_adapter("b")
    check("b")
    model.switch_adapter("default")
    check("default")
