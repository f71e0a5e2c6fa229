"""Expert parallelism vs replicated experts on 2+ GPUs of one host (issue 7 item 4).

    torchrun --nproc_per_node 2 tools/gpu/expert_parallel_bench.py [--reps 20]

Measured in one run, every rank timing the same steps (host clock around each step
after a barrier and a device synchronisation; medians over ``--reps`` after warm-up):

(a) one MoE layer, forward + backward at the training shape of the 4-task NYUD config
    (8 images x 4 tasks x 1201 tokens per GPU, D 384, Hd 384, top-4, bf16 autocast), for
    E = 16 (the paper's) and E = 64 experts:
    - replicated: all E experts on every GPU, grouped-GEMM dispatch, then the expert
      gradients all-reduced (what DDP does with them; the bucket is timed as one
      all-reduce);
    - expert-parallel: E / W experts per GPU, tokens exchanged by two all-to-alls each
      way (``mmseg_m3vit.models.moe.expert_parallel``), no expert all-reduce.
    Also the largest difference between the two outputs (same weights and tokens), and
    two ingredients timed alone: the expert-gradient all-reduce, and the four
    all-to-alls of the (M*k, D) bf16 rows (balanced splits).
(b) the full training step of the 4-task NYUD model (8 images per GPU, 480x640, bf16
    autocast, SGD, synthetic data on the device) under mmengine's DDP wrapper, experts
    replicated vs sharded (expert parameters excluded from DDP's all-reduce), with peak
    memory per GPU and the first step's loss of both (same weights, same data).
Prints markdown tables on rank 0.
"""

from __future__ import annotations

import argparse
import gc
import os
import os.path as osp
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, osp.join(ROOT, "tools", "analysis_tools"))

from mmseg_m3vit.models.moe.expert_parallel import expert_parallel_ffn, shard_experts  # noqa: E402
from mmseg_m3vit.models.moe.grouped import grouped_dispatch  # noqa: E402

CONFIG = osp.join(ROOT, "configs", "m3vit", "m3vit_vit-s16-moe16-top4-mg_2xb8-5k_nyud-480x640.py")


def timed(fn: Callable[[], object], warmup: int, reps: int) -> float:
    """Median ms of ``fn`` over ``reps`` runs, every rank starting together."""
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


def rank0(*args: object) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


def moe_layer_part(num_experts: int, warmup: int, reps: int) -> list[str]:
    """(a) for one expert count: table rows [variant, ms, ratio, ...]."""
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

    def replicated() -> torch.Tensor:
        with torch.autocast("cuda", torch.bfloat16):
            y = grouped_dispatch(x, ids, gates, *full)
        (y.float() * probe).sum().backward()
        flat = torch.cat([w.grad.reshape(-1) for w in full])  # DDP's bucketed all-reduce
        dist.all_reduce(flat)
        for w in full:
            w.grad = None
        return y

    def sharded() -> torch.Tensor:
        with torch.autocast("cuda", torch.bfloat16):
            y = expert_parallel_ffn(x, ids, gates, *local, num_experts=num_experts)
        (y.float() * probe).sum().backward()
        for w in local:
            w.grad = None
        return y

    rows_bf16 = torch.randn(m * k, d, device="cuda", dtype=torch.bfloat16)
    splits = [m * k // world] * world  # balanced split of the M*k rows

    def exchange() -> None:  # the 4 all-to-alls of one fwd+bwd, on their own
        for _ in range(4):
            dist.all_to_all_single(torch.empty_like(rows_bf16), rows_bf16, splits, splits)

    def all_reduce() -> None:  # the replicated variant's expert-gradient all-reduce alone
        dist.all_reduce(torch.cat([w.detach().reshape(-1) for w in full]))

    diff = (replicated().float() - sharded().float()).abs().max().item()
    scale = replicated().float().abs().max().item()
    ms_rep = timed(replicated, warmup, reps)
    ms_ep = timed(sharded, warmup, reps)
    params = sum(w.numel() for w in full)
    ms_x, ms_ar = timed(exchange, warmup, reps), timed(all_reduce, warmup, reps)
    return [
        f"| {num_experts} | (part) expert-grad all-reduce alone, fp32 | {ms_ar:.2f} | - | - | - |",
        f"| {num_experts} | (part) 4 all-to-alls of the M*k bf16 rows alone | {ms_x:.2f} | - | - "
        "| - |",
        f"| {num_experts} | replicated + expert-grad all-reduce | {ms_rep:.2f} | 1.00x | "
        f"{params * 2 / 1e6:.1f} | - |",
        f"| {num_experts} | expert-parallel (all-to-all) | {ms_ep:.2f} | {ms_rep / ms_ep:.2f}x | "
        f"{params * 2 / world / 1e6:.1f} | {diff:.2e} (max abs out {scale:.2f}) |",
    ]


def train_step_part(expert_parallel: bool, warmup: int, reps: int) -> tuple[float, float, float]:
    """(b): (ms/step, peak GiB on this GPU, first-step loss) for one variant."""
    from benchmark import batch_to, build_model, synthetic_batch
    from mmengine.model import MMDistributedDataParallel
    from mmengine.optim import AmpOptimWrapper
    from torch.nn.parallel import DistributedDataParallel

    rank = dist.get_rank()
    torch.manual_seed(0)
    model = build_model(CONFIG, False, "cuda", task_batched=True, backbone_dispatch="grouped")
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).train()
    if expert_parallel:
        ignore = shard_experts(model)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    ddp = MMDistributedDataParallel(
        module=model, device_ids=[torch.cuda.current_device()], broadcast_buffers=False
    )
    batch = batch_to(synthetic_batch(8, (480, 640), list(model.tasks), seed=rank), "cuda")
    sgd = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)
    wrapper = AmpOptimWrapper(optimizer=sgd, dtype="bfloat16")
    torch.cuda.reset_peak_memory_stats()
    first = ddp.train_step(batch, wrapper)
    loss = float(first["loss"])
    ms = timed(lambda: ddp.train_step(batch, wrapper), warmup, reps)
    peak = torch.cuda.max_memory_allocated() / 2**30
    return ms, peak, loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    p.add_argument("--skip-train", action="store_true")
    args = p.parse_args()
    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    world = dist.get_world_size()
    rank0(f"{world} x {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for e in args.experts:
        rows += moe_layer_part(e, args.warmup, args.reps)
    rank0(
        f"\n**(a) one MoE layer fwd+bwd per GPU, {world} GPUs, 8x4x1201 tokens per GPU, "
        "D 384, Hd 384, top-4, bf16 autocast**\n\n"
        "| E | experts | ms (median) | speed-up | expert MB per GPU (bf16) | max abs diff |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    if args.skip_train:
        return
    rep = train_step_part(False, args.warmup, args.reps)
    gc.collect()  # the replicated model's memory must not count in the next peak
    torch.cuda.empty_cache()
    ep = train_step_part(True, args.warmup, args.reps)
    imgs = 8 * world
    rank0(
        f"\n**(b) train step, 4-task NYUD M3ViT (E 16, top-4), {world} GPUs x 8 images at "
        "480x640, bf16 autocast, SGD, mmengine DDP**\n\n"
        "| experts | ms/step (median) | images/s | speed-up | peak GiB (GPU 0) | first loss |\n"
        "|---|---|---|---|---|---|\n"
        f"| replicated (DDP all-reduces them) | {rep[0]:.1f} | {imgs / rep[0] * 1e3:.1f} | "
        f"1.00x | {rep[1]:.2f} | {rep[2]:.4f} |\n"
        f"| expert-parallel (all-to-all) | {ep[0]:.1f} | {imgs / ep[0] * 1e3:.1f} | "
        f"{rep[0] / ep[0]:.2f}x | {ep[1]:.2f} | {ep[2]:.4f} |"
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
