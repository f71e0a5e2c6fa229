"""PUP head x2 upsampling on a GPU: micro-benchmark + part (c) per implementation.

    python tools/analysis_tools/benchmark_upsample.py [--impls interpolate,lerp,triton]

1. Device copy ceiling (1 GiB device-to-device copy, bytes read + written).
2. Each x2 upsampling of the head at batch 64 (bf16, channels-last, as the head sees
   them under autocast): F.interpolate vs :func:`upsample2x_lerp` vs
   :func:`upsample2x_triton`; error against F.interpolate in float32 on the same bf16
   input (outputs poisoned first), GPU ms (median, launches hidden) and GB/s of the
   minimal traffic (input read once + output written once).
3. ``benchmark.py`` part (c) at batch 64, once per implementation
   (``upsample.UPSAMPLE_IMPL``), in this one process: same GPU, same peak.
"""

from __future__ import annotations

import argparse
import os.path as osp
import sys

import torch
import torch.nn.functional as F

HERE = osp.dirname(osp.abspath(__file__))
sys.path.insert(0, osp.dirname(osp.dirname(HERE)))
sys.path.insert(0, HERE)

import benchmark  # noqa: E402

from mmseg_m3vit.models.decode_heads import upsample  # noqa: E402

FNS = {
    "interpolate": lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False),
    "lerp": upsample.upsample2x_lerp,
    "triton": upsample.upsample2x_triton,
}
# (C, H, W) of the inputs of the head's four x2 upsamplings at 480x640 (semseg, 40 classes)
STAGES = [(256, 30, 40), (256, 60, 80), (256, 120, 160), (40, 240, 320)]


def poison() -> None:
    """Fill the allocator's cached blocks with NaN so that unwritten outputs show."""
    free = torch.cuda.mem_get_info()[0]
    junk = torch.full((int(free * 0.5) // 2,), float("nan"), device="cuda", dtype=torch.bfloat16)
    del junk


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impls", default="interpolate,lerp,triton")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    impls = args.impls.split(",")
    dev = "cuda"
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}\n", flush=True)
    a = torch.randn(2**29, device=dev, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = benchmark.bench(lambda a=a, b=b: b.copy_(a), dev, 3, 20)
    print(f"copy ceiling: {2 * a.numel() * 2 / ms / 1e6:.0f} GB/s (1 GiB d2d)\n", flush=True)
    del a, b

    ok = {impl: True for impl in impls}
    # correctness first: odd sizes too, fresh random inputs, poisoned memory
    for shape in [(3, 40, 7, 9), (2, 256, 5, 3), (1, 16, 1, 1), (64, 40, 24, 32)]:
        x = torch.randn(shape, device=dev).to(torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last)
        ref = FNS["interpolate"](x.float())
        for impl in impls:
            poison()
            with torch.inference_mode():
                out = FNS[impl](x)
            err = float((out.float() - ref).norm() / ref.norm())
            good = bool(torch.isfinite(out).all()) and err < 1e-2 and out.shape == ref.shape
            ok[impl] &= good
            print(f"check {impl:11s} {shape}: rel err {err:.2e} {'ok' if good else 'FAIL'}")
    torch.cuda.synchronize()

    rows = []
    for c, h, w in STAGES:
        x = torch.randn(args.batch, c, h, w, device=dev).to(torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last)
        ref = FNS["interpolate"](x.float())
        nbytes = 5 * x.numel() * 2
        for impl in impls:
            with torch.inference_mode():
                poison()
                out = FNS[impl](x)
                err = float((out.float() - ref).norm() / ref.norm())
                ok[impl] &= bool(torch.isfinite(out).all()) and err < 1e-2
                del out
                ms = benchmark.bench(
                    lambda f=FNS[impl], x=x: f(x), dev, 3, args.reps, hide_launch=True
                )
            rows.append(
                [f"{c}x{h}x{w} -> x2", impl, f"{ms:.3f}", f"{nbytes / ms / 1e6:.0f}", f"{err:.1e}"]
            )
        if "interpolate" in impls:  # NCHW-contiguous input of the same data (no conversion)
            xc = x.contiguous()
            with torch.inference_mode():
                ms = benchmark.bench(lambda xc=xc: FNS["interpolate"](xc), dev, 3, args.reps, True)
            rows.append(
                [
                    f"{c}x{h}x{w} -> x2",
                    "interpolate NCHW",
                    f"{ms:.3f}",
                    f"{nbytes / ms / 1e6:.0f}",
                    "-",
                ]
            )
        del x, ref
        torch.cuda.empty_cache()
    print(
        "\n"
        + benchmark.table(
            f"x2 bilinear upsampling, batch {args.batch}, bf16 channels-last, GPU time",
            ["stage", "impl", "ms", "GB/s (in+out once)", "rel err vs fp32"],
            rows,
        ),
        flush=True,
    )

    peak = benchmark.matmul_peak_tflops(dev, 8192, reps=10)
    print(f"matmul peak (measured, bf16 random data): {peak:.0f} TFLOP/s\n", flush=True)
    cfg = benchmark.DEFAULT_CONFIG
    for impl in impls:
        if not ok[impl]:
            print(f"skip part (c) with {impl}: failed the checks")
            continue
        upsample.UPSAMPLE_IMPL = impl
        print(f"### part (c) with upsample.UPSAMPLE_IMPL = {impl!r}\n", flush=True)
        print(benchmark.inference_part(dev, cfg, False, [args.batch], peak, args.reps), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
