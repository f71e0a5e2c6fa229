"""Grouped-matmul MoE dispatch: the CUDA fast path of the expert FFN.

Same contract as :func:`.reference.sorted_dispatch` (M tokens, D dims, Hd expert hidden
dims, E experts, k experts per token)::

    x (M, D), expert_ids (M, k) int, gates (M, k)
    w1 (E, D, Hd), b1 (E, Hd), w2 (E, Hd, D), b2 (E, D)
    -> (M, D) = sum_j gates[m, j] * (GELU(x[m] @ w1[e] + b1[e]) @ w2[e] + b2[e]),
       e = expert_ids[m, j]

The M*k (token, slot) pairs are sorted by expert once; every expert then runs as one
group of a single ``torch._grouped_mm`` per layer (cuBLAS/CUTLASS grouped GEMM on sm90),
so there is no Python loop over experts and no host synchronisation: group offsets are
computed on the device (:func:`sort_by_expert`: sort + searchsorted). Around the GEMMs:

- biases are folded into the GEMMs: the GEMM input gets a constant-1 column (rows
  padded to 16 bytes) and the weight gets the bias as an extra input row;
- tokens are gathered into expert order once; the backward sums each token's k rows
  (a gather, not an atomic scatter-add);
- outputs are un-sorted, gated and summed over the k slots by one ``embedding_bag``;
  its backward is written out in sorted order (:func:`combine_slots`).

``torch._grouped_mm`` needs bf16 operands and rows of a multiple of 16 bytes on CUDA, so
:func:`grouped_dispatch` takes this path only for CUDA tensors computed in bf16 (bf16
inputs, or float inputs under bf16 autocast) with D and Hd multiples of 8, and falls back
to :func:`.reference.sorted_dispatch` otherwise. :func:`grouped_expert_ffn` runs on any
device where the installed torch implements ``_grouped_mm`` for the dtype (CPU float32
in recent torch), which is how the CPU tests check the indexing and the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import check_dispatch_inputs, matmul_dtype, sorted_dispatch

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


class _CombineSlots(torch.autograd.Function):
    """``out[m] = sum_j gates[m, j] * ys[inv_order[m*k + j]]``: un-sort and gate in one step.

    ``ys`` (M*k, D) expert-sorted outputs, ``gates`` (M, k), ``token_of`` (M*k,) token of
    each sorted row. Forward: one ``embedding_bag`` (gather + weight + sum over the k
    slots, no (M, k, D) intermediate). Backward, in sorted order: the gradient rows of
    each assignment's token are gathered once; ``grad_ys = g_sorted * rows`` and
    ``grad_gates`` = row-wise dot products of ``ys`` with them (no batched (1 x k)
    matmuls, whose cuBLAS kernels are slow at this shape, and no atomics).
    """

    @staticmethod
    def forward(
        ctx, ys: Tensor, gates: Tensor, order: Tensor, inv_order: Tensor, token_of: Tensor
    ) -> Tensor:
        m, k = gates.shape
        ctx.save_for_backward(ys, gates, order, inv_order, token_of)
        return F.embedding_bag(inv_order.view(m, k), ys, per_sample_weights=gates, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        ys, gates, order, inv_order, token_of = ctx.saved_tensors
        rows = grad.to(ys.dtype).index_select(0, token_of)  # (M*k, D), sorted order
        grad_ys = grad_gates = None
        if ctx.needs_input_grad[0]:
            grad_ys = rows * gates.reshape(-1).index_select(0, order).unsqueeze(1)
        if ctx.needs_input_grad[1]:
            dots = (ys * rows).sum(-1)  # (M*k,)
            grad_gates = dots.index_select(0, inv_order).view_as(gates)
        return grad_ys, grad_gates, None, None, None


def gather_sorted_rows(x: Tensor, token_of: Tensor, inv_order: Tensor, k: int) -> Tensor:
    """``x[token_of]`` (M*k, D) in expert-sorted order; the backward sums each token's k rows.

    ``token_of`` (M*k,) token of each sorted row, ``inv_order`` (M*k,) sorted position of
    each flat assignment ``m*k + j`` (from :func:`sort_by_expert`).
    """
    return _GatherTokens.apply(x, token_of, inv_order, k)


def combine_slots(
    ys: Tensor, gates: Tensor, order: Tensor, inv_order: Tensor, token_of: Tensor
) -> Tensor:
    """(M, D) ``out[m] = sum_j gates[m, j] * ys[inv_order[m*k + j]]`` for expert-sorted
    rows ``ys`` (M*k, D); differentiable in ``ys`` and ``gates``."""
    return _CombineSlots.apply(ys, gates, order, inv_order, token_of)


def sort_by_expert(expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stable sort of the M*k (token, slot) assignments by expert, on the device.

    Args:
        expert_ids: (M, k) expert per token and slot, in [0, E).
        num_experts: E.

    Returns:
        ``(order, inv_order, offs)``: ``order`` (M*k,) flat assignment index at each
        sorted position (``flat = m*k + j``); ``inv_order`` (M*k,) its inverse (sorted
        position of each flat assignment); ``offs`` (E,) int32 cumulative group ends,
        the ``offs`` argument of ``torch._grouped_mm``. No host synchronisation.
    """
    flat = expert_ids.reshape(-1).long()
    sorted_ids, order = torch.sort(flat, stable=True)
    positions = torch.arange(flat.shape[0], device=flat.device)
    inv_order = torch.empty_like(order).scatter_(0, order, positions)
    bounds = torch.arange(1, num_experts + 1, device=flat.device, dtype=sorted_ids.dtype)
    offs = torch.searchsorted(sorted_ids, bounds, out_int32=True)
    return order, inv_order, offs


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _augmented_dims(d: int, hd: int, dtype: torch.dtype) -> tuple[int, int]:
    """(D_aug, Hd_aug): D + 1 and Hd + 1 (the bias column) rounded up to 16-byte rows."""
    align = _ROW_ALIGN_BYTES // torch.empty((), dtype=dtype).element_size()
    return _round_up(d + 1, align), _round_up(hd + 1, align)


def _with_bias_row(w: Tensor, b: Tensor, k_aug: int, dtype: torch.dtype) -> Tensor:
    """(E, K, N) weights + (E, N) bias -> (E, K_aug, N) = [w; b; 0], cast to ``dtype``."""
    e, k, n = w.shape
    return torch.cat([w, b.unsqueeze(1), w.new_zeros(e, k_aug - k - 1, n)], dim=1).to(dtype)


def _with_ones_column(a: Tensor, k_aug: int) -> Tensor:
    """(R, K) rows -> (R, K_aug) = [a, 1, 0...] (pairs with :func:`_with_bias_row`)."""
    r, k = a.shape
    return torch.cat([a, a.new_ones(r, 1), a.new_zeros(r, k_aug - k - 1)], dim=1)


def grouped_rows_ffn(
    rows: Tensor,
    offs: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Expert FFN on rows already grouped by expert: two grouped GEMMs, biases folded in.

    Args:
        rows: (R, D) rows, expert 0's first; their trailing columns need not be aligned.
        offs: (E,) int32 cumulative group ends (``offs[-1] == R``).
        w1 (E, D, Hd), b1 (E, Hd), w2 (E, Hd, D), b2 (E, D): expert weights.
        compute_dtype: operand dtype of ``torch._grouped_mm`` (bf16 on CUDA).

    Returns:
        (R, D) in ``compute_dtype``: row r through the FFN of the expert whose group holds r.
    """
    d, hd = w1.shape[1], w1.shape[2]
    d_aug, hd_aug = _augmented_dims(d, hd, compute_dtype)
    xs = _with_ones_column(rows.to(compute_dtype), d_aug)  # (R, D_aug)
    hidden = F.gelu(torch._grouped_mm(xs, _with_bias_row(w1, b1, d_aug, compute_dtype), offs=offs))
    w2_aug = _with_bias_row(w2, b2, hd_aug, compute_dtype)  # (E, Hd_aug, D)
    return torch._grouped_mm(_with_ones_column(hidden, hd_aug), w2_aug, offs=offs)


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
    order, inv_order, offs = sort_by_expert(expert_ids, num_experts)
    token_of = order // k
    # Biases ride along as an extra input row of each weight against a constant-1 input
    # column; rows are padded to 16 bytes, as the grouped GEMM requires. The column is
    # added to the M tokens before the gather (cheaper than to the M*k rows).
    d_aug, hd_aug = _augmented_dims(d, hd, compute_dtype)
    x_aug = _with_ones_column(x.to(compute_dtype), d_aug)  # (M, D_aug)
    xs = gather_sorted_rows(x_aug, token_of, inv_order, k)  # (M*k, D_aug), expert-sorted
    w1_aug = _with_bias_row(w1, b1, d_aug, compute_dtype)  # (E, D_aug, Hd)
    hidden = F.gelu(torch._grouped_mm(xs, w1_aug, offs=offs))  # (M*k, Hd)
    w2_aug = _with_bias_row(w2, b2, hd_aug, compute_dtype)  # (E, Hd_aug, D)
    ys = torch._grouped_mm(_with_ones_column(hidden, hd_aug), w2_aug, offs=offs)  # (M*k, D)
    return combine_slots(ys, gates.to(compute_dtype), order, inv_order, token_of)


def grouped_mm_usable(x: Tensor, w1: Tensor) -> bool:
    """Whether :func:`grouped_expert_ffn` can serve this call on CUDA.

    Needs CUDA tensors, a torch with ``_grouped_mm``, bf16 compute (bf16 inputs or bf16
    autocast), and D, Hd multiples of 8 (16-byte rows of every GEMM operand).
    """
    return (
        x.is_cuda
        and hasattr(torch, "_grouped_mm")
        and matmul_dtype(x) == torch.bfloat16
        and x.shape[1] % 8 == 0
        and w1.shape[2] % 8 == 0
    )


def grouped_dispatch(
    x: Tensor, expert_ids: Tensor, gates: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor
) -> Tensor:
    """Dispatch entry point (``'grouped'``): grouped GEMM where usable.

    Falls back to :func:`.reference.sorted_dispatch` (same result in the input precision)
    where :func:`grouped_mm_usable` says no, e.g. on CPU or for float32 compute.
    Returns (M, D) in the compute dtype (bf16 on the fast path).
    """
    check_dispatch_inputs(x, expert_ids, gates, w1, b1, w2, b2)
    if not grouped_mm_usable(x, w1):
        return sorted_dispatch(x, expert_ids, gates, w1, b1, w2, b2)
    return grouped_expert_ffn(x, expert_ids, gates, w1, b1, w2, b2, torch.bfloat16)
