"""Sparse-delta ops of a SHiRA layer: cost follows nnz, never out*in, and nothing of the
size of the weight is allocated, copied or differentiated on any call.

Two training formulations (measured: tools/bench_train.py, --ops for one layer):

1. `sparse_linear_delta`: the delta on the activations, y = x @ S^T, next to the base
   output. Forward S @ x^T and grad-x S^T @ gy^T are CSR x dense products (MKL sparse
   BLAS on CPU, cuSPARSE on GPU; the transpose's structure is precomputed in the plan);
   grad-values is `sparse_values_grad`. (A gather/index_add form materialises a
   [tokens, nnz] temporary, 100 MB per 768x768 layer at 512 tokens, 50-100x slower.)
2. `merged_weight_linear` (training): W already holds W + S at the support (the layer
   keeps the trained adapter merged and rewrites those O(nnz) entries when the values
   change), so forward and grad-x are the base layer's own F.linear and the adapter adds
   only grad-values. The same arithmetic as PEFT's clone-and-add forward, with no clone.

`sparse_values_grad`: d loss / d values = (gy^T @ x) sampled at the support: nnz dot
products of length `tokens`, no dense gradient (shira_export._native's tiled C kernel
on CPU, reading gy and x as they are; torch.sparse.sampled_addmm otherwise).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.autograd.graph import increment_version

from shira_export import _native

__all__ = [
    "SparsePlan",
    "gather_flat",
    "merged_weight_linear",
    "scatter_flat_",
    "sparse_linear_delta",
    "sparse_values_grad",
    "storage_index",
]

# fp16/bf16 activations are multiplied in fp32: CPU sparse BLAS has no half kernels, and
# the delta is small next to the base output, so the extra precision is free.
_COMPUTE_DTYPE = torch.float32
# CSR is "beta" in torch 2.x; the warning would fire on the first training step of every run.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


@dataclass(frozen=True)
class SparsePlan:
    """Index structure of one adapter on one layer, built once (indices never change).

    `values` given to `sparse_linear_delta` follow the order of `indices` passed to
    `build` (PEFT's row-major order). `order` maps them to CSR order when they are not
    already row-major. Structures only some paths need (the transpose's CSR, the native
    SDDMM's pattern) are built on first use and kept in `_derived`.
    """

    rows: torch.Tensor  # int64 [nnz], output index, in the caller's order
    cols: torch.Tensor  # int64 [nnz], input index
    shape: tuple[int, int]  # (out, in)
    crow: torch.Tensor  # int64 [out + 1], CSR row pointers of S
    col: torch.Tensor  # int64 [nnz], CSR column indices of S
    order: Optional[torch.Tensor]  # int64 [nnz] or None when the caller's order is CSR order
    _derived: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, indices: torch.Tensor, shape: tuple[int, int]) -> "SparsePlan":
        indices = indices.to(torch.int64)
        out_f, in_f = int(shape[0]), int(shape[1])
        rows, cols = indices[0].contiguous(), indices[1].contiguous()
        key = rows * in_f + cols
        order: Optional[torch.Tensor] = None
        if key.numel() > 1 and not bool((key[1:] >= key[:-1]).all()):
            order = torch.argsort(key, stable=True)
        r_sorted = rows if order is None else rows[order]
        c_sorted = cols if order is None else cols[order]
        return cls(
            rows=rows, cols=cols, shape=(out_f, in_f), crow=_row_pointers(r_sorted, out_f), col=c_sorted, order=order
        )

    @property
    def nnz(self) -> int:
        return int(self.rows.numel())

    def to(self, device: torch.device) -> "SparsePlan":
        if self.rows.device == torch.device(device):
            return self
        moved: dict[str, Any] = {
            k: (None if v is None else v.to(device)) for k, v in self.__dict__.items() if k not in ("shape", "_derived")
        }
        return SparsePlan(shape=self.shape, **moved)

    def _csr_rows(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(self.shape[0], device=self.crow.device), self.crow.diff())

    def transpose(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """S^T's CSR: (row pointers [in + 1], column indices = output index [nnz], perm
        [nnz]: values of S^T = csr_values[perm])."""
        cached = self._derived.get("transpose")
        if cached is None:
            out_f, in_f = self.shape
            r_sorted = self._csr_rows()
            # Sort CSR entries by (col, row); the stable sort keeps rows ascending.
            perm = torch.argsort(self.col * out_f + r_sorted, stable=True)
            cached = self._derived["transpose"] = (_row_pointers(self.col[perm], in_f), r_sorted[perm], perm)
        return cached

    def csr(self, csr_values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, csr_values, self.shape, check_invariants=False)

    def csr_t(self, csr_values: torch.Tensor) -> torch.Tensor:
        t_crow, t_col, perm = self.transpose()
        return torch.sparse_csr_tensor(t_crow, t_col, csr_values[perm], self.shape[::-1], check_invariants=False)

    def sddmm_pattern(self, a_side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The native SDDMM's pattern (crow, bptr, bcol, dest; see _native.sddmm), with
        a = the output side (`"out"`: rows of S) or the input side (`"in"`), results in
        CSR order. Built once per plan and side."""
        cached = self._derived.get(("sddmm", a_side))
        if cached is not None:
            return cached
        out_f, in_f = self.shape
        csr_rows = self._csr_rows()
        rows, cols, n_a, n_b = (
            (csr_rows, self.col, out_f, in_f) if a_side == "out" else (self.col, csr_rows, in_f, out_f)
        )
        width = _native.SDDMM_BLOCK_COLS
        n_blocks = -(-n_b // width)
        block = cols // width
        key = block * n_a + rows
        dest = torch.argsort(key, stable=True)  # blocked position -> CSR position
        counts = torch.bincount(key, minlength=n_blocks * n_a).view(n_blocks, n_a)
        bptr = torch.zeros(n_blocks, n_a + 1, dtype=torch.int64, device=rows.device)
        bptr[:, 1:] = counts.cumsum(1)
        bptr += (counts.sum(1).cumsum(0) - counts.sum(1)).view(-1, 1)  # each block starts where the last ended
        bcol = (cols - block * width)[dest].to(torch.uint8)  # width <= 256
        crow = _row_pointers(rows, n_a)  # bincount: any order
        cached = self._derived[("sddmm", a_side)] = (crow, bptr, bcol, dest.to(torch.int32))
        return cached


def _row_pointers(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """CSR row pointers [n_rows + 1] of entries with these row indices (any order)."""
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return crow


class _SparseDelta(torch.autograd.Function):
    """x2 [T, in] (compute dtype), csr_values [nnz] -> x2 @ S^T [T, out]."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, csr_values: torch.Tensor, plan: SparsePlan) -> torch.Tensor:
        ctx.plan = plan
        ctx.save_for_backward(x2, csr_values)
        # MKL's CSR x dense is fast only with a row-major dense operand: transpose x once.
        return torch.sparse.mm(plan.csr(csr_values), x2.t().contiguous()).t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2, csr_values = ctx.saved_tensors
        plan: SparsePlan = ctx.plan
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.sparse.mm(plan.csr_t(csr_values), grad_out.t().contiguous()).t()
        if ctx.needs_input_grad[1]:
            grad_values = sparse_values_grad(grad_out, x2, plan)
        return grad_x, grad_values, None


def sparse_linear_delta(x: torch.Tensor, values: torch.Tensor, plan: SparsePlan) -> torch.Tensor:
    """x[..., in] -> x @ S^T [..., out] in x's dtype, differentiable in x and values.

    `values` are in the order of the indices the plan was built from (scale applied)."""
    out_f, in_f = plan.shape
    lead = x.shape[:-1]
    if x.shape[-1] != in_f:
        raise ValueError(f"sparse_linear_delta: x has {x.shape[-1]} input features, the plan expects {in_f}")
    if values.shape != (plan.nnz,):
        raise ValueError(f"sparse_linear_delta: values have shape {tuple(values.shape)}, expected ({plan.nnz},)")
    x2 = x.reshape(-1, in_f)
    if x2.shape[0] == 0 or plan.nnz == 0:
        return (x2.new_zeros(x2.shape[0], out_f) + 0 * values.sum().to(x.dtype)).reshape(*lead, out_f)
    plan = plan.to(x.device)
    csr_values = values.to(_COMPUTE_DTYPE)
    if plan.order is not None:
        csr_values = csr_values[plan.order]
    out = _SparseDelta.apply(x2.to(_COMPUTE_DTYPE), csr_values, plan)
    return out.to(x.dtype).reshape(*lead, out_f)


def sparse_values_grad(grad_out: torch.Tensor, x: torch.Tensor, plan: SparsePlan) -> torch.Tensor:
    """d loss / d values for y = x @ S^T: (grad_out^T @ x) sampled at the support, in
    CSR order; [T, out] and [T, in] inputs, nnz dot products of length T."""
    out_f, in_f = plan.shape
    if grad_out.device.type == "cpu" and _native.loaded():
        # Reads gy and x as they are (tiles are transposed in cache), with no copies of
        # them (tools/bench_train.py --ops: "train" vs "torch ops" rows). The rows walked
        # are those of the larger side: the smaller one's tiles are what each thread
        # transposes in full.
        a_side = "out" if out_f >= in_f else "in"
        g32, x32 = grad_out.to(_COMPUTE_DTYPE).contiguous(), x.to(_COMPUTE_DTYPE).contiguous()
        a, b = (g32, x32) if a_side == "out" else (x32, g32)
        return _native.sddmm(a, b, *plan.sddmm_pattern(a_side))
    grad_t = grad_out.to(_COMPUTE_DTYPE).t().contiguous()  # [out, T]
    x_t = x.to(_COMPUTE_DTYPE).t().contiguous()  # [in, T]
    # beta=0 still reads the pattern's values (0 * nan = nan): give it zeros.
    zeros = torch.zeros(plan.nnz, dtype=_COMPUTE_DTYPE, device=grad_t.device)
    # The kernel walks the pattern's rows and gathers rows of its second operand: make
    # that the smaller of the two (measured 8.0 vs 11.1 ms on a 768x3072 layer).
    if in_f <= out_f:
        return torch.sparse.sampled_addmm(plan.csr(zeros), grad_t, x_t.t(), beta=0.0).values()
    grad_tcsr = torch.sparse.sampled_addmm(plan.csr_t(zeros), x_t, grad_t.t(), beta=0.0).values()
    return torch.empty_like(grad_tcsr).index_copy_(0, plan.transpose()[2], grad_tcsr)


class _MergedWeightLinear(torch.autograd.Function):
    """y = x @ W^T + b where W already holds W + S: differentiable in x, the values and
    b. W gets no gradient; the values get the sampled one (nnz dots, no dense grad)."""

    @staticmethod
    def forward(ctx, x2, values, weight, bias, plan, transposed):
        ctx.weight, ctx.plan, ctx.transposed = weight, plan, transposed
        ctx.weight_version = weight._version  # W is not saved as autograd sees it: check by hand
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x2, values)
        return torch.nn.functional.linear(x2, weight.t() if transposed else weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x2, values = ctx.saved_tensors
        weight = ctx.weight
        if weight._version != ctx.weight_version:
            raise RuntimeError(
                "a SHiRA layer's weight was modified in place between this forward and its backward "
                "(an optimizer step, a switch or a merge before backward?): the gradient would be wrong"
            )
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ (weight.t() if ctx.transposed else weight)
        if ctx.needs_input_grad[1]:
            grad_csr = sparse_values_grad(grad_out, x2, ctx.plan).to(values.dtype)
            order = ctx.plan.order
            grad_values = grad_csr if order is None else torch.empty_like(grad_csr).index_copy_(0, order, grad_csr)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.sum(0)
        return grad_x, grad_values, None, grad_bias, None, None


def merged_weight_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    values: torch.Tensor,
    plan: SparsePlan,
    *,
    transposed: bool = False,
) -> torch.Tensor:
    """The training forward of a SHiRA layer whose weight already holds W + S (scale
    applied, in the order of the plan's indices): x @ W^T + b, differentiable in x,
    `values` and b. The backward refuses to run if W was written in between."""
    out_f, in_f = plan.shape
    lead = x.shape[:-1]
    y = _MergedWeightLinear.apply(x.reshape(-1, in_f), values, weight, bias, plan.to(x.device), transposed)
    return y.reshape(*lead, out_f)


# ---- in-place merge / switch: O(nnz) reads and writes into the weight's storage ----------
# Flat positions plus index_select / scatter_ run 3-5x faster than 2-D advanced indexing
# (weight[rows, cols], index_put_) on CPU: measured 0.04 + 0.05 ms vs 0.17 + 0.18 ms per
# 768x768 layer, 1.3 + 1.3 ms vs 10 + 7 ms per 4096x4096 layer (r=32, one thread).


def storage_index(indices: torch.Tensor, shape: tuple[int, int], *, transposed: bool = False) -> torch.Tensor:
    """Flat int64 positions of (out, in) `indices` in a contiguous weight stored as
    (out, in), or as (in, out) when `transposed` (transformers' Conv1D)."""
    rows, cols = indices.to(torch.int64)
    return (cols * int(shape[0]) + rows) if transposed else (rows * int(shape[1]) + cols)


@torch.no_grad()
def gather_flat(weight: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """weight's entries at the flat positions (a copy)."""
    if weight.is_contiguous():
        return weight.view(-1).index_select(0, flat)
    return weight.reshape(-1)[flat]  # a non-contiguous weight: reshape copies, rare


@torch.no_grad()
def scatter_flat_(weight: torch.Tensor, flat: torch.Tensor, src: torch.Tensor) -> None:
    """weight[flat] = src in place (positions unique); the weight's version moves."""
    src = src.to(weight.dtype)
    if _native.available(weight) and flat.dtype == torch.int64 and flat.is_contiguous() and src.is_contiguous():
        _native.scatter_(weight, flat, src)  # two threads keep twice the cache misses in flight
        increment_version(weight)
    elif weight.is_contiguous():
        weight.view(-1).scatter_(0, flat, src)
    else:
        n_cols = weight.shape[1]
        weight.index_put_((flat // n_cols, flat % n_cols), src)
