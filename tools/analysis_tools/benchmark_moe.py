"""The MoE FFN benchmark: every dispatch implementation against a dense MLP of equal cost.

    python tools/analysis_tools/benchmark_moe.py [--device cuda|cpu] [--reps 50] [--profile]
    torchrun --nproc_per_node 2 tools/analysis_tools/benchmark_moe.py --expert-parallel

Single device (default), on the same tokens and routing (softmax-then-top-k of random
router logits), printed as markdown tables:

(a) one layer forward + backward at the NYUD training shape (8 images x 1201 tokens,
    D 384, E 16, top-4, Hd 384; bf16 autocast on CUDA, float32 on CPU): the dense MLP
    ``Linear(D, k*Hd) -> GELU -> Linear(k*Hd, D)`` (the same active multiply-adds, the
    ratio's baseline) and every dispatch of :data:`mmseg_m3vit.models.moe.DISPATCH_IMPLS`
    (fused, grouped, sorted, loop; 'auto' is one of them) and, with ``--compile``, the
    grouped path through ``torch.compile``. GPU time has the host's launches queued
    ahead (launch overhead hidden); wall time is eager, launches included.
(a') the same layer forward only (inference, no autograd) at 1, 8 and 64 images.
(a'') with ``--profile``: CUDA kernel time per kernel of one fwd+bwd of the dense MLP,
    the fused path (with each set of training products that uses ``torch._grouped_mm``)
    and the grouped path, and the two grouped GEMMs + GELU alone on pre-sorted rows
    (a floor).
``--tile-sweep`` / ``--variants``: the fused layer's GEMM tile shapes / its training
products (split, mixed or all Triton; see ``fused.TRAIN_MATMULS``) and tiles at the
training shape. ``--train-matmuls`` sets the training products of every table.

``--expert-parallel`` (under torchrun, 2+ GPUs): one MoE layer at the task-batched
training shape with experts replicated (grouped dispatch + the expert-gradient
all-reduce DDP would do) vs sharded over the GPUs (``expert_parallel.py``, all-to-all),
for E = 16 and 64, with the two collectives timed alone; ``--train`` adds the full
4-task training step under mmengine's DDP, replicated vs sharded.

``--device cpu --small`` runs at toy sizes so that the tests can run it; its numbers
mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import os.path as osp
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

HERE = osp.dirname(osp.abspath(__file__))
sys.path.insert(0, osp.dirname(osp.dirname(HERE)))
sys.path.insert(0, HERE)

from benchmark import bench, table  # noqa: E402

from mmseg_m3vit.models.moe import DISPATCH_IMPLS, vmoe_top_k  # noqa: E402
from mmseg_m3vit.models.moe.grouped import grouped_dispatch  # noqa: E402


# ----------------------------------------------------------------------------- one GPU
class Problem:
    """Tokens, routing, experts and the equal-cost dense MLP of one layer."""

    def __init__(
        self, m: int, d: int, hd: int, e: int, k: int, device: str, grad: bool, seed: int = 0
    ) -> None:
        g = torch.Generator(device="cpu").manual_seed(seed)

        def param(*shape: int, scale: float) -> Tensor:
            t = (torch.randn(*shape, generator=g) * scale).to(device)
            return t.requires_grad_(grad)

        self.m, self.d, self.hd, self.e, self.k = m, d, hd, e, k
        self.x = param(m, d, scale=1.0)
        self.experts = (
            param(e, d, hd, scale=d**-0.5),
            param(e, hd, scale=0.02),
            param(e, hd, d, scale=hd**-0.5),
            param(e, d, scale=0.02),
        )
        self.dense = (
            param(k * hd, d, scale=d**-0.5),
            param(k * hd, scale=0.02),
            param(d, k * hd, scale=(k * hd) ** -0.5),
            param(d, scale=0.02),
        )
        router = torch.randn(d, e, generator=g).to(device) * 0.02
        with torch.no_grad():
            gate = vmoe_top_k((self.x.detach() @ router).float(), k, with_stats=False)
        self.ids = gate.expert_ids
        self.gates = gate.gates.requires_grad_(grad)
        self.grad_out = torch.randn(m, d, generator=g).to(device)

    def dense_mlp(self) -> Tensor:
        fc1, fb1, fc2, fb2 = self.dense
        return F.linear(F.gelu(F.linear(self.x, fc1, fb1)), fc2, fb2)

    def moe(self, fn: Callable[..., Tensor]) -> Callable[[], Tensor]:
        return lambda: fn(self.x, self.ids, self.gates, *self.experts)

    @property
    def flops(self) -> int:
        """Forward FLOPs of the active experts (2 per multiply-add)."""
        return 2 * 2 * self.m * self.d * self.hd * self.k


def implementations(p: Problem, device: str, compile_: bool) -> dict[str, Callable[[], Tensor]]:
    """Name -> forward of every variant (dense first: the baseline)."""
    impls = {f"dense MLP {p.d}-{p.hd * p.k}-{p.d} (equal active FLOPs)": p.dense_mlp}
    for name, fn in DISPATCH_IMPLS.items():
        if name == "auto":
            continue  # the same as the fused row on CUDA bf16, as sorted elsewhere
        if device != "cuda" and name in ("fused", "grouped"):
            continue  # CUDA paths: elsewhere they fall back to 'sorted'
        if name == "loop" and p.m > 20000:
            continue  # minutes at batch 64; its scaling is clear from the smaller rows
        impls[name] = p.moe(fn)
    if device == "cuda" and not p.x.requires_grad:  # inference: the layer's bf16 copies
        w16 = tuple(w.detach().bfloat16() for w in p.experts)
        fn = DISPATCH_IMPLS["fused"]
        impls["fused, expert weights kept in bf16 (eval layer)"] = lambda: fn(
            p.x, p.ids, p.gates, *w16
        )
    if device == "cuda" and compile_:
        impls["grouped + torch.compile"] = p.moe(torch.compile(grouped_dispatch))
    return impls


def layer_table(
    p: Problem, device: str, warmup: int, reps: int, backward: bool, compile_: bool = False
) -> str:
    """(a) / (a'): GPU and wall ms of each variant and the ratio to the dense MLP."""
    amp = torch.bfloat16 if device == "cuda" else torch.float32
    rows, base = [], None
    for name, fwd in implementations(p, device, compile_).items():

        def step(fwd: Callable[[], Tensor] = fwd) -> None:
            with torch.autocast(device, dtype=amp, enabled=device == "cuda"):
                out = fwd()
            if backward:
                out.backward(p.grad_out.to(out.dtype))

        ctx = torch.enable_grad() if backward else torch.inference_mode()
        with ctx:
            gpu = bench(step, device, warmup, reps, hide_launch=True)
            wall = bench(step, device, warmup, reps)
        base = base or (gpu, wall)
        flops = p.flops * (3 if backward else 1)
        rows.append(
            [
                name,
                f"{gpu:.3f}",
                f"{gpu / base[0]:.2f}x",
                f"{flops / (gpu * 1e-3) / 1e12:.0f}",
                f"{wall:.3f}",
                f"{wall / base[1]:.2f}x",
            ]
        )
    what = "fwd+bwd" if backward else "forward (inference)"
    title = (
        f"MoE FFN {what}, {p.m} tokens, D={p.d}, E={p.e}, top-{p.k}, Hd={p.hd}, "
        f"{'bf16 autocast' if device == 'cuda' else 'fp32'}; GPU = kernels queued ahead "
        "(launch overhead hidden), wall = eager incl. launches"
    )
    header = ["implementation", "GPU ms", "vs dense", "TFLOP/s", "wall ms", "vs dense"]
    return table(title, header, rows)


def profile_tables(p: Problem, reps: int = 20) -> str:
    """(a''): per-kernel CUDA time of one fwd+bwd for fused and grouped, and the floor."""
    from torch.profiler import ProfilerActivity, profile

    from mmseg_m3vit.models.moe import fused

    text = []
    saved = fused.TRAIN_MATMULS
    cases = [("dense MLP", None), ("fused, mixed", "mixed"), ("fused, split", "split")]
    for name, products in [*cases, ("grouped", None)]:
        if products is not None:
            fused.TRAIN_MATMULS = products
        fwd = p.dense_mlp if name == "dense MLP" else p.moe(DISPATCH_IMPLS[name.split(",")[0]])

        def step(fwd: Callable[[], Tensor] = fwd) -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fwd()
            out.backward(p.grad_out.to(out.dtype))

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                step()
            torch.cuda.synchronize()
        per: dict[str, float] = {}
        for evt in prof.events():
            if evt.device_type == torch.autograd.DeviceType.CUDA:
                key = evt.name[:70]
                per[key] = per.get(key, 0.0) + evt.device_time / reps
        rows = [[k, f"{v:.1f}"] for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:14]]
        rows.append(["total", f"{sum(per.values()):.1f}"])
        text.append(table(f"(a'') {name}: CUDA us per fwd+bwd, by kernel", ["kernel", "us"], rows))
        fused.TRAIN_MATMULS = saved
    # floor: the two grouped GEMMs + GELU on pre-sorted rows, fwd+bwd
    flat = p.ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    offs = torch.bincount(flat, minlength=p.e).cumsum(0).to(torch.int32)
    xs = p.x.detach().bfloat16()[order // p.k].requires_grad_(True)
    w1 = p.experts[0].detach().bfloat16().requires_grad_(True)
    w2 = p.experts[2].detach().bfloat16().requires_grad_(True)
    gs = torch.randn(p.m * p.k, p.d, device="cuda", dtype=torch.bfloat16)

    def floor() -> None:
        torch._grouped_mm(F.gelu(torch._grouped_mm(xs, w1, offs=offs)), w2, offs=offs).backward(gs)

    ms = bench(floor, "cuda", 10, 50, hide_launch=True)
    text.append(f"GEMM floor: 2 grouped GEMMs + GELU on pre-sorted rows, fwd+bwd: {ms:.3f} ms\n")
    return "\n".join(text)


def tile_sweep(p: Problem, reps: int) -> str:
    """Fused layer fwd and fwd+bwd ms for several tile shapes of its GEMM kernels."""
    from mmseg_m3vit.models.moe import fused

    gemm0, wgrad0 = dict(fused.GEMM_TILES), dict(fused.WGRAD_TILES)
    gemm_shapes = [  # BM, BN, BK, warps, stages
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (64, 128, 64, 4, 4),
    ]
    wgrad_shapes = [  # BM, BN, BK, warps, stages, rows per program (0: whole expert)
        (128, 64, 64, 4, 4, 0),
        (128, 128, 64, 4, 3, 0),
        (128, 128, 64, 4, 3, 256),
        (128, 128, 64, 4, 3, 512),
        (128, 128, 64, 4, 3, 1024),
        (128, 128, 64, 4, 4, 512),
        (128, 128, 64, 8, 3, 512),
        (128, 64, 64, 4, 4, 512),
        (64, 128, 64, 4, 4, 512),
    ]
    fwd = p.moe(DISPATCH_IMPLS["fused"])

    def step(backward: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fwd()
            if backward:
                out.backward(p.grad_out.to(out.dtype))

        return run

    rows = []
    for which, cfg, shapes in (
        ("GEMM", fused.GEMM_TILES, gemm_shapes),
        ("weight-grad", fused.WGRAD_TILES, wgrad_shapes),
    ):
        for shape in shapes:
            bm, bn, bk, w, st = shape[:5]
            cfg.update(BM=bm, BN=bn, BK=bk, num_warps=w, num_stages=st)
            label = f"{bm}x{bn}x{bk} w{w} s{st}"
            if len(shape) > 5:
                cfg.update(SPLIT=shape[5])
                label += f" split {shape[5]}"
            try:
                with torch.no_grad():
                    f = bench(step(False), "cuda", 3, reps, hide_launch=True)
                fb = bench(step(True), "cuda", 3, reps, hide_launch=True)
                rows.append([which, label, f"{f:.3f}", f"{fb:.3f}"])
            except Exception as exc:  # e.g. out of shared memory for this shape
                rows.append([which, label, "failed", type(exc).__name__])
        fused.GEMM_TILES.update(gemm0)
        fused.WGRAD_TILES.update(wgrad0)
    return table(
        f"fused tile sweep, {p.m} tokens (other kernel at its default)",
        ["kernel", "tile", "fwd ms", "fwd+bwd ms"],
        rows,
    )


def variant_table(p: Problem, reps: int) -> str:
    """Fused layer fwd+bwd GPU ms for its training products (``fused.TRAIN_MATMULS``)
    and tile shapes beside the dense MLP; "grads None" = every parameter's ``.grad``
    set to None before each step (as the training loop's ``zero_grad`` does), instead
    of accumulated across the repetitions."""
    from mmseg_m3vit.models.moe import fused

    # training products, label, {setting of fused: value} (a tile dict: the keys to
    # change; empty: the defaults)
    variants: list[tuple[str, str, dict[str, object]]] = [
        ("triton", "GEMM_TILES", {}),
        ("mixed", "defaults", {}),
        ("mixed", "row products in torch._grouped_mm", {"ROW_PRODUCTS": "cutlass"}),
        ("split", "defaults", {}),
        ("split", "one stream", {"TRAIN_STREAMS": False}),
        ("split", "row products in torch._grouped_mm", {"ROW_PRODUCTS": "cutlass"}),
    ]
    for tiles in (  # whole tile sets of the split step's row GEMM, labelled from the dict
        dict(BM=64, BN=128, BK=64, num_warps=4, num_stages=3),
        dict(BM=128, BN=64, BK=64, num_warps=4, num_stages=3),
        dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=4),
    ):
        label = "row GEMM {BM}x{BN}x{BK} w{num_warps} s{num_stages}".format(**tiles)
        variants.append(("split", label, {"PLAIN_GEMM_TILES": tiles}))
    names = {n for v in variants for n in v[2]} | {"TRAIN_MATMULS"}
    saved = {n: copy.deepcopy(getattr(fused, n)) for n in names}

    def restore() -> None:
        for n, v in saved.items():
            if isinstance(v, dict):
                getattr(fused, n).clear()
                getattr(fused, n).update(v)
            else:
                setattr(fused, n, v)

    leaves = [p.x, p.gates, *p.experts, *p.dense]

    def step(fwd: Callable[[], Tensor], none: bool) -> Callable[[], None]:
        def run() -> None:
            if none:
                for t in leaves:
                    t.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fwd()
            out.backward(p.grad_out.to(out.dtype))

        return run

    def both(fwd: Callable[[], Tensor]) -> tuple[float, float]:
        return tuple(bench(step(fwd, n), "cuda", 5, reps, hide_launch=True) for n in (False, True))

    dense = both(p.dense_mlp)
    rows = [["dense MLP (baseline)", "-", f"{dense[0]:.3f}", "1.00x", f"{dense[1]:.3f}", "1.00x"]]
    fwd = p.moe(DISPATCH_IMPLS["fused"])
    for matmuls, label, overrides in variants:
        restore()
        fused.TRAIN_MATMULS = matmuls
        for n, v in overrides.items():
            if isinstance(v, dict):
                getattr(fused, n).update(v)
            else:
                setattr(fused, n, v)
        try:
            acc, none = both(fwd)
            rows.append(
                [
                    f"fused, {matmuls}",
                    label,
                    f"{acc:.3f}",
                    f"{acc / dense[0]:.2f}x",
                    f"{none:.3f}",
                    f"{none / dense[1]:.2f}x",
                ]
            )
        except Exception as exc:  # e.g. out of shared memory, a compiler failure
            rows.append([f"fused, {matmuls}", label, "failed", type(exc).__name__, "", ""])
    restore()
    for t in leaves:
        t.grad = None
    return table(
        f"fused training products and GEMM tiles, fwd+bwd, {p.m} tokens, GPU ms "
        "(kernels queued ahead)",
        ["implementation", "tiles", "grads accumulated", "vs dense", "grads None", "vs dense"],
        rows,
    )


# ----------------------------------------------------------------------------- EP
def _timed_all_ranks(fn: Callable[[], object], warmup: int, reps: int) -> float:
    """Median ms of ``fn`` over ``reps`` runs, every rank starting together."""
    import torch.distributed as dist

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def expert_parallel_rows(num_experts: int, warmup: int, reps: int) -> list[str]:
    """One MoE layer fwd+bwd, replicated vs expert-parallel, for one expert count."""
    import torch.distributed as dist

    from mmseg_m3vit.models.moe.expert_parallel import expert_parallel_ffn

    world, rank = dist.get_world_size(), dist.get_rank()
    m, d, hd, k = 8 * 4 * 1201, 384, 384, 4
    g = torch.Generator(device="cuda").manual_seed(1000 + rank)  # tokens differ per rank
    x = torch.randn(m, d, device="cuda", generator=g)
    ids = torch.rand(m, num_experts, device="cuda", generator=g).topk(k, dim=1).indices
    gates = torch.rand(m, k, device="cuda", generator=g)
    probe = torch.randn(m, d, device="cuda", generator=g)
    torch.manual_seed(0)  # same experts on every rank
    full = [
        (torch.randn(num_experts, d, hd, device="cuda") / d**0.5).requires_grad_(),
        torch.zeros(num_experts, hd, device="cuda", requires_grad=True),
        (torch.randn(num_experts, hd, d, device="cuda") / hd**0.5).requires_grad_(),
        torch.zeros(num_experts, d, device="cuda", requires_grad=True),
    ]
    e_l = num_experts // world
    local = [w.detach()[rank * e_l : (rank + 1) * e_l].clone().requires_grad_() for w in full]

    def replicated() -> Tensor:
        with torch.autocast("cuda", torch.bfloat16):
            y = grouped_dispatch(x, ids, gates, *full)
        (y.float() * probe).sum().backward()
        flat = torch.cat([w.grad.reshape(-1) for w in full])  # DDP's bucketed all-reduce
        dist.all_reduce(flat)
        for w in full:
            w.grad = None
        return y

    def sharded() -> Tensor:
        with torch.autocast("cuda", torch.bfloat16):
            y = expert_parallel_ffn(x, ids, gates, *local, num_experts=num_experts)
        (y.float() * probe).sum().backward()
        for w in local:
            w.grad = None
        return y

    rows_bf16 = torch.randn(m * k, d, device="cuda", dtype=torch.bfloat16)
    splits = [m * k // world] * world

    def exchange() -> None:  # the 4 all-to-alls of one fwd+bwd, on their own
        for _ in range(4):
            dist.all_to_all_single(torch.empty_like(rows_bf16), rows_bf16, splits, splits)

    def all_reduce() -> None:
        dist.all_reduce(torch.cat([w.detach().reshape(-1) for w in full]))

    diff = (replicated().float() - sharded().float()).abs().max().item()
    scale = replicated().float().abs().max().item()
    ms_rep = _timed_all_ranks(replicated, warmup, reps)
    ms_ep = _timed_all_ranks(sharded, warmup, reps)
    params = sum(w.numel() for w in full)
    ms_x, ms_ar = (
        _timed_all_ranks(exchange, warmup, reps),
        _timed_all_ranks(all_reduce, warmup, reps),
    )
    e = num_experts
    return [
        f"| {e} | (part) expert-grad all-reduce alone, fp32 | {ms_ar:.2f} | - | - | - |",
        f"| {e} | (part) 4 all-to-alls of the M*k bf16 rows alone | {ms_x:.2f} | - | - | - |",
        f"| {e} | replicated + expert-grad all-reduce | {ms_rep:.2f} | 1.00x | "
        f"{params * 2 / 1e6:.1f} | - |",
        f"| {e} | expert-parallel (all-to-all) | {ms_ep:.2f} | {ms_rep / ms_ep:.2f}x | "
        f"{params * 2 / world / 1e6:.1f} | {diff:.2e} (max abs out {scale:.2f}) |",
    ]


def expert_parallel_train_step(sharded: bool, warmup: int, reps: int) -> tuple[float, float, float]:
    """(ms/step, peak GiB on this GPU, first-step loss) of the 4-task training step."""
    import torch.distributed as dist
    from benchmark import DEFAULT_CONFIG, batch_to, build_model
    from mmengine.model import MMDistributedDataParallel
    from mmengine.optim import AmpOptimWrapper
    from torch.nn.parallel import DistributedDataParallel

    from mmseg_m3vit.datasets.random_mt import random_batch
    from mmseg_m3vit.models.moe.expert_parallel import shard_experts

    rank = dist.get_rank()
    torch.manual_seed(0)
    model = build_model(DEFAULT_CONFIG, False, "cuda", task_batched=True)
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).train()
    if sharded:
        ignore = shard_experts(model)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    ddp = MMDistributedDataParallel(
        module=model, device_ids=[torch.cuda.current_device()], broadcast_buffers=False
    )
    batch = batch_to(random_batch(8, (480, 640), list(model.tasks), seed=rank), "cuda")
    sgd = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)
    wrapper = AmpOptimWrapper(optimizer=sgd, dtype="bfloat16")
    torch.cuda.reset_peak_memory_stats()
    loss = float(ddp.train_step(batch, wrapper)["loss"])
    ms = _timed_all_ranks(lambda: ddp.train_step(batch, wrapper), warmup, reps)
    return ms, torch.cuda.max_memory_allocated() / 2**30, loss


def expert_parallel_main(args: argparse.Namespace) -> None:
    """Run under torchrun: print the expert-parallel tables on rank 0."""
    import torch.distributed as dist

    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    world = dist.get_world_size()
    say = print if dist.get_rank() == 0 else (lambda *a, **k: None)
    say(f"{world} x {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for e in args.ep_experts:
        rows += expert_parallel_rows(e, 5, args.reps)
    say(
        f"\n**one MoE layer fwd+bwd per GPU, {world} GPUs, 8x4x1201 tokens per GPU, "
        "D 384, Hd 384, top-4, bf16 autocast**\n\n"
        "| E | experts | ms (median) | speed-up | expert MB per GPU (bf16) | max abs diff |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows),
        flush=True,
    )
    if args.train:
        rep = expert_parallel_train_step(False, 5, args.reps)
        gc.collect()
        torch.cuda.empty_cache()
        ep = expert_parallel_train_step(True, 5, args.reps)
        imgs = 8 * world
        say(
            f"\n**train step, 4-task NYUD M3ViT, {world} GPUs x 8 images at 480x640, bf16 "
            "autocast, SGD, mmengine DDP**\n\n"
            "| experts | ms/step | images/s | speed-up | peak GiB (GPU 0) | first loss |\n"
            "|---|---|---|---|---|---|\n"
            f"| replicated | {rep[0]:.1f} | {imgs / rep[0] * 1e3:.1f} | 1.00x | "
            f"{rep[1]:.2f} | {rep[2]:.4f} |\n"
            f"| expert-parallel | {ep[0]:.1f} | {imgs / ep[0] * 1e3:.1f} | "
            f"{rep[0] / ep[0]:.2f}x | {ep[1]:.2f} | {ep[2]:.4f} |",
            flush=True,
        )
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="toy sizes (CPU smoke test)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per case")
    p.add_argument("--profile", action="store_true", help="per-kernel tables and GEMM floor")
    p.add_argument("--compile", action="store_true", help="add grouped + torch.compile rows")
    p.add_argument("--tile-sweep", action="store_true", help="fused kernels' tile shapes")
    p.add_argument("--variants", action="store_true", help="fused training products")
    p.add_argument(
        "--train-matmuls",
        default=None,
        choices=["split", "mixed", "triton"],
        help="fused.TRAIN_MATMULS for every table (default: the module's)",
    )
    p.add_argument("--infer-batches", default="1,8,64", help="(a') images, comma-separated")
    p.add_argument("--expert-parallel", action="store_true", help="torchrun, 2+ GPUs")
    p.add_argument("--ep-experts", type=int, nargs="+", default=[16, 64])
    p.add_argument("--train", action="store_true", help="with --expert-parallel: train step")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
    """Print the tables; returns them (markdown strings)."""
    args = parse_args(argv)
    if args.expert_parallel:
        expert_parallel_main(args)
        return []
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; use --device cpu --small")
    reps = args.reps or (2 if args.small else 50)
    warmup = 1 if args.small else 10
    if args.train_matmuls is not None:
        from mmseg_m3vit.models.moe import fused

        fused.TRAIN_MATMULS = args.train_matmuls
    if device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}\n", flush=True)
    d, hd, e, k, tokens = (16, 16, 4, 2, 9) if args.small else (384, 384, 16, 4, 1201)
    train_images = 2 if args.small else 8
    problem = Problem(train_images * tokens, d, hd, e, k, device, True)
    out = [layer_table(problem, device, warmup, reps, True, args.compile)]
    print("(a) " + out[-1], flush=True)
    batches = [int(v) for v in args.infer_batches.split(",") if v.strip()]
    for b in batches if not args.small else [1]:
        problem = Problem(b * tokens, d, hd, e, k, device, False)
        out.append(layer_table(problem, device, warmup, reps, False, args.compile))
        print("(a') " + out[-1], flush=True)
    if args.tile_sweep and device == "cuda":
        out.append(tile_sweep(Problem(train_images * tokens, d, hd, e, k, device, True), reps))
        print(out[-1], flush=True)
    if args.variants and device == "cuda":
        out.append(variant_table(Problem(train_images * tokens, d, hd, e, k, device, True), reps))
        print(out[-1], flush=True)
    if args.profile and device == "cuda":
        out.append(profile_tables(Problem(train_images * tokens, d, hd, e, k, device, True)))
        print(out[-1], flush=True)
    return out


if __name__ == "__main__":
    main()
