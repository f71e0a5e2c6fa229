"""Grouped-matmul MoE dispatch: the CUDA fast path of the expert FFN.

Same contract as :func:`.dispatch.sorted_dispatch` (M tokens, D dims, Hd expert hidden
dims, E experts, k experts per token)::

    x (M, D), expert_ids (M, k) int, gates (M, k)
    w1 (E, D, Hd), b1 (E, Hd), w2 (E, Hd, D), b2 (E, D)
    -> (M, D) = sum_j gates[m, j] * (GELU(x[m] @ w1[e] + b1[e]) @ w2[e] + b2[e]),
       e = expert_ids[m, j]

The M*k (token, slot) pairs are sorted by expert once; every expert then runs as one
group of a single ``torch._grouped_mm`` per layer (cuBLAS/CUTLASS grouped GEMM on sm90),
so there is no Python loop over experts and no host synchronisation: group offsets are
computed on the device with ``searchsorted``. Bias handling avoids (M*k, Hd) passes:

- ``b1`` is folded into the first GEMM: each token gets a constant-1 column (padded to
  16-byte rows) and ``w1`` gets ``b1`` as an extra input row;
- ``b2`` is applied after the weighted sum, per token, as ``(gates scattered to (M, E)) @
  b2`` (``sum_j g_j b2[e_j]``), an (M, E) x (E, D) product;
- outputs are un-permuted with a gather (its backward is the inverse gather, not an
  atomic scatter-add) and combined with the gates by one batched (1 x k) @ (k x D)
  product per token, which also yields the gates' gradient.

``torch._grouped_mm`` needs bf16 operands and rows of a multiple of 16 bytes on CUDA, so
:func:`grouped_dispatch` takes this path only for CUDA tensors computed in bf16 (bf16
inputs, or float inputs under bf16 autocast) with D and Hd multiples of 8, and falls back
to :func:`.dispatch.sorted_dispatch` otherwise. :func:`grouped_expert_ffn` runs on any
device where the installed torch implements ``_grouped_mm`` for the dtype (CPU float32
in recent torch), which is how the CPU tests check the indexing and the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import check_dispatch_inputs, register_dispatch, sorted_dispatch

_ROW_ALIGN_BYTES = 16


class _GatherTokens(torch.autograd.Function):
    """Rows ``x[token_of]`` of the expert-sorted assignments; backward sums each token's k rows.

    ``token_of`` (M*k,) maps sorted assignment r to its token; ``inv_order`` (M*k,) maps
    flat assignment ``m*k + j`` to its sorted position. The backward gathers the sorted
    gradient back to flat order and sums over the k slots: no atomics, deterministic.
    """

    @staticmethod
    def forward(ctx, x: Tensor, token_of: Tensor, inv_order: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(inv_order)
        ctx.k = k
        return x.index_select(0, token_of)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (inv_order,) = ctx.saved_tensors
        flat = grad.contiguous().index_select(0, inv_order)
        return flat.view(-1, ctx.k, grad.shape[1]).sum(1), None, None, None


class _PermuteRows(torch.autograd.Function):
    """``y[perm]`` for a permutation ``perm`` with inverse ``inv_perm`` (backward: gather)."""

    @staticmethod
    def forward(ctx, y: Tensor, perm: Tensor, inv_perm: Tensor) -> Tensor:
        ctx.save_for_backward(inv_perm)
        return y.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (inv_perm,) = ctx.saved_tensors
        return grad.contiguous().index_select(0, inv_perm), None, None


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def grouped_expert_ffn(
    x: Tensor,
    expert_ids: Tensor,
    gates: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Dropless top-k expert FFN with one grouped GEMM per layer (shapes: module docstring).

    All operands are cast to ``compute_dtype`` (``torch._grouped_mm`` on CUDA takes bf16
    only); the result is returned in ``compute_dtype``. Differentiable in ``x``,
    ``gates`` and all weights. No host synchronisation.
    """
    m, d = x.shape
    k = expert_ids.shape[1]
    num_experts, _, hd = w1.shape
    device = x.device
    nk = m * k
    flat_ids = expert_ids.reshape(-1).long()
    # Sort the M*k assignments by expert (stable: tokens stay in order inside an expert).
    sorted_ids, order = torch.sort(flat_ids, stable=True)
    token_of = order // k
    inv_order = torch.empty_like(order).scatter_(
        0, order, torch.arange(nk, device=device, dtype=order.dtype)
    )
    # offs[e] = number of assignments to experts <= e (cumulative group ends), int32.
    bounds = torch.arange(1, num_experts + 1, device=device, dtype=sorted_ids.dtype)
    offs = torch.searchsorted(sorted_ids, bounds, out_int32=True)

    # First layer with b1 folded in: x_aug = [x, 1, 0...] (16-byte rows), w1_aug = [w1; b1; 0].
    align = _ROW_ALIGN_BYTES // torch.empty((), dtype=compute_dtype).element_size()
    d_aug = _round_up(d + 1, align)
    xc = x.to(compute_dtype)
    x_aug = torch.cat([xc, xc.new_ones(m, 1), xc.new_zeros(m, d_aug - d - 1)], dim=1)  # (M, D_aug)
    w1_aug = torch.cat(
        [w1, b1.unsqueeze(1), w1.new_zeros(num_experts, d_aug - d - 1, hd)], dim=1
    ).to(compute_dtype)  # (E, D_aug, Hd)
    xs = _GatherTokens.apply(x_aug, token_of, inv_order, k)  # (M*k, D_aug), expert-sorted
    hidden = F.gelu(torch._grouped_mm(xs, w1_aug, offs=offs))  # (M*k, Hd)
    ys = torch._grouped_mm(hidden, w2.to(compute_dtype), offs=offs)  # (M*k, D)

    # Back to (token, slot) order, then out[m] = sum_j g[m, j] * y[m, j] + sum_j g[m, j] b2[e].
    y = _PermuteRows.apply(ys, inv_order, order).view(m, k, d)
    gc = gates.to(compute_dtype)
    gate_dense = gc.new_zeros(m, num_experts).scatter_add(1, expert_ids.long(), gc)  # (M, E)
    bias2 = gate_dense @ b2.to(compute_dtype)  # (M, D)
    out = torch.baddbmm(bias2.unsqueeze(1), gc.unsqueeze(1), y)  # (M, 1, D)
    return out.squeeze(1)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: the autocast dtype when autocast is on, else x's."""
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_usable(x: Tensor, w1: Tensor) -> bool:
    """Whether :func:`grouped_expert_ffn` can serve this call on CUDA.

    Needs CUDA tensors, a torch with ``_grouped_mm``, bf16 compute (bf16 inputs or bf16
    autocast), and D, Hd multiples of 8 (16-byte rows of every GEMM operand).
    """
    return (
        x.is_cuda
        and hasattr(torch, "_grouped_mm")
        and _compute_dtype(x) == torch.bfloat16
        and x.shape[1] % 8 == 0
        and w1.shape[2] % 8 == 0
    )


def grouped_dispatch(
    x: Tensor, expert_ids: Tensor, gates: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor
) -> Tensor:
    """Dispatch entry point (registered as ``'grouped'``): grouped GEMM where usable.

    Falls back to :func:`.dispatch.sorted_dispatch` (same result in the input precision)
    where :func:`grouped_mm_usable` says no, e.g. on CPU or for float32 compute.
    Returns (M, D) in the compute dtype (bf16 on the fast path).
    """
    check_dispatch_inputs(x, expert_ids, gates, w1, b1, w2, b2)
    if not grouped_mm_usable(x, w1):
        return sorted_dispatch(x, expert_ids, gates, w1, b1, w2, b2)
    return grouped_expert_ffn(x, expert_ids, gates, w1, b1, w2, b2, torch.bfloat16)


register_dispatch("grouped", grouped_dispatch)
