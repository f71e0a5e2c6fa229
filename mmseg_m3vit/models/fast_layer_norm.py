"""Inference fast path of a LayerNorm whose output feeds autocast matmuls only.

Under CUDA autocast, ``F.layer_norm`` runs in fp32 and writes fp32, and every consumer
(the qkv projection, the FFN or router and experts, the head's first conv) then casts
that output to the autocast dtype in a pass of its own. :func:`layer_norm_autocast`
writes the normalised rows straight in the autocast dtype from one Triton kernel
(fp32 statistics and affine map, one rounding at the end): the values the consumers
saw before, up to the fp32 rounding of the statistics, with one pass instead of two
and a quarter of the bytes written. It applies where it can (CUDA input under
fp16/bf16 autocast, an ``nn.LayerNorm`` over the last dim, no autograd, triton
installed) and otherwise returns None, so that the caller runs the module itself;
training and float32 inference never take it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

try:  # torch's CUDA wheels ship triton; CPU installs usually do not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

#: 'auto': use the kernel wherever it applies; 'off': never (tests and benchmarks).
FAST_NORM_MODE = "auto"

if triton is not None:

    @triton.jit
    def _layer_norm_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        y_ptr,
        R,
        N,
        stride_xb,
        stride_xn,
        D,
        eps,
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """y[r] = (x[r] - mean) / sqrt(var + eps) * w + b for rows r = (i, n) of x
        (B, N, D) with strides (stride_xb, stride_xn, 1); y (B*N, D) contiguous."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < R
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        src = (rows // N).to(tl.int64) * stride_xb + (rows % N).to(tl.int64) * stride_xn
        x = tl.load(x_ptr + src[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / D
        y = xc * (1.0 / tl.sqrt_rn(var + eps))[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        dst = rows.to(tl.int64)[:, None] * D + cols[None, :]
        tl.store(y_ptr + dst, y.to(y_ptr.dtype.element_ty), mask=mask)


def layer_norm_autocast(norm: nn.Module, x: Tensor) -> Tensor | None:
    """``norm(x)`` in the autocast dtype from one kernel, or None where the fast path
    does not apply (module docstring).

    x (B, N, D) (any strides with unit stride over D) -> (B, N, D) contiguous, in the
    CUDA autocast dtype.
    """
    if FAST_NORM_MODE == "off" or triton is None or not x.is_cuda or x.dim() != 3:
        return None
    if type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1:
        return None
    if not torch.is_autocast_enabled("cuda"):
        return None
    dtype = torch.get_autocast_dtype("cuda")
    if dtype not in (torch.float16, torch.bfloat16) or x.stride(2) != 1:
        return None
    w, b = norm.weight, norm.bias
    if torch.is_grad_enabled() and (
        x.requires_grad or any(t is not None and t.requires_grad for t in (w, b))
    ):
        return None
    bsz, n, d = x.shape
    if d != norm.normalized_shape[0] or d > 8192:
        return None
    y = torch.empty(bsz, n, d, dtype=dtype, device=x.device)
    rows = bsz * n
    if rows == 0:
        return y
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(16, 8192 // block_d))
    _layer_norm_kernel[(triton.cdiv(rows, block_r),)](
        x,
        w if w is not None else x,
        b if b is not None else x,
        y,
        rows,
        n,
        x.stride(0),
        x.stride(1),
        d,
        norm.eps,
        HAS_W=w is not None,
        HAS_B=b is not None,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return y
