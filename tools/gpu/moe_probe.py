"""Device-side probe of the grouped MoE FFN: what bounds it (run on the H200).

    python tools/gpu/moe_probe.py

Prints, at the NYUD scale (8 x 1201 tokens, D=384, E=16, k=4, Hd=384, bf16 autocast):
fwd+bwd medians of the grouped dispatch, of the two grouped GEMMs + GELU alone on
pre-sorted rows (the GEMM floor), of the dense equal-FLOPs MLP, and a torch.profiler
table of the grouped path's kernels (CUDA time per kernel, summed over 20 steps).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from mmseg_m3vit.models.moe.grouped import grouped_dispatch

_spec = importlib.util.spec_from_file_location(
    "benchmark", pathlib.Path(__file__).parents[1] / "analysis_tools" / "benchmark.py"
)
benchmark = importlib.util.module_from_spec(_spec)
sys.modules["benchmark"] = benchmark
_spec.loader.exec_module(benchmark)


def main() -> None:
    dev = "cuda"
    m, d, hd, e, k = 8 * 1201, 384, 384, 16, 4
    torch.manual_seed(0)
    x = torch.randn(m, d, device=dev, requires_grad=True)
    ids = torch.rand(m, e, device=dev).argsort(dim=1)[:, :k]
    gates = torch.rand(m, k, device=dev).softmax(-1).requires_grad_(True)
    w1 = (torch.randn(e, d, hd, device=dev) / d**0.5).requires_grad_(True)
    b1 = torch.zeros(e, hd, device=dev, requires_grad=True)
    w2 = (torch.randn(e, hd, d, device=dev) / hd**0.5).requires_grad_(True)
    b2 = torch.zeros(e, d, device=dev, requires_grad=True)
    grad_out = torch.randn(m, d, device=dev)
    dense = nn.Sequential(nn.Linear(d, hd * k), nn.GELU(), nn.Linear(hd * k, d)).to(dev)

    # Pre-sorted operands for the GEMM floor.
    _, order = torch.sort(ids.reshape(-1), stable=True)
    counts = torch.bincount(ids.reshape(-1), minlength=e)
    offs = counts.cumsum(0).to(torch.int32)
    xs = x.detach().bfloat16()[order // k].requires_grad_(True)
    w1b = w1.detach().bfloat16().requires_grad_(True)
    w2b = w2.detach().bfloat16().requires_grad_(True)
    gs = torch.randn(m * k, d, device=dev, dtype=torch.bfloat16)

    def amp_step(fn):
        def run() -> None:
            with torch.autocast(dev, dtype=torch.bfloat16):
                out = fn()
            out.backward(grad_out.to(out.dtype))

        return run

    def gemm_floor() -> None:
        h = F.gelu(torch._grouped_mm(xs, w1b, offs=offs))
        torch._grouped_mm(h, w2b, offs=offs).backward(gs)

    def fwd_only(fn):
        def run() -> None:
            with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16):
                fn()

        return run

    args = (x, ids, gates, w1, b1, w2, b2)
    cases = {
        "dense MLP fwd+bwd": amp_step(lambda: dense(x)),
        "grouped fwd+bwd": amp_step(lambda: grouped_dispatch(*args)),
        "GEMM floor: 2 grouped GEMMs + GELU fwd+bwd": gemm_floor,
        "dense MLP fwd": fwd_only(lambda: dense(x)),
        "grouped fwd": fwd_only(lambda: grouped_dispatch(*args)),
    }
    print(f"{'case':48s}   GPU ms   wall ms")
    for name, fn in cases.items():
        gpu = benchmark.bench(fn, dev, 10, 50, hide_launch=True)
        wall = benchmark.bench(fn, dev, 10, 50)
        print(f"{name:48s} {gpu:8.3f} {wall:8.3f}", flush=True)

    step = amp_step(lambda: grouped_dispatch(*args))
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            step()
        torch.cuda.synchronize()
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    )


if __name__ == "__main__":
    main()
