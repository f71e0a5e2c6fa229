"""Fast x2 upsampling of the PUP head against F.interpolate and a float64 reference."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmseg_m3vit  # noqa: F401  (registers everything)
from mmseg_m3vit.models.decode_heads import PUPHead, upsample
from mmseg_m3vit.models.decode_heads.upsample import upsample2x, upsample2x_lerp
from mmseg_m3vit.models.moe import fused

SHAPES = [(2, 3, 1, 1), (1, 2, 1, 5), (2, 4, 3, 7), (1, 3, 5, 2), (2, 17, 6, 8), (1, 16, 4, 5)]


def _ref_np(x: np.ndarray) -> np.ndarray:
    """Hand-written x2 bilinear, align_corners=False (half-pixel centres, clamped)."""
    b, c, h, w = x.shape
    out = np.zeros((b, c, 2 * h, 2 * w))

    def src(o: int, n: int) -> tuple[int, int, float]:
        s = max((o + 0.5) / 2 - 0.5, 0.0)
        i0 = int(np.floor(s))
        return i0, min(i0 + 1, n - 1), s - i0

    for oy in range(2 * h):
        y0, y1, ly = src(oy, h)
        for ox in range(2 * w):
            x0, x1, lx = src(ox, w)
            out[:, :, oy, ox] = (1 - ly) * ((1 - lx) * x[:, :, y0, x0] + lx * x[:, :, y0, x1]) + (
                ly * ((1 - lx) * x[:, :, y1, x0] + lx * x[:, :, y1, x1])
            )
    return out


def _rand(shape, seed, dtype=torch.float64, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_lerp_matches_float64_reference(shape, channels_last) -> None:
    x = _rand(shape, seed=sum(shape), channels_last=channels_last)
    out = upsample2x_lerp(x)
    ref = torch.from_numpy(_ref_np(x.numpy()))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        out, F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    )
    if channels_last and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_lerp_low_precision_against_float64(dtype, tol) -> None:
    x64 = _rand((2, 16, 7, 9), seed=3)
    ref = F.interpolate(x64, scale_factor=2, mode="bilinear", align_corners=False)
    for cl in (False, True):
        x = x64.to(dtype)
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        out = upsample2x_lerp(x)
        assert out.dtype == dtype and torch.isfinite(out).all()
        err = (out.double() - ref).norm() / ref.norm()
        assert err < tol, (cl, float(err))


def test_upsample2x_dispatch_and_autograd() -> None:
    x = _rand((1, 2, 3, 4), seed=5, dtype=torch.float32).requires_grad_(True)
    with pytest.raises(ValueError, match="unknown impl"):
        upsample2x(x.detach(), impl="nearest")
    # autograd needs the result: F.interpolate, gradients as F.interpolate's
    out = upsample2x(x, impl="lerp")
    out.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    F.interpolate(x2, scale_factor=2, mode="bilinear").square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    with torch.no_grad():  # triton requested on the CPU: lerp fallback, same values
        torch.testing.assert_close(upsample2x(x, impl="triton"), out.detach())
        torch.testing.assert_close(upsample2x(x, impl="auto"), out.detach())


def _head(align_corners: bool) -> PUPHead:
    torch.manual_seed(0)
    head = PUPHead(
        "semseg",
        5,
        dict(type="PixelCrossEntropyLoss"),
        in_channels=8,
        channels=6,
        align_corners=align_corners,
    )
    for m in head.modules():  # non-trivial BN statistics for the eval path
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return head.eval()


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("grid,out_size", [((3, 5), None), ((3, 5), (45, 77)), ((2, 2), (32, 32))])
def test_head_fast_path_equals_interpolate(monkeypatch, align_corners, grid, out_size) -> None:
    head = _head(align_corners)
    tokens = torch.randn(2, 1 + grid[0] * grid[1], 8)
    outs = {}
    for impl in ("interpolate", "lerp"):
        monkeypatch.setattr(upsample, "UPSAMPLE_IMPL", impl)
        with torch.inference_mode():
            outs[impl] = head(tokens, grid, out_size)
    expect = out_size or (16 * grid[0], 16 * grid[1])
    assert outs["lerp"].shape == (2, 5, *expect)
    torch.testing.assert_close(outs["lerp"], outs["interpolate"], rtol=1e-5, atol=1e-5)


def test_head_training_path_unchanged(monkeypatch) -> None:
    head = _head(False).train()
    tokens = torch.randn(2, 1 + 6, 8)
    grads = []
    for impl in ("interpolate", "lerp"):
        monkeypatch.setattr(upsample, "UPSAMPLE_IMPL", impl)
        head.zero_grad()
        torch.manual_seed(1)
        head(tokens, (2, 3)).square().mean().backward()
        grads.append(head.convs[0].conv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_head_folded_bn_matches_float64(monkeypatch) -> None:
    """Eval head under bf16 autocast without autograd: conv + BN + ReLU run as one
    folded cuDNN call; against the float64 head its error is within 2e-2 and within
    1.5x (+1e-3) of the unfused bf16 path's own error; the folded weights follow an
    in-place BN update; training, float32 and autograd calls keep the unfused path."""
    from mmseg_m3vit.models.decode_heads import conv_fold

    torch.manual_seed(0)
    head = PUPHead("semseg", 5, dict(type="PixelCrossEntropyLoss"), in_channels=32, channels=16)
    for m in head.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    head = head.eval()
    calls = []
    real = torch.cudnn_convolution_relu
    monkeypatch.setattr(torch, "cudnn_convolution_relu", lambda *a: calls.append(1) or real(*a))
    tokens = torch.randn(2, 1 + 4 * 5, 32)

    def cuda_run(mode: str) -> torch.Tensor:
        monkeypatch.setattr(conv_fold, "FOLD_MODE", mode)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            return head(tokens.cuda(), (4, 5)).float()

    head = head.cuda()
    for _ in range(2):
        with torch.inference_mode():
            ref = copy.deepcopy(head).double().cpu()(tokens.double(), (4, 5))
        before = len(calls)
        fast = cuda_run("auto")
        assert len(calls) - before == 4  # the 4 conv + BN + ReLU modules
        off = cuda_run("off")
        assert len(calls) - before == 4
        err, base = _rel(fast, ref), _rel(off, ref)
        assert err < 2e-2 and err <= 1.5 * base + 1e-3, (err, base)
        with torch.no_grad():  # in place (same storage): the folded weights must follow
            head.convs[1].bn.running_mean.add_(0.25)
            head.convs[2].bn.weight.mul_(1.5)
    n = len(calls)
    with torch.inference_mode():
        head(tokens.cuda(), (4, 5))  # float32: unfused
    with torch.autocast("cuda", dtype=torch.bfloat16):
        head(tokens.cuda(), (4, 5))  # autograd on: unfused
        head.train()(tokens.cuda(), (4, 5))  # training: unfused
    assert len(calls) == n


#: Where the upsampling kernels run: CUDA, else Triton's CPU interpreter, else nowhere.
KERNEL_DEVICE = (
    None
    if upsample.triton is None
    else "cuda"
    if torch.cuda.is_available()
    else ("cpu" if fused.INTERPRET else None)
)
requires_kernels = pytest.mark.skipif(
    KERNEL_DEVICE is None, reason="needs CUDA + triton (or TRITON_INTERPRET=1 with triton)"
)


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("shape", SHAPES)
def test_upsample2x_train_matches_float64(shape) -> None:
    """The differentiable Triton x2 upsampling in float32 (forward kernel and the adjoint
    stencil backward) against float64 F.interpolate and its autograd, edges and maps of
    one row or column included."""
    x64 = _rand(shape, seed=sum(shape) + 1)
    g64 = _rand((shape[0], shape[1], 2 * shape[2], 2 * shape[3]), seed=sum(shape) + 2)
    x = x64.float().contiguous(memory_format=torch.channels_last).to(KERNEL_DEVICE)
    x.requires_grad_(True)
    out = upsample.upsample2x_train(x)
    out.backward(g64.float().to(KERNEL_DEVICE))
    xr = x64.clone().requires_grad_(True)
    ref = F.interpolate(xr, scale_factor=2, mode="bilinear", align_corners=False)
    ref.backward(g64)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert _rel(out, ref) < 1e-6 and _rel(x.grad, xr.grad) < 1e-6
    torch.testing.assert_close(x.grad.double().cpu(), xr.grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="channels-last"):
        upsample.upsample2x_train(torch.randn(1, 3, 4, 5, device=KERNEL_DEVICE))


@pytest.mark.gpu
@requires_kernels
def test_upsample2x_train_bf16_rounds_once() -> None:
    """bf16 map: forward and input gradient are the float32 results rounded once to bf16
    (at most one bf16 ulp apart; the interpreter truncates instead of rounding)."""
    x = _rand((2, 16, 5, 7), seed=11, dtype=torch.bfloat16, channels_last=True)
    g = _rand((2, 16, 10, 14), seed=12, dtype=torch.bfloat16, channels_last=True)
    xd = x.to(KERNEL_DEVICE, copy=True).requires_grad_(True)
    out = upsample.upsample2x_train(xd)
    out.backward(g.to(KERNEL_DEVICE))
    x32 = x.float().requires_grad_(True)
    ref = F.interpolate(x32, scale_factor=2, mode="bilinear", align_corners=False)
    ref.backward(g.float())
    assert out.dtype == xd.grad.dtype == torch.bfloat16
    ulp = 2.0**-7
    torch.testing.assert_close(out.float().cpu(), ref.detach(), rtol=ulp, atol=1e-6)
    torch.testing.assert_close(xd.grad.float().cpu(), x32.grad, rtol=ulp, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_head_training_upsampling_under_autocast(monkeypatch) -> None:
    """Train-mode head under bf16 autocast: the x2 steps between convs take the Triton
    autograd path (and only those: the logits' step keeps F.interpolate in fp32); its
    gradients against the float64 head are within 1.5x (+1e-3) of the error of the same
    step through F.interpolate."""
    torch.manual_seed(0)
    head = PUPHead("semseg", 5, dict(type="PixelCrossEntropyLoss"), in_channels=32, channels=16)
    tokens = torch.randn(2, 1 + 4 * 5, 32)
    proj = torch.randn(5, 64, 80, dtype=torch.float64)

    def grads(model, t, autocast: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(t, (4, 5))
        (out.double() * proj.to(t.device)).sum().square().backward()
        return {n: p.grad.detach().double().cpu() for n, p in model.named_parameters()}

    ref = grads(copy.deepcopy(head).double().train(), tokens.double(), False)
    head = head.cuda().train()
    calls = []
    real = upsample.upsample2x_train
    monkeypatch.setattr(upsample, "upsample2x_train", lambda x: calls.append(x.shape) or real(x))
    fast = grads(head, tokens.cuda(), True)
    assert len(calls) == head.num_up  # the steps between convs, not the logits' step
    monkeypatch.setattr(upsample, "UPSAMPLE_IMPL", "interpolate")
    base = grads(head, tokens.cuda(), True)
    assert len(calls) == head.num_up
    for name in ("convs.0.conv.weight", "convs.2.conv.weight", "conv_seg.weight"):
        err, base_err = _rel(fast[name], ref[name]), _rel(base[name], ref[name])
        assert err <= 1.5 * base_err + 1e-3, (name, err, base_err)
