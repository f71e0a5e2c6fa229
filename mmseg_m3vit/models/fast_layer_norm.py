"""Fast path of a LayerNorm whose output feeds autocast matmuls only.

Under CUDA autocast, ``F.layer_norm`` runs in fp32 and writes fp32, and every consumer
(the qkv projection, the FFN or router and experts, the head's first conv) then casts
that output to the autocast dtype in a pass of its own. :func:`layer_norm_autocast`
writes the normalised rows straight in the autocast dtype from one Triton kernel
(fp32 statistics and affine map, one rounding at the end): the values the consumers
saw before, up to the fp32 rounding of the statistics, with one pass instead of two
and a quarter of the bytes written.

In training the same kernel also stores each row's mean and 1/std (fp32), and the
backward is one kernel as well: it reads the autocast-dtype output gradient as it is
(no cast pass to fp32), writes the input gradient in the input's dtype, and sums the
weight and bias gradients per program into a (programs, D) fp32 buffer that one small
``sum`` reduces (torch's column reduction over 38k rows of 384 is the slowest LayerNorm
kernel of a train step). The gradients are torch's fp32 LayerNorm gradients of the
same rows, up to the order of fp32 sums.

It applies where it can (CUDA input under fp16/bf16 autocast, an ``nn.LayerNorm`` over
the last dim of a (B, N, D) tensor, triton installed) and otherwise returns None, so
that the caller runs the module itself; float32 runs never take it.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

try:  # torch's CUDA wheels ship triton; CPU installs usually do not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

#: 'auto': use the kernels wherever they apply; 'off': never (tests and benchmarks).
FAST_NORM_MODE = "auto"
#: Largest normalised dim the one-block-per-row kernels take.
MAX_DIM = 8192

if triton is not None:

    @triton.jit
    def _layer_norm_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        y_ptr,
        mean_ptr,
        rstd_ptr,
        R,
        N,
        stride_xb,
        stride_xn,
        D,
        eps,
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
        STATS: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """y[r] = (x[r] - mean) / sqrt(var + eps) * w + b for rows r = (i, n) of x
        (B, N, D) with strides (stride_xb, stride_xn, 1); y (B*N, D) contiguous; with
        STATS also mean[r] and rstd[r] = 1 / sqrt(var + eps) (fp32)."""
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
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        y = xc * rstd[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        dst = rows.to(tl.int64)[:, None] * D + cols[None, :]
        tl.store(y_ptr + dst, y.to(y_ptr.dtype.element_ty), mask=mask)
        if STATS:
            tl.store(mean_ptr + rows, mean, mask=rmask)
            tl.store(rstd_ptr + rows, rstd, mask=rmask)

    @triton.jit
    def _layer_norm_backward_kernel(
        x_ptr,
        w_ptr,
        dy_ptr,
        mean_ptr,
        rstd_ptr,
        dx_ptr,
        dw_ptr,
        db_ptr,
        R,
        N,
        stride_xb,
        stride_xn,
        D,
        rows_per_program,
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Gradients of the LayerNorm above for the rows [p * rows_per_program, ...) of
        program p: dx (B*N, D) contiguous in dx's dtype from dy (B*N, D) contiguous;
        this program's sums over its rows of dy * xhat and dy into row p of dw, db
        (programs, D) fp32."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
        db = tl.zeros((BLOCK_D,), dtype=tl.float32)
        first = pid * rows_per_program
        for i in range(0, rows_per_program, BLOCK_R):
            local = i + tl.arange(0, BLOCK_R)
            rows = first + local
            rmask = (rows < R) & (local < rows_per_program)
            mask = rmask[:, None] & cmask[None, :]
            src = (rows // N).to(tl.int64) * stride_xb + (rows % N).to(tl.int64) * stride_xn
            x = tl.load(x_ptr + src[:, None] + cols[None, :], mask=mask, other=0.0)
            mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
            xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
            off = rows.to(tl.int64)[:, None] * D + cols[None, :]
            dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
            wdy = dy * w[None, :] if HAS_W else dy
            c1 = tl.sum(xhat * wdy, axis=1) / D
            c2 = tl.sum(wdy, axis=1) / D
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if HAS_W:
                dw += tl.sum(dy * xhat, axis=0)
            if HAS_B:
                db += tl.sum(dy, axis=0)
        if HAS_W:
            tl.store(dw_ptr + pid * D + cols, dw, mask=cmask)
        if HAS_B:
            tl.store(db_ptr + pid * D + cols, db, mask=cmask)


def _block_rows(d: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D) for rows of d elements: up to 8192 elements per block."""
    block_d = triton.next_power_of_2(d)
    return max(1, min(16, 8192 // block_d)), block_d


def _forward(
    x: Tensor, w: Tensor | None, b: Tensor | None, eps: float, dtype: torch.dtype, stats: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """y (B, N, D) in ``dtype`` and, with ``stats``, mean and rstd (B*N,) fp32."""
    bsz, n, d = x.shape
    rows = bsz * n
    y = torch.empty(bsz, n, d, dtype=dtype, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device) if stats else None
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device) if stats else None
    if rows == 0:
        return y, mean, rstd
    block_r, block_d = _block_rows(d)
    _layer_norm_kernel[(triton.cdiv(rows, block_r),)](
        x,
        w if w is not None else x,
        b if b is not None else x,
        y,
        mean if stats else y,
        rstd if stats else y,
        rows,
        n,
        x.stride(0),
        x.stride(1),
        d,
        eps,
        HAS_W=w is not None,
        HAS_B=b is not None,
        STATS=stats,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return y, mean, rstd


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 for the CPU interpreter)."""
    return (
        torch.cuda.get_device_properties(device).multi_processor_count
        if device.type == "cuda"
        else 4
    )


def _programs(x: Tensor, rows: int, block_r: int) -> int:
    """Backward programs: about 4 per SM (each sums its rows' dw, db), at least 1."""
    return max(1, min(4 * _sm_count(x.device), triton.cdiv(rows, block_r)))


class _LayerNormRows(torch.autograd.Function):
    """Differentiable LayerNorm over the last dim of (B, N, D), output in ``dtype``."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, dtype):  # noqa: D102
        y, mean, rstd = _forward(x, weight, bias, eps, dtype, stats=True)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, w, mean, rstd = ctx.saved_tensors
        bsz, n, d = x.shape
        rows = bsz * n
        dx = torch.empty(bsz, n, d, dtype=x.dtype, device=x.device)
        block_r, block_d = _block_rows(d)
        progs = _programs(x, rows, block_r)
        per_prog = triton.cdiv(triton.cdiv(rows, progs), block_r) * block_r
        progs = triton.cdiv(rows, per_prog) if rows else 0
        dw = torch.empty(progs, d, dtype=torch.float32, device=x.device) if w is not None else None
        db = (
            torch.empty(progs, d, dtype=torch.float32, device=x.device)
            if ctx.bias_dtype is not None
            else None
        )
        if progs:
            _layer_norm_backward_kernel[(progs,)](
                x,
                w if w is not None else x,
                dy.contiguous(),
                mean,
                rstd,
                dx,
                dw if dw is not None else dx,
                db if db is not None else dx,
                rows,
                n,
                x.stride(0),
                x.stride(1),
                d,
                per_prog,
                HAS_W=w is not None,
                HAS_B=db is not None,
                BLOCK_R=block_r,
                BLOCK_D=block_d,
                num_warps=4,
            )
        # (0, D) partial sums (no rows) sum to zeros
        want_w, want_b = ctx.needs_input_grad[1:3]
        grad_w = dw.sum(0).to(w.dtype) if dw is not None and want_w else None
        grad_b = db.sum(0).to(ctx.bias_dtype) if db is not None and want_b else None
        return dx, grad_w, grad_b, None, None


def layer_norm_rows(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, dtype: torch.dtype
) -> Tensor:
    """LayerNorm over the last dim of x (B, N, D) (unit stride over D, any other
    strides), output (B, N, D) contiguous in ``dtype``, from the Triton kernels; with
    autograd when x, ``weight`` or ``bias`` require grad. Statistics and affine map in
    fp32; the input gradient comes back in x's dtype, weight and bias gradients in
    theirs. Runs on CUDA, or on the CPU in Triton's interpreter."""
    if triton is None:
        raise RuntimeError("layer_norm_rows needs triton")
    if x.dim() != 3 or x.stride(2) != 1 or x.shape[2] > MAX_DIM:
        raise ValueError(
            f"layer_norm_rows needs x (B, N, D) with unit stride over D <= {MAX_DIM}, "
            f"got shape {tuple(x.shape)}, strides {x.stride()}"
        )
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    )
    if grad:
        return _LayerNormRows.apply(x, weight, bias, eps, dtype)
    return _forward(x, weight, bias, eps, dtype, stats=False)[0]


def layer_norm_autocast(norm: nn.Module, x: Tensor) -> Tensor | None:
    """``norm(x)`` in the autocast dtype from one kernel (forward and, with autograd,
    backward), or None where the fast path does not apply (module docstring).

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
    if x.shape[2] != norm.normalized_shape[0] or x.shape[2] > MAX_DIM:
        return None
    return layer_norm_rows(x, norm.weight, norm.bias, norm.eps, dtype)
