"""Speed benchmark of the M3ViT GPU paths, printed as markdown tables in ONE run.

    python tools/analysis_tools/benchmark.py [--device cuda|cpu] [--small] [--parts abc]

(a) MoE FFN forward+backward at the NYUD scale (8 images x 1201 tokens, D=384, E=16,
    top-4, Hd=384, bf16 autocast): grouped dispatch vs the dense MLP of equal active
    FLOPs (384-1536-384) vs a Mixtral-style per-expert loop and the sorted reference.
(b) Train-step images/s of the 4-task NYUD model at 480x640 (synthetic data):
    straightforward (one backbone pass per task, per-expert loop MoE, float32) vs
    optimised (task-batched backbone, grouped MoE, bf16 autocast).
(c) Single-task inference images/s and model-FLOPs utilisation against the bf16 matmul
    peak measured in the same run (8192^3 product on random data).

Timing: CUDA events around each repetition after warm-up, median over repetitions
(``time.perf_counter`` medians on CPU). ``--device cpu --small`` runs every part at toy
sizes so the script is testable without a GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmseg_m3vit.models.moe.dispatch import expert_loop_dispatch, sorted_dispatch
from mmseg_m3vit.models.moe.grouped import grouped_dispatch


# ----------------------------------------------------------------------------- timing
def bench(
    fn: Callable[[], object], device: str, warmup: int, reps: int, hide_launch: bool = False
) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs after ``warmup`` runs.

    CUDA: events around each run. With ``hide_launch`` the stream is first held busy by a
    ~2 ms spin kernel (``torch.cuda._sleep``) so that the host queues ``fn``'s kernels
    ahead of the GPU: the result is then GPU time, without host launch overhead (host
    synchronisations inside ``fn`` still count). Without it, runs are separated by a
    synchronisation and the time includes the host's launch overhead (eager wall time).
    """
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        spin_cycles = 4_000_000 if hide_launch else 0  # ~2 ms at the H200's 1.98 GHz
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if spin_cycles:
                torch.cuda._sleep(spin_cycles)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def matmul_peak_tflops(device: str, n: int, reps: int) -> float:
    """bf16 (CUDA) / float32 (CPU) n x n x n matmul rate on random data, TFLOP/s."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = bench(lambda: a @ b, device, warmup=3, reps=reps)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    """A markdown table with a bold title line."""
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- (a)
@dataclass
class MoEScale:
    """One MoE FFN layer's problem size (M = images x tokens)."""

    images: int
    tokens: int
    dim: int
    hidden: int
    experts: int
    top_k: int


def moe_ffn_part(device: str, scale: MoEScale, warmup: int, reps: int) -> str:
    """(a): fwd+bwd ms of one FFN layer for each implementation, under bf16 autocast."""
    g = torch.Generator(device="cpu").manual_seed(0)
    m, d, hd, e, k = (
        scale.images * scale.tokens,
        scale.dim,
        scale.hidden,
        scale.experts,
        scale.top_k,
    )
    x = torch.randn(m, d, generator=g).to(device).requires_grad_(True)
    # Balanced-ish routing, as a trained router gives: k distinct random experts per token.
    ids = torch.rand(m, e, generator=g).argsort(dim=1)[:, :k].to(device)
    gates = torch.rand(m, k, generator=g).softmax(-1).to(device).requires_grad_(True)
    w1 = (torch.randn(e, d, hd, generator=g) / d**0.5).to(device).requires_grad_(True)
    b1 = torch.zeros(e, hd).to(device).requires_grad_(True)
    w2 = (torch.randn(e, hd, d, generator=g) / hd**0.5).to(device).requires_grad_(True)
    b2 = torch.zeros(e, d).to(device).requires_grad_(True)
    dense = nn.Sequential(nn.Linear(d, hd * k), nn.GELU(), nn.Linear(hd * k, d)).to(device)
    grad_out = torch.randn(m, d, device=device)
    amp_dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def step(fn: Callable[[], Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast(device, dtype=amp_dtype, enabled=device == "cuda"):
                out = fn()
            out.backward(grad_out.to(out.dtype))

        return run

    def moe(dispatch: Callable[..., Tensor]) -> Callable[[], Tensor]:
        return lambda: dispatch(x, ids, gates, w1, b1, w2, b2)

    impls = {
        f"dense MLP {d}-{hd * k}-{d} (equal active FLOPs)": step(lambda: dense(x)),
        "grouped (this project, `_grouped_mm`)": step(moe(grouped_dispatch)),
        "sorted (per-expert chunks, reference path)": step(moe(sorted_dispatch)),
        "per-expert loop (Mixtral style)": step(moe(expert_loop_dispatch)),
    }
    if device == "cuda":  # same function through inductor (fuses the ops around the GEMMs)
        impls["grouped + torch.compile (not used by the model)"] = step(
            moe(torch.compile(grouped_dispatch))
        )
    flops = 3 * 2 * 2 * m * d * hd * k  # fwd (2 GEMMs) + bwd (2x), active experts only
    rows = []
    dense_gpu = dense_wall = None
    for name, fn in impls.items():
        gpu = bench(fn, device, warmup, reps, hide_launch=True)
        wall = bench(fn, device, warmup, reps)
        dense_gpu, dense_wall = dense_gpu or gpu, dense_wall or wall
        rows.append(
            [
                name,
                f"{gpu:.3f}",
                f"{gpu / dense_gpu:.2f}x",
                f"{flops / (gpu * 1e-3) / 1e12:.0f}",
                f"{wall:.3f}",
                f"{wall / dense_wall:.2f}x",
            ]
        )
    title = (
        f"(a) MoE FFN fwd+bwd, {scale.images}x{scale.tokens} tokens, D={d}, E={e}, "
        f"top-{k}, Hd={hd}, {'bf16 autocast' if device == 'cuda' else 'fp32'}; "
        "GPU = kernels queued ahead (launch overhead hidden), wall = eager incl. launches"
    )
    header = ["implementation", "GPU ms", "vs dense", "TFLOP/s", "wall ms", "vs dense"]
    return table(title, header, rows)


# ----------------------------------------------------------------------------- model
DEFAULT_CONFIG = "configs/m3vit/m3vit_vit-s16-moe16-top4-mg_2xb8-5k_nyud-480x640.py"
TINY_BACKBONE = dict(embed_dims=32, num_layers=4, num_heads=2, expert_hidden_dims=32)


def build_model(config: str, small: bool, device: str, **overrides: object) -> nn.Module:
    """The config's segmentor with random weights (no checkpoint), moved to ``device``.

    ``overrides`` go to the segmentor (``task_batched``) or, prefixed ``backbone_``, to
    the backbone (``backbone_dispatch``). ``small`` shrinks the backbone and heads.
    """
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    import mmseg_m3vit  # noqa: F401  (registers the plugin)

    init_default_scope("mmseg")
    cfg = Config.fromfile(config).model
    cfg.backbone.pretrained = None
    if small:
        cfg.backbone.update(TINY_BACKBONE)
        for head in cfg.decode_heads.values():
            head.channels = 16
    for key, value in overrides.items():
        if key.startswith("backbone_"):
            cfg.backbone[key.removeprefix("backbone_")] = value
        else:
            cfg[key] = value
    return MODELS.build(cfg).to(device)


def synthetic_batch(num: int, size: tuple[int, int], tasks: list[str], seed: int) -> dict:
    """``num`` random NYUD-like samples packed by the project's ``PackMultiTaskInputs``.

    Image uint8 (3, H, W); semseg ids in [0, 40); depth in [0.5, 10) m; unit normals;
    binary edges. Returns the data loader's collated form (lists of inputs/samples).
    """
    import numpy as np

    from mmseg_m3vit.datasets.transforms.formatting import PackMultiTaskInputs

    rng = np.random.default_rng(seed)
    h, w = size
    pack = PackMultiTaskInputs()
    inputs, samples = [], []
    for i in range(num):
        normals = rng.standard_normal((h, w, 3)).astype(np.float32)
        normals /= np.linalg.norm(normals, axis=2, keepdims=True)
        maps = {
            "semseg": ("gt_seg_map", rng.integers(0, 40, (h, w), dtype=np.uint8)),
            "depth": ("gt_depth_map", rng.uniform(0.5, 10.0, (h, w)).astype(np.float32)),
            "normals": ("gt_normal_map", normals),
            "edge": ("gt_edge_map", (rng.random((h, w)) < 0.1).astype(np.uint8)),
        }
        results = {
            "img": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            "img_path": f"synthetic_{seed}_{i}.jpg",
            "ori_shape": (h, w),
            "img_shape": (h, w),
            "scale_factor": (1.0, 1.0),
            "flip": False,
            "flip_direction": None,
        }
        results.update({maps[t][0]: maps[t][1] for t in tasks})
        packed = pack(results)
        inputs.append(packed["inputs"])
        samples.append(packed["data_samples"])
    return {"inputs": inputs, "data_samples": samples}


def batch_to(batch: dict, device: str) -> dict:
    """Move a collated batch to ``device`` (timing then excludes host-to-device copies)."""
    return {
        "inputs": [x.to(device) for x in batch["inputs"]],
        "data_samples": [s.to(device) for s in batch["data_samples"]],
    }


def train_step_part(
    device: str, config: str, small: bool, batch_size: int, warmup: int, reps: int
) -> str:
    """(b): images/s of ``model.train_step`` (preprocess, T-task loss, backward, SGD step).

    Rows go from the straightforward implementation to the optimised one, one change at
    a time: bf16 autocast, then grouped MoE dispatch, then the task-batched backbone.
    """
    from mmengine.optim import AmpOptimWrapper, OptimWrapper

    size = (64, 80) if small else (480, 640)
    cuda = device == "cuda"
    variants = [
        ("straightforward: T passes, per-expert loop, fp32", False, "loop", False),
        ("+ bf16 autocast", False, "loop", cuda),
        ("+ grouped MoE (`_grouped_mm`)", False, "grouped", cuda),
        ("+ task-batched backbone = optimised", True, "grouped", cuda),
    ]
    rows, base = [], None
    for name, batched, dispatch, amp in variants:
        torch.manual_seed(0)
        model = build_model(
            config, small, device, task_batched=batched, backbone_dispatch=dispatch
        ).train()
        tasks = list(model.tasks)
        batch = batch_to(synthetic_batch(batch_size, size, tasks, seed=0), device)
        sgd = torch.optim.SGD(model.parameters(), lr=2e-3, momentum=0.9, weight_decay=1e-4)
        wrapper = AmpOptimWrapper(optimizer=sgd, dtype="bfloat16") if amp else OptimWrapper(sgd)
        step = lambda m=model, d=batch, w=wrapper: m.train_step(d, w)  # noqa: E731
        ms = bench(step, device, warmup, reps)
        base = base or ms
        rows.append([name, f"{ms:.1f}", f"{batch_size / (ms * 1e-3):.1f}", f"{base / ms:.2f}x"])
        del model, wrapper, sgd, batch, step
        if cuda:
            torch.cuda.empty_cache()
    title = (
        f"(b) train step, {len(tasks)}-task NYUD model, batch {batch_size} at "
        f"{size[0]}x{size[1]}, synthetic data already on the device, SGD"
    )
    return table(title, ["implementation", "ms/step", "images/s", "speed-up"], rows)


FLOP_CATEGORIES = ("attention", "conv", "GEMM")


def count_flops(fn: Callable[[], object]) -> dict[str, int]:
    """FLOPs (2 per multiply-add) ``fn`` runs, per category and under ``'total'``.

    Categories: attention (SDPA), conv, GEMM (mm / addmm / bmm / grouped mm), as
    ``torch.utils.flop_counter`` attributes them.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    per_cat = dict.fromkeys(FLOP_CATEGORIES, 0)
    for op, n in counter.get_flop_counts()["Global"].items():
        name = str(op)
        cat = "attention" if "attention" in name else "conv" if "conv" in name else "GEMM"
        per_cat[cat] += n
    per_cat["total"] = counter.get_total_flops()
    return per_cat


KERNEL_CLASSES = (
    "attention",
    "conv",
    "GEMM",
    "upsample",
    "norm",
    "MoE sort/gather",
    "copy/cast",
    "other elementwise",
)


def kernel_category(name: str) -> str:
    """Class of a CUDA kernel, from its name (cuDNN / cuBLAS / CUTLASS / ATen kernels)."""
    n = name.lower()
    rules = (
        ("attention", ("flash", "fmha", "attention", "sdpa")),
        ("conv", ("conv", "fprop", "dgrad", "wgrad", "implicit")),
        ("GEMM", ("gemm", "gemv", "cutlass", "nvjet", "xmma", "matmul")),
        ("upsample", ("upsample", "interp")),
        ("norm", ("norm",)),
        ("MoE sort/gather", ("sort", "gather", "scatter", "index", "embedding", "search")),
        ("copy/cast", ("copy", "cat", "fill")),
    )
    for cls, keys in rules:
        if any(key in n for key in keys):
            return cls
    return "other elementwise"


def kernel_breakdown(fn: Callable[[], object], reps: int = 5) -> dict[str, float]:
    """CUDA kernel time (ms per call of ``fn``) per :func:`kernel_category`."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times = dict.fromkeys(KERNEL_CLASSES, 0.0)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            times[kernel_category(evt.name)] += evt.device_time / 1e3 / reps
    return times


def inference_part(
    device: str, config: str, small: bool, batches: list[int], peak_tflops: float, reps: int
) -> str:
    """(c): single-task (semseg) inference images/s and MFU, backbone + head, bf16.

    FLOPs are counted once per image on the sorted dispatch (plain matmuls, so every
    expert matmul is seen); timing uses the grouped dispatch. MFU = FLOPs x images/s /
    the bf16 matmul peak measured in this run.
    """
    size = (64, 80) if small else (480, 640)
    cuda = device == "cuda"
    task = "semseg"
    model = build_model(config, small, device).eval()
    head = model.heads[task]

    def run(x: Tensor, part: str) -> Tensor:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            if part == "head":
                return head(tokens_for[x.shape[0]], grid, size)
            out = model.backbone(x, task)
            return out.tokens if part == "backbone" else head(out.tokens, out.grid, size)

    for moe in model.backbone.modules():
        if hasattr(moe, "dispatch"):
            moe.dispatch = "sorted"
    tokens_for: dict[int, Tensor] = {}
    with torch.inference_mode():
        one = torch.randn(1, 3, *size, device=device)
        cats = {part: count_flops(lambda p=part: run(one, p)) for part in ("full", "backbone")}
    flops = {part: c["total"] for part, c in cats.items()}
    flops["head"] = flops["full"] - flops["backbone"]
    for moe in model.backbone.modules():
        if hasattr(moe, "dispatch"):
            moe.dispatch = "auto"
    rows = []
    grid = (size[0] // 16, size[1] // 16)
    for label, part in (("backbone + head", "full"), ("backbone", "backbone"), ("head", "head")):
        for b in batches:
            x = torch.randn(b, 3, *size, device=device)
            with torch.inference_mode():
                if part == "head":
                    tokens_for[b] = run(x, "backbone")
                ms = bench(lambda x=x, p=part: run(x, p), device, warmup=3, reps=reps)
            ips = b / (ms * 1e-3)
            achieved = flops[part] * ips / 1e12
            rows.append(
                [
                    label,
                    str(b),
                    f"{ms:.2f}",
                    f"{ips:.1f}",
                    f"{flops[part] / 1e9:.1f}",
                    f"{achieved:.0f}",
                    f"{100 * achieved / peak_tflops:.1f}%",
                ]
            )
            tokens_for.pop(b, None)
    text = ""
    if cuda:  # what bounds it: kernel time and achieved rate per class, largest batch
        b = batches[-1]
        x = torch.randn(b, 3, *size, device=device)
        with torch.inference_mode():
            times = kernel_breakdown(lambda: run(x, "full"))
        total = sum(times.values())
        brows = []
        for cat in KERNEL_CLASSES:
            f = cats["full"].get(cat, 0) * b
            rate = f"{f / (times[cat] * 1e-3) / 1e12:.0f}" if f and times[cat] else "-"
            brows.append(
                [
                    cat,
                    f"{times[cat]:.2f}",
                    f"{100 * times[cat] / max(total, 1e-9):.0f}%",
                    f"{f / 1e12:.2f}",
                    rate,
                ]
            )
        text = "\n" + table(
            f"(c') where the time goes: backbone + head, batch {b}, CUDA kernel time by class",
            ["kernels", "ms", "share", "TFLOP", "TFLOP/s"],
            brows,
        )
    title = (
        f"(c) single-task ({task}) inference at {size[0]}x{size[1]}, "
        f"{'bf16 autocast, grouped MoE' if cuda else 'fp32'}; "
        f"MFU against the measured peak {peak_tflops:.0f} TFLOP/s"
    )
    header = ["part", "batch", "ms", "images/s", "GFLOP/img", "TFLOP/s", "MFU"]
    return table(title, header, rows) + text


# ----------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="toy sizes (CPU smoke test)")
    p.add_argument("--parts", default="abc", help="which parts to run, e.g. 'a' or 'bc'")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per case")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="4-task NYUD config for (b), (c)")
    p.add_argument("--train-batch", type=int, default=8, help="(b) images per step")
    p.add_argument("--infer-batches", default="8,32,64", help="(c) batch sizes, comma-separated")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; use --device cpu --small")
    reps = args.reps or (3 if args.small else 50)
    warmup = 1 if args.small else 10
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    peak = matmul_peak_tflops(
        args.device, 256 if args.small else 8192, reps=3 if args.small else 10
    )
    kind = "bf16 " if args.device == "cuda" else "fp32 "
    print(f"matmul peak (measured, {kind}random data): {peak:.0f} TFLOP/s\n", flush=True)
    if "a" in args.parts:
        scale = MoEScale(2, 33, 32, 32, 4, 2) if args.small else MoEScale(8, 1201, 384, 384, 16, 4)
        print(moe_ffn_part(args.device, scale, warmup, reps), flush=True)
    if "b" in args.parts:
        b_reps = 3 if args.small else 10
        print(
            train_step_part(args.device, args.config, args.small, args.train_batch, 2, b_reps),
            flush=True,
        )
    if "c" in args.parts:
        batches = [2] if args.small else [int(b) for b in args.infer_batches.split(",")]
        c_reps = 3 if args.small else 20
        print(
            inference_part(args.device, args.config, args.small, batches, peak, c_reps),
            flush=True,
        )


if __name__ == "__main__":
    main()
