"""Speed benchmark of the M3ViT model on one GPU, printed as markdown tables in ONE run.

    python tools/analysis_tools/benchmark.py [--device cuda|cpu] [--small] [--parts bc]

(b) Train-step images/s of the 4-task NYUD model at 480x640 (random data on the
    device): from the straightforward implementation (one backbone pass per task,
    per-expert loop MoE, float32) to the optimised one (task-batched backbone, fused
    MoE kernels, bf16 autocast), one change per row, and a dense ViT-S multi-task model
    with the same heads (every FFN a dense 1536-unit MLP = the MoE's active FLOPs;
    the shared backbone runs once for all tasks) as the reference; on CUDA, (b') the
    kernel time and achieved TFLOP/s per kernel class of those two steps. Each step is
    timed eagerly (wall time, host launches included) and, on CUDA, as GPU time.
(c) Single-task (semseg) inference, bf16 autocast: the M3ViT backbone against the dense
    ViT-S backbone of equal active FLOPs at batch 1, 8 and 64, eagerly (launches
    included) and replayed from a CUDA graph; backbone + head images/s and model-FLOPs
    utilisation against the bf16 matmul peak measured in the same run (8192^3 product
    on random data), plus backbone + head without the head's eval BatchNorm folding
    (the fast path of ``decode_heads/conv_fold.py``) at the largest batch; (c') where
    the kernel time of backbone + head goes.

The MoE layer alone is benchmarked by ``benchmark_moe.py`` beside this file.
Timing: CUDA events around each repetition after warm-up, median over repetitions
(``time.perf_counter`` medians on CPU). ``--device cpu --small`` runs every part at toy
sizes so the script is testable without a GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import os.path as osp
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


# ----------------------------------------------------------------------------- timing
def bench(
    fn: Callable[[], object], device: str, warmup: int, reps: int, hide_launch: bool = False
) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs after ``warmup`` runs.

    CUDA: events around each run. With ``hide_launch`` the stream is first held busy by a
    spin kernel (``torch.cuda._sleep``) of at least 2 ms and twice the eager wall time
    of the last warm-up run, so that the host queues all of ``fn``'s kernels ahead of
    the GPU: the result is then GPU time, without host launch overhead (host
    synchronisations inside ``fn`` still count). Without it, runs are separated by a
    synchronisation and the time includes the host's launch overhead (eager wall time).
    """
    for _ in range(max(warmup - 1, 0)):
        fn()
    wall_ms = 0.0
    if warmup:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    times = []
    if device == "cuda":
        # ~1.98e6 spin cycles per ms at the H200's clock
        spin_cycles = int(max(2.0, 2 * wall_ms) * 1.98e6) if hide_launch else 0
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


# ----------------------------------------------------------------------------- model
DEFAULT_CONFIG = osp.join(
    ROOT, "configs", "m3vit", "m3vit_vit-s16-moe16-top4-mg_2xb8-5k_nyud-480x640.py"
)
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


def batch_to(batch: dict, device: str) -> dict:
    """Move a collated batch to ``device`` (timing then excludes host-to-device copies)."""
    return {
        "inputs": [x.to(device) for x in batch["inputs"]],
        "data_samples": [s.to(device) for s in batch["data_samples"]],
    }


def train_step_part(
    device: str,
    config: str,
    small: bool,
    batch_size: int,
    warmup: int,
    reps: int,
    rounds: int = 3,
) -> str:
    """(b): images/s of ``model.train_step`` (preprocess, T-task loss, backward, SGD step).

    Rows go from the straightforward implementation to the optimised one, one change at
    a time, then the dense multi-task reference (``moe_layers=[]``: every block a dense
    MLP; the task-batched pass then runs the backbone once and repeats its tokens for
    the T heads). The last column divides by the dense reference. Then, on CUDA, (b')
    the two steps' kernel time per class and (b'') ``rounds`` more measurements of the
    optimised step and the reference taken in turn, so that drift of the device over
    the run (clocks, other tenants) falls on both alike.
    """
    from mmengine.optim import AmpOptimWrapper, OptimWrapper

    from mmseg_m3vit.datasets.random_mt import random_batch
    from mmseg_m3vit.engine import BF16_OPTIM_WRAPPER

    size = (64, 80) if small else (480, 640)
    cuda = device == "cuda"
    variants = [  # name, task_batched, dispatch, amp, dense
        ("straightforward: T passes, per-expert loop, fp32", False, "loop", False, False),
        ("+ bf16 autocast", False, "loop", cuda, False),
        ("+ grouped MoE (`_grouped_mm`)", False, "grouped", cuda, False),
        ("+ task-batched backbone", True, "grouped", cuda, False),
        ("+ fused MoE kernels ('auto') = optimised", True, "auto", cuda, False),
        ("dense ViT-S multi-task, same heads (reference)", True, "auto", cuda, True),
    ]
    results = []
    breakdown: dict[str, tuple[dict[str, float], dict[str, int]]] = {}
    pair: dict[str, Callable[[], object]] = {}  # the optimised step and the reference
    for name, batched, dispatch, amp, dense in variants:
        torch.manual_seed(0)
        extra = {"backbone_moe_layers": []} if dense else {}
        model = build_model(
            config, small, device, task_batched=batched, backbone_dispatch=dispatch, **extra
        ).train()
        tasks = list(model.tasks)
        batch = batch_to(random_batch(batch_size, size, tasks, seed=0), device)
        sgd = torch.optim.SGD(model.parameters(), lr=2e-3, momentum=0.9, weight_decay=1e-4)
        wrapper = (  # as tools/train.py --amp
            AmpOptimWrapper(
                optimizer=sgd,
                dtype=BF16_OPTIM_WRAPPER["dtype"],
                loss_scale=dict(BF16_OPTIM_WRAPPER["loss_scale"]),
            )  # fmt: skip
            if amp
            else OptimWrapper(sgd)
        )
        step = lambda m=model, d=batch, w=wrapper: m.train_step(d, w)  # noqa: E731
        eager = bench(step, device, warmup, reps)
        gpu = bench(step, device, warmup, reps, hide_launch=True) if cuda else float("nan")
        results.append((name, eager, gpu))
        if cuda and batched and dispatch == "auto":  # the optimised step and the reference
            breakdown["dense MTL" if dense else "M3ViT"] = (
                kernel_breakdown(step, reps=3),
                step_flops(model, step),
            )
            pair["dense MTL" if dense else "M3ViT"] = step
            continue  # kept for the alternating rounds
        del model, wrapper, sgd, batch, step
        if cuda:
            torch.cuda.empty_cache()
    base, dense_ms, dense_gpu = results[0][1], results[-1][1], results[-1][2]
    rows = [
        [
            n,
            f"{ms:.1f}",
            f"{batch_size / (ms * 1e-3):.1f}",
            f"{base / ms:.2f}x",
            f"{dense_ms / ms:.2f}x",
            f"{gpu:.1f}" if cuda else "-",
            f"{dense_gpu / gpu:.2f}x" if cuda else "-",
        ]
        for n, ms, gpu in results
    ]
    title = (
        f"(b) train step, {len(tasks)}-task NYUD model, batch {batch_size} at "
        f"{size[0]}x{size[1]}, random data already on the device, SGD; eager wall time "
        "(host launches included) and GPU time (kernels queued ahead behind a spin; "
        "launches after a host synchronisation inside the step still count)"
    )
    header = [
        "implementation",
        "ms/step",
        "images/s",
        "speed-up",
        "images/s vs dense MTL",
        "GPU ms/step",
        "GPU vs dense MTL",
    ]
    text = table(title, header, rows)
    if breakdown:
        text += "\n" + train_breakdown_table(breakdown, batch_size)
    if len(pair) == 2 and rounds > 0:
        flop_ratio = breakdown["M3ViT"][1]["total"] / breakdown["dense MTL"][1]["total"]
        text += "\n" + alternating_rounds_table(
            pair, device, warmup, reps, rounds, batch_size, flop_ratio
        )
    pair.clear()
    if cuda:
        torch.cuda.empty_cache()
    return text


def alternating_rounds_table(
    pair: dict[str, Callable[[], object]],
    device: str,
    warmup: int,
    reps: int,
    rounds: int,
    batch_size: int,
    flop_ratio: float,
) -> str:
    """(b''): the optimised step and the dense reference measured in turn, ``rounds``
    times (each round: M3ViT eager, dense eager, M3ViT GPU, dense GPU; medians of
    ``reps`` steps), with the per-round and median ratios of images/s.

    ``flop_ratio`` is M3ViT's FLOPs per step over the reference's: the median ratios
    times it compare the two steps' FLOP rates (1.0 = equally efficient kernels)."""
    rows, eager_ratios, gpu_ratios = [], [], []
    ours, dense = pair["M3ViT"], pair["dense MTL"]
    for r in range(rounds):
        e_ours, e_dense = bench(ours, device, warmup, reps), bench(dense, device, warmup, reps)
        g_ours = bench(ours, device, warmup, reps, hide_launch=True)
        g_dense = bench(dense, device, warmup, reps, hide_launch=True)
        eager_ratios.append(e_dense / e_ours)
        gpu_ratios.append(g_dense / g_ours)
        rows.append(
            [
                str(r + 1),
                f"{e_ours:.1f}",
                f"{e_dense:.1f}",
                f"{eager_ratios[-1]:.2f}x",
                f"{g_ours:.1f}",
                f"{g_dense:.1f}",
                f"{gpu_ratios[-1]:.2f}x",
            ]
        )
    eager, gpu = statistics.median(eager_ratios), statistics.median(gpu_ratios)
    rows.append(["median", "", "", f"{eager:.2f}x", "", "", f"{gpu:.2f}x"])
    rows.append(
        [
            "median x FLOP ratio (FLOP/s ratio)",
            "",
            "",
            f"{eager * flop_ratio:.2f}x",
            "",
            "",
            f"{gpu * flop_ratio:.2f}x",
        ]
    )
    title = (
        f"(b'') optimised M3ViT step vs dense MTL, {rounds} alternating rounds at batch "
        f"{batch_size}: ms/step (median of {reps}) and images/s ratio (dense ms / M3ViT "
        f"ms); M3ViT runs {flop_ratio:.2f}x the FLOPs per step (its backbone runs once "
        "per task after the first router), so at equal FLOP rates the ratio is "
        f"{1 / flop_ratio:.2f}x"
    )
    header = [
        "round",
        "M3ViT eager ms",
        "dense eager ms",
        "eager images/s ratio",
        "M3ViT GPU ms",
        "dense GPU ms",
        "GPU images/s ratio",
    ]
    return table(title, header, rows)


def step_flops(model: nn.Module, step: Callable[[], object]) -> dict[str, int]:
    """FLOPs of one train step (forward and backward) per :data:`FLOP_CATEGORIES`.

    Counted with the MoE layers on the sorted dispatch (plain matmuls that the counter
    sees; the fused kernels are opaque to it), then set back to the default.
    """
    moes = [m for m in model.modules() if hasattr(m, "dispatch")]
    saved = [m.dispatch for m in moes]
    for m in moes:
        m.dispatch = "sorted"
    try:
        return count_flops(step)
    finally:
        for m, d in zip(moes, saved):
            m.dispatch = d


def train_breakdown_table(
    breakdown: dict[str, tuple[dict[str, float], dict[str, int]]], batch_size: int
) -> str:
    """(b'): per kernel class, CUDA ms per step, TFLOP per step and TFLOP/s of each model.

    ``breakdown`` maps a model's name to (kernel ms per class, FLOPs per class).
    """
    names = list(breakdown)
    header = ["kernels"]
    for n in names:
        header += [f"{n}: ms", "TFLOP", "TFLOP/s"]
    rows = []
    for cat in [*KERNEL_CLASSES, "total"]:
        row = [cat]
        for n in names:
            ktimes, flops = breakdown[n]
            ms = sum(ktimes.values()) if cat == "total" else ktimes[cat]
            f = flops.get(cat, 0)
            rate = f"{f / (ms * 1e-3) / 1e12:.0f}" if f and ms else "-"
            row += [f"{ms:.2f}", f"{f / 1e12:.2f}" if f else "-", rate]
        rows.append(row)
    title = (
        f"(b') where the train step's time goes, batch {batch_size}: CUDA kernel time per "
        "class (profiler, 3 steps) and the FLOPs of one step (forward + backward)"
    )
    return table(title, header, rows)


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


def graphed(fn: Callable[[], Tensor]) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph (after warm-up on a side stream); returns replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def inference_part(
    device: str, config: str, small: bool, batches: list[int], peak_tflops: float, reps: int
) -> str:
    """(c): single-task (semseg) inference, bf16 autocast; M3ViT vs dense ViT-S backbone.

    FLOPs are counted once per image on the sorted dispatch (plain matmuls, so every
    expert matmul is seen); timing uses the default dispatch ('auto'). MFU = FLOPs x
    images/s / the bf16 matmul peak measured in this run. Each case is timed eagerly
    (one synchronised call: the latency, launches included) and, on CUDA, as a CUDA
    graph replay (the same kernels without launch gaps).
    """
    size = (64, 80) if small else (480, 640)
    cuda = device == "cuda"
    task = "semseg"
    models = {
        "M3ViT": build_model(config, small, device).eval(),
        "dense ViT-S": build_model(config, small, device, backbone_moe_layers=[]).eval(),
    }

    def runner(model: nn.Module, x: Tensor, part: str) -> Callable[[], Tensor]:
        head = model.heads[task]

        def run() -> Tensor:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda, cache_enabled=False):
                out = model.backbone(x, task)
                return out.tokens if part == "backbone" else head(out.tokens, out.grid, size)

        return run

    from mmseg_m3vit.models.decode_heads import conv_fold

    flops = {}
    with torch.inference_mode():
        one = torch.randn(1, 3, *size, device=device)
        conv_fold.FOLD_MODE = "off"  # the flop counter sees aten convolutions only
        for name, model in models.items():
            for moe in model.backbone.modules():
                if hasattr(moe, "dispatch"):
                    moe.dispatch = "sorted"
            for part in ("full", "backbone"):
                flops[name, part] = count_flops(runner(model, one, part))
            for moe in model.backbone.modules():
                if hasattr(moe, "dispatch"):
                    moe.dispatch = "auto"
        conv_fold.FOLD_MODE = "auto"
    modes = ["eager", "CUDA graph"] if cuda else ["eager"]
    rows, times = [], {}
    for part, label in (("backbone", "backbone"), ("full", "backbone + head")):
        for b in batches:
            x = torch.randn(b, 3, *size, device=device)
            for mode in modes:
                for name, model in models.items():
                    with torch.inference_mode():
                        fn = runner(model, x, part)
                        if mode != "eager":
                            fn = graphed(fn)
                        ms = bench(fn, device, warmup=3, reps=reps)
                    times[name, part, b, mode] = ms
                    f = flops[name, part]["total"]
                    ips = b / (ms * 1e-3)
                    dense_ms = times.get(("M3ViT", part, b, mode), ms)
                    rows.append(
                        [
                            label,
                            name,
                            str(b),
                            mode,
                            f"{ms:.2f}",
                            f"{ms / b:.3f}",
                            f"{f / 1e9:.1f}",
                            f"{100 * f * ips / 1e12 / peak_tflops:.1f}%",
                            f"{dense_ms / ms:.2f}x" if name != "M3ViT" else "",
                        ]
                    )
                    del fn
    if cuda:  # the same pass without the head's BN folding, largest batch, graph
        b, name = batches[-1], "M3ViT"
        x = torch.randn(b, 3, *size, device=device)
        conv_fold.FOLD_MODE = "off"
        with torch.inference_mode():
            fn = graphed(runner(models[name], x, "full"))
            ms = bench(fn, device, warmup=3, reps=reps)
        conv_fold.FOLD_MODE = "auto"
        f = flops[name, "full"]["total"]
        rows.append(
            [
                "backbone + head, BN not folded",
                name,
                str(b),
                "CUDA graph",
                f"{ms:.2f}",
                f"{ms / b:.3f}",
                f"{f / 1e9:.1f}",
                f"{100 * f * b / (ms * 1e-3) / 1e12 / peak_tflops:.1f}%",
                f"{times[name, 'full', b, 'CUDA graph'] / ms:.2f}x",
            ]
        )
        del fn
    text = ""
    if cuda:  # what bounds it: kernel time and achieved rate per class, largest batch
        b = batches[-1]
        x = torch.randn(b, 3, *size, device=device)
        with torch.inference_mode():
            ktimes = kernel_breakdown(runner(models["M3ViT"], x, "full"))
        total = sum(ktimes.values())
        brows = []
        for cat in KERNEL_CLASSES:
            f = flops["M3ViT", "full"].get(cat, 0) * b
            rate = f"{f / (ktimes[cat] * 1e-3) / 1e12:.0f}" if f and ktimes[cat] else "-"
            brows.append(
                [
                    cat,
                    f"{ktimes[cat]:.2f}",
                    f"{100 * ktimes[cat] / max(total, 1e-9):.0f}%",
                    f"{f / 1e12:.2f}",
                    rate,
                ]
            )
        text = "\n" + table(
            f"(c') where the time goes: M3ViT backbone + head, batch {b}, eager, CUDA kernel "
            "time by class",
            ["kernels", "ms", "share", "TFLOP", "TFLOP/s"],
            brows,
        )
    title = (
        f"(c) single-task ({task}) inference at {size[0]}x{size[1]}, "
        f"{'bf16 autocast' if cuda else 'fp32'}, default dispatch; MFU against the "
        f"measured peak {peak_tflops:.0f} TFLOP/s; last column: M3ViT time / this time"
    )
    header = ["part", "model", "batch", "mode", "ms", "ms/img", "GFLOP/img", "MFU", "M3ViT/this"]
    return table(title, header, rows) + text


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="toy sizes (CPU smoke test)")
    p.add_argument("--parts", default="bc", help="which parts to run: 'b', 'c' or 'bc'")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per case")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="4-task NYUD config for (b), (c)")
    p.add_argument("--train-batch", type=int, default=8, help="(b) images per step")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="(b'') alternating measurements of the optimised step and the dense reference",
    )
    p.add_argument("--infer-batches", default="1,8,64", help="(c) batch sizes, comma-separated")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; use --device cpu --small")
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    peak = matmul_peak_tflops(
        args.device, 256 if args.small else 8192, reps=3 if args.small else 10
    )
    kind = "bf16 " if args.device == "cuda" else "fp32 "
    print(f"matmul peak (measured, {kind}random data): {peak:.0f} TFLOP/s\n", flush=True)
    if "b" in args.parts:
        b_reps = args.reps or (3 if args.small else 10)
        print(
            train_step_part(
                args.device,
                args.config,
                args.small,
                args.train_batch,
                2,
                b_reps,
                args.rounds,
            ),
            flush=True,
        )
    if "c" in args.parts:
        batches = [1] if args.small else [int(b) for b in args.infer_batches.split(",")]
        c_reps = args.reps or (3 if args.small else 20)
        print(
            inference_part(args.device, args.config, args.small, batches, peak, c_reps),
            flush=True,
        )


if __name__ == "__main__":
    main()
