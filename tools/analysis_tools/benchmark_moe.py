"""Benchmark one MoE FFN layer (forward + backward) against a dense MLP of equal active cost.

Usage::

    python tools/analysis_tools/benchmark_moe.py [--images 8] [--tokens 1201] [--dim 384]
        [--experts 16] [--top-k 4] [--hidden 384] [--iters 20] [--device cpu cuda]
        [--dtype float32|bfloat16] [--cpu-images 1]

Implementations timed, on the same tokens and the same routing (softmax-then-top-k of
random router logits):

- ``dense``: ``Linear(D, k*Hd) -> GELU -> Linear(k*Hd, D)``, the same active MACs as
  top-k experts of hidden Hd (the reference the ratio column divides by);
- ``loop``: a per-expert Python loop (Mixtral style: ``where`` the expert was chosen,
  run it on those tokens, ``index_add`` the weighted output);
- every registered MoE dispatch (:data:`mmseg_m3vit.models.moe.DISPATCH_IMPLS`):
  ``sorted`` (portable) and, on CUDA, ``grouped`` (grouped GEMM; timed on CUDA only,
  since elsewhere it falls back to ``sorted``).

A benchmark, not a test: it prints milliseconds per forward+backward (median over
``--iters`` after warm-up) and the ratio to ``dense``. CUDA runs only when available.
The CPU default uses fewer images (``--cpu-images``) so it finishes in seconds.
"""

from __future__ import annotations

import argparse
import os.path as osp
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from mmseg_m3vit.models.moe import DISPATCH_IMPLS, vmoe_top_k  # noqa: E402
from mmseg_m3vit.models.moe.dispatch import expert_loop_dispatch  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], torch.Tensor], device: torch.device, iters: int, warmup: int):
    """Median milliseconds of ``fn().sum().backward()``."""
    for _ in range(warmup):
        fn().float().sum().backward()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn().float().sum().backward()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_device(args: argparse.Namespace, device: torch.device, images: int) -> list[tuple]:
    """Time every implementation on ``device``; returns rows (name, ms, ratio)."""
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    m, d, e, k, hd = images * args.tokens, args.dim, args.experts, args.top_k, args.hidden

    def param(*shape, scale):
        t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_()

    x = param(m, d, scale=1.0)
    w1, b1 = param(e, d, hd, scale=d**-0.5), param(e, hd, scale=0.02)
    w2, b2 = param(e, hd, d, scale=hd**-0.5), param(e, d, scale=0.02)
    router = param(d, e, scale=0.02)
    fc1, fc2 = param(k * hd, d, scale=d**-0.5), param(d, k * hd, scale=(k * hd) ** -0.5)
    fb1, fb2 = param(k * hd, scale=0.02), param(d, scale=0.02)
    with torch.no_grad():
        gate = vmoe_top_k((x @ router).float(), k)
    ids, gates = gate.expert_ids, gate.gates.to(dtype).requires_grad_()

    impls: dict[str, Callable[[], torch.Tensor]] = {
        "dense": lambda: F.linear(F.gelu(F.linear(x, fc1, fb1)), fc2, fb2),
        "loop": lambda: expert_loop_dispatch(x, ids, gates, w1, b1, w2, b2),
    }
    for name, fn in DISPATCH_IMPLS.items():
        if name == "loop" or (name != "sorted" and device.type != "cuda"):
            continue  # the fast paths are CUDA-only and fall back to 'sorted' elsewhere
        impls[name] = lambda fn=fn: fn(x, ids, gates, w1, b1, w2, b2)
    rows = []
    dense_ms = None
    for name, fn in impls.items():
        print(f"  timing {name} on {device} ...", file=sys.stderr, flush=True)
        ms = time_fn(fn, device, args.iters, args.warmup)
        dense_ms = ms if name == "dense" else dense_ms
        rows.append((name, ms, ms / dense_ms))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description="MoE FFN vs dense MLP vs per-expert loop")
    p.add_argument("--images", type=int, default=8, help="images per batch on CUDA")
    p.add_argument("--cpu-images", type=int, default=1, help="images per batch on CPU")
    p.add_argument("--tokens", type=int, default=1201, help="tokens per image (1+N)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--hidden", type=int, default=384, help="expert hidden dims")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    p.add_argument("--device", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, list[tuple]]:
    """Run the benchmark and print one table per device."""
    args = parse_args(argv)
    if not 1 <= args.top_k <= args.experts:
        raise SystemExit(f"--top-k {args.top_k} must be in [1, --experts {args.experts}]")
    requested_dtype = args.dtype
    results = {}
    for dev in args.device:
        if dev == "cuda" and not torch.cuda.is_available():
            print("CUDA not available: skipping the GPU run", file=sys.stderr)
            continue
        args.dtype = requested_dtype or ("bfloat16" if dev == "cuda" else "float32")
        images = args.images if dev == "cuda" else args.cpu_images
        device = torch.device(dev)
        name = torch.cuda.get_device_name(device) if dev == "cuda" else "CPU"
        rows = run_device(args, device, images)
        print(
            f"\n{name}: {images} x {args.tokens} tokens, D={args.dim}, E={args.experts}, "
            f"top-{args.top_k}, hidden {args.hidden}, {args.dtype}, forward+backward"
        )
        print(f"{'impl':<10}{'ms':>12}{'x dense':>10}")
        for impl, ms, ratio in rows:
            print(f"{impl:<10}{ms:>12.3f}{ratio:>10.2f}")
        results[dev] = rows
    return results


if __name__ == "__main__":
    main()
