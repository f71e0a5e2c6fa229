"""Fast x2 bilinear upsampling (``align_corners=False``).

:func:`upsample2x` equals ``F.interpolate(x, scale_factor=2, mode='bilinear',
align_corners=False)`` on (B, C, H, W) tensors, through one of three implementations:
'interpolate' (the reference), 'lerp' (two separable passes of fixed 0.25/0.75 lerps)
and 'triton' (one fused kernel on CUDA channels-last maps). The PUP head uses it for
its fixed x2 steps.

Training (autograd) takes ``F.interpolate``, which CUDA autocast runs in fp32 forward
and backward, with casts on both sides. Where the caller says the result only feeds
autocast convolutions (the head's steps between convs), a CUDA channels-last map in the
autocast dtype instead takes :func:`upsample2x_train`: the Triton kernel forward and
its adjoint stencil backward, fp32 arithmetic and one rounding each, i.e. the values
the next convolution saw before (after its cast) and the input gradient torch's fp32
backward gives after the cast back, up to the order of fp32 sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: The implementation :func:`upsample2x` uses when none is given: 'interpolate'
#: (``F.interpolate``), 'lerp' (:func:`upsample2x_lerp`), 'triton'
#: (:func:`upsample2x_triton`; CUDA channels-last only, else 'lerp') or 'auto' (see
#: :func:`upsample2x`). Benchmarks set it to compare the implementations in one process.
UPSAMPLE_IMPL = "auto"
UPSAMPLE_IMPLS = ("auto", "interpolate", "lerp", "triton")


def _up2_dim(x: Tensor, dim: int) -> Tensor:
    """x2 bilinear (align_corners=False) along ``dim``; out keeps x's memory format.

    out[2i] = 0.75 x[i] + 0.25 x[max(i-1, 0)], out[2i+1] = 0.75 x[i] + 0.25 x[min(i+1, n-1)].
    """
    n = x.shape[dim]
    shape = list(x.shape)
    shape[dim] = 2 * n
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_mem_format(x))
    split = list(x.shape)
    split[dim : dim + 1] = [n, 2]
    pairs = out.view(split)
    even, odd = pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)
    if n == 1:
        even.copy_(x)
        odd.copy_(x)
        return out
    head, tail = x.narrow(dim, 0, n - 1), x.narrow(dim, 1, n - 1)
    torch.lerp(tail, head, 0.25, out=even.narrow(dim, 1, n - 1))
    even.narrow(dim, 0, 1).copy_(x.narrow(dim, 0, 1))
    torch.lerp(head, tail, 0.25, out=odd.narrow(dim, 0, n - 1))
    odd.narrow(dim, n - 1, 1).copy_(x.narrow(dim, n - 1, 1))
    return out


def _mem_format(x: Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if x.is_contiguous(memory_format=torch.channels_last) and not (x.is_contiguous())
        else torch.contiguous_format
    )


def upsample2x_lerp(x: Tensor) -> Tensor:
    """``F.interpolate(x, scale_factor=2, mode='bilinear', align_corners=False)`` of a
    (B, C, H, W) tensor as two separable passes of fixed 0.25/0.75 lerps (edges clamped).

    No autograd (``out=`` ops). Rounds once per pass, so in bf16 it differs from
    ``F.interpolate`` (one rounding) by about one bf16 ulp.
    """
    return _up2_dim(_up2_dim(x, 2), 3)


try:  # optional: the fused CUDA kernel (torch's CUDA wheels ship triton)
    import triton
    import triton.language as tl
except ImportError:  # CPU installs
    triton = None

if triton is not None:  # pragma: no cover - CUDA + triton only

    @triton.jit
    def _up2x_nhwc_kernel(x_ptr, o_ptr, H, W, C: tl.constexpr, BLOCK: tl.constexpr):
        # one program: BLOCK elements of one output row (n, oh) of the (N, 2H, 2W, C) map
        row = tl.program_id(0)
        n = row // (2 * H)
        oh = row % (2 * H)
        src_h = tl.maximum((oh.to(tl.float32) + 0.5) * 0.5 - 0.5, 0.0)
        h0 = src_h.to(tl.int32)
        lh = src_h - h0.to(tl.float32)
        h1 = tl.minimum(h0 + 1, H - 1)
        e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = e < 2 * W * C
        ow = e // C
        c = e % C
        src_w = tl.maximum((ow.to(tl.float32) + 0.5) * 0.5 - 0.5, 0.0)
        w0 = src_w.to(tl.int32)
        lw = src_w - w0.to(tl.float32)
        w1 = tl.minimum(w0 + 1, W - 1)
        base = n.to(tl.int64) * H * W * C
        r0 = x_ptr + base + h0.to(tl.int64) * W * C
        r1 = x_ptr + base + h1.to(tl.int64) * W * C
        a = tl.load(r0 + w0 * C + c, mask=mask).to(tl.float32)
        b = tl.load(r0 + w1 * C + c, mask=mask).to(tl.float32)
        cc = tl.load(r1 + w0 * C + c, mask=mask).to(tl.float32)
        d = tl.load(r1 + w1 * C + c, mask=mask).to(tl.float32)
        out = (1.0 - lh) * ((1.0 - lw) * a + lw * b) + lh * ((1.0 - lw) * cc + lw * d)
        o = o_ptr + row.to(tl.int64) * (2 * W * C) + e
        tl.store(o, out.to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _up2x_adjoint_row(r, j, c, C: tl.constexpr, W, mask):
        # 0.25, 0.75, 0.75, 0.25 of output columns 2j-1, 2j, 2j+1, 2j+2 (clamped) of row r
        a = tl.load(r + tl.maximum(2 * j - 1, 0) * C + c, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(r + (2 * j) * C + c, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(r + (2 * j + 1) * C + c, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(r + tl.minimum(2 * j + 2, 2 * W - 1) * C + c, mask=mask, other=0.0)
        return 0.25 * a + 0.75 * b + 0.75 * d + 0.25 * f.to(tl.float32)

    @triton.jit
    def _up2x_nhwc_backward_kernel(g_ptr, o_ptr, H, W, C: tl.constexpr, BLOCK: tl.constexpr):
        # one program: BLOCK elements of one input row (n, i) of the (N, H, W, C) input
        # gradient, from the (N, 2H, 2W, C) output gradient g. The adjoint of the x2
        # stencil: along each axis, input i receives 0.25, 0.75, 0.75, 0.25 of outputs
        # 2i-1, 2i, 2i+1, 2i+2, with the out-of-range taps clamped to 0 and 2n-1 (the
        # forward's edge clamping).
        row = tl.program_id(0)
        n = row // H
        i = row % H
        e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = e < W * C
        j = e // C
        c = e % C
        base = g_ptr + n.to(tl.int64) * (2 * H) * (2 * W) * C
        stride = (2 * W) * C
        ra = base + tl.maximum(2 * i - 1, 0).to(tl.int64) * stride
        rb = base + (2 * i).to(tl.int64) * stride
        rc = base + (2 * i + 1).to(tl.int64) * stride
        rd = base + tl.minimum(2 * i + 2, 2 * H - 1).to(tl.int64) * stride
        acc = 0.25 * _up2x_adjoint_row(ra, j, c, C, W, mask)
        acc += 0.75 * _up2x_adjoint_row(rb, j, c, C, W, mask)
        acc += 0.75 * _up2x_adjoint_row(rc, j, c, C, W, mask)
        acc += 0.25 * _up2x_adjoint_row(rd, j, c, C, W, mask)
        o = o_ptr + row.to(tl.int64) * (W * C) + e
        tl.store(o, acc.to(o_ptr.dtype.element_ty), mask=mask)


def upsample2x_triton(x: Tensor) -> Tensor:  # pragma: no cover - CUDA + triton only
    """As :func:`upsample2x_lerp` in one Triton kernel (F.interpolate's formula, fp32
    accumulation); x: CUDA, channels-last (B, C, H, W). Output channels-last."""
    b, c, h, w = x.shape
    out = torch.empty(
        (b, c, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last
    )
    block = 1024
    grid = (b * 2 * h, triton.cdiv(2 * w * c, block))
    _up2x_nhwc_kernel[grid](x, out, h, w, C=c, BLOCK=block)
    return out


def _up2x_backward_triton(g: Tensor) -> Tensor:
    """Input gradient (B, C, H, W) channels-last, in g's dtype, of the x2 upsampling
    whose output gradient is g (B, C, 2H, 2W) (made channels-last contiguous)."""
    b, c, h2, w2 = g.shape
    h, w = h2 // 2, w2 // 2
    g = g.contiguous(memory_format=torch.channels_last)
    out = torch.empty(
        (b, c, h, w), dtype=g.dtype, device=g.device, memory_format=torch.channels_last
    )
    block = 1024
    grid = (b * h, triton.cdiv(w * c, block))
    _up2x_nhwc_backward_kernel[grid](g, out, h, w, C=c, BLOCK=block)
    return out


class _Upsample2x(torch.autograd.Function):
    """x2 bilinear upsampling of a channels-last map through the Triton kernels."""

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return upsample2x_triton(x)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        return _up2x_backward_triton(g)


def upsample2x_train(x: Tensor) -> Tensor:
    """Differentiable x2 bilinear upsampling (align_corners=False) of a channels-last
    (B, C, H, W) map: (B, C, 2H, 2W) channels-last in x's dtype, forward and backward
    each one Triton kernel with fp32 arithmetic. CUDA, or the CPU in the interpreter."""
    if triton is None:
        raise RuntimeError("upsample2x_train needs triton")
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(
            f"upsample2x_train needs a channels-last (B, C, H, W) map, got shape "
            f"{tuple(x.shape)} with strides {x.stride()}"
        )
    return _Upsample2x.apply(x)


def _train_ok(x: Tensor) -> bool:
    """Whether :func:`upsample2x` may take :func:`upsample2x_train` for x under autograd."""
    return (
        _triton_ok(x)
        and torch.is_autocast_enabled("cuda")
        and x.dtype == torch.get_autocast_dtype("cuda")
    )


def _triton_ok(x: Tensor) -> bool:
    if not x.is_cuda or x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    return triton is not None


def upsample2x(x: Tensor, impl: str | None = None, feeds_autocast: bool = False) -> Tensor:
    """x2 bilinear upsampling (align_corners=False) of (B, C, H, W), = F.interpolate.

    ``impl`` (default :data:`UPSAMPLE_IMPL`): see there. 'auto': 'triton' on CUDA
    channels-last inputs when triton imports, 'lerp' on other CUDA inputs,
    'interpolate' on the CPU. Whenever autograd needs the result, ``F.interpolate``;
    except with ``feeds_autocast`` (the result only feeds autocast matmuls or
    convolutions, so its rounding to the autocast dtype changes nothing they see) on a
    CUDA channels-last map in the autocast dtype, where 'auto' and 'triton' take
    :func:`upsample2x_train`.
    """
    impl = impl or UPSAMPLE_IMPL
    if impl not in UPSAMPLE_IMPLS:
        raise ValueError(f"upsample2x: unknown impl {impl!r}; choose one of {UPSAMPLE_IMPLS}")
    if impl == "auto":
        impl = ("triton" if _triton_ok(x) else "lerp") if x.is_cuda else "interpolate"
    grad = torch.is_grad_enabled() and x.requires_grad
    if grad and feeds_autocast and impl == "triton" and _train_ok(x):
        return upsample2x_train(x)
    if grad or impl == "interpolate":
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    if impl == "triton" and _triton_ok(x):
        return upsample2x_triton(x)
    return upsample2x_lerp(x)
