"""Fast x2 bilinear upsampling (``align_corners=False``) for inference.

:func:`upsample2x` equals ``F.interpolate(x, scale_factor=2, mode='bilinear',
align_corners=False)`` on (B, C, H, W) tensors, through one of three implementations:
'interpolate' (the reference), 'lerp' (two separable passes of fixed 0.25/0.75 lerps)
and 'triton' (one fused kernel on CUDA channels-last maps). The PUP head uses it for
its fixed x2 steps; training (autograd) always takes ``F.interpolate``.
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


def _triton_ok(x: Tensor) -> bool:
    if not x.is_cuda or x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    return triton is not None


def upsample2x(x: Tensor, impl: str | None = None) -> Tensor:
    """x2 bilinear upsampling (align_corners=False) of (B, C, H, W), = F.interpolate.

    ``impl`` (default :data:`UPSAMPLE_IMPL`): see there. 'auto': 'triton' on CUDA
    channels-last inputs when triton imports, 'lerp' on other CUDA inputs,
    'interpolate' on the CPU. Whenever autograd needs the result, ``F.interpolate``.
    """
    impl = impl or UPSAMPLE_IMPL
    if impl not in UPSAMPLE_IMPLS:
        raise ValueError(f"upsample2x: unknown impl {impl!r}; choose one of {UPSAMPLE_IMPLS}")
    if impl == "auto":
        impl = ("triton" if _triton_ok(x) else "lerp") if x.is_cuda else "interpolate"
    if (torch.is_grad_enabled() and x.requires_grad) or impl == "interpolate":
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    if impl == "triton" and _triton_ok(x):
        return upsample2x_triton(x)
    return upsample2x_lerp(x)
