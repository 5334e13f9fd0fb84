"""The sparse delta of a SHiRA layer applied to activations: y = x @ S^T where S is
(out, in) with values at fixed indices. Cost follows nnz, never out*in.

Formulation (measured in tools/bench_train.py; the gather/index_add form materialises a
[tokens, nnz] tensor, 100 MB per 768x768 layer at 512 tokens, and is 50-100x slower):

- forward     y^T  = S   @ x^T         CSR x dense (MKL sparse BLAS on CPU, cuSPARSE on GPU)
- grad x      gx^T = S^T @ gy^T        CSR of the transpose, its structure precomputed
- grad values gv   = (gy^T @ x)[rows, cols]   a sampled dense-dense product
                                       (torch.sparse.sampled_addmm): nnz dot products of
                                       length `tokens`, no dense (out, in) gradient.

Nothing of the size of the weight is allocated or copied on any call.
"""

from __future__ import annotations

from dataclasses import dataclass
import warnings
from typing import Optional

import torch

__all__ = ["SparsePlan", "sparse_linear_delta"]

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
    already row-major; `t_perm` maps CSR-ordered values to the transpose's CSR order.
    """

    rows: torch.Tensor  # int64 [nnz], output index, in the caller's order
    cols: torch.Tensor  # int64 [nnz], input index
    shape: tuple[int, int]  # (out, in)
    crow: torch.Tensor  # int64 [out + 1], CSR row pointers of S
    col: torch.Tensor  # int64 [nnz], CSR column indices of S
    t_crow: torch.Tensor  # int64 [in + 1], CSR row pointers of S^T
    t_col: torch.Tensor  # int64 [nnz], CSR column indices of S^T (= output index)
    t_perm: torch.Tensor  # int64 [nnz]: values of S^T = csr_values[t_perm]
    order: Optional[torch.Tensor]  # int64 [nnz] or None when the caller's order is CSR order

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
        crow = _row_pointers(r_sorted, out_f)
        # Transpose: sort CSR entries by (col, row); the stable sort keeps rows ascending.
        t_perm = torch.argsort(c_sorted * out_f + r_sorted, stable=True)
        t_crow = _row_pointers(c_sorted[t_perm], in_f)
        return cls(
            rows=rows,
            cols=cols,
            shape=(out_f, in_f),
            crow=crow,
            col=c_sorted,
            t_crow=t_crow,
            t_col=r_sorted[t_perm].contiguous(),
            t_perm=t_perm,
            order=order,
        )

    @property
    def nnz(self) -> int:
        return int(self.rows.numel())

    def to(self, device: torch.device) -> "SparsePlan":
        if self.rows.device == torch.device(device):
            return self
        moved = {k: (None if v is None else v.to(device)) for k, v in self.__dict__.items() if k != "shape"}
        return SparsePlan(shape=self.shape, **moved)

    def csr(self, csr_values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, csr_values, self.shape, check_invariants=False)

    def csr_t(self, csr_values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(
            self.t_crow, self.t_col, csr_values[self.t_perm], self.shape[::-1], check_invariants=False
        )


def _row_pointers(sorted_rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=sorted_rows.device)
    crow[1:] = torch.bincount(sorted_rows, minlength=n_rows).cumsum(0)
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
        grad_t = grad_out.t().contiguous()  # [out, T]
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.sparse.mm(plan.csr_t(csr_values), grad_t).t()
        if ctx.needs_input_grad[1]:
            # beta=0 still reads the pattern's values (0 * nan = nan): give it zeros.
            pattern = plan.csr(torch.zeros_like(csr_values))
            grad_values = torch.sparse.sampled_addmm(pattern, grad_t, x2, beta=0.0).values()
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
