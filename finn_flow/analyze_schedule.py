#!/usr/bin/env python
"""Expert-weight traffic, on-chip memory and cycles of three MoE schedules on real routing.

Usage::

    python finn_flow/analyze_schedule.py --task normals [--checkpoint CKPT] [--config CFG]
        [--images N] [--out DIR] [--axi-bits 128] [--latency 64] [--pe P --simd S]
        [--samples 16] [--trust-checkpoint]

From the model's routing on the val split (each image, each MoE layer, every task of the
config; the FPGA input size of the config's ``fpga`` section), per MoE layer and frame:

(a) **token order, 2-slot expert cache**: tokens in order, each token's k experts in
    rank order; two expert buffers (the same on-chip budget as (b)) with LRU replacement;
    a miss fetches the expert's image from DDR, into the slot the current token does not
    use, so the fetch overlaps the current row's compute;
(b) **reordered, double-buffered** (M3ViT section 8 / this project's ``ExpertFFN``):
    expert by expert over the non-empty experts, next expert fetched while one computes;
(c) **all experts resident**: every expert on chip, nothing fetched per frame;

reporting expert-weight bytes from DDR per frame, on-chip expert-weight bytes, cycles
with and without load/compute overlap (the ``ExpertFFN`` cycle model:
``finn_flow/moe_ops/schedule.py``; one PE x SIMD MAC array, the same for every schedule
and every point of the plots, one AXI port), and the cost
of switching tasks (router weights, plus the head's weights when the head changes).
The paper's claims are printed beside the measured values.

PNGs show how each quantity scales with the number of experts E in {4, 8, 16, 32, 64} and
the tokens per frame T in {21, 129, 1201} (64x80, 128x256 and 480x640 inputs with 16-pixel
patches). Only the config's own (E, T) uses measured routing; every other point is
*modelled*: tokens drawn independently from the measured per-layer expert-load
distribution (its rank profile stretched to E experts), and is marked so.
Without ``--checkpoint`` the routing is that of randomly initialised routers, and
everything says so: it is **untrained routing**.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow `python finn_flow/analyze_schedule.py` from a checkout
    sys.path.insert(0, str(REPO))

from finn_flow.moe_ops.schedule import ffn_schedule  # noqa: E402

DEFAULT_CONFIG = (
    REPO / "configs" / "fpga" / "m3vit_vit-t16-6blk-moe16-top2-mg_fpga_synthnyud-64x80.py"
)
SCALE_E = (4, 8, 16, 32, 64)
SCALE_T = (21, 129, 1201)
PAPER_CLAIMS = {
    "memory": "the accelerator needs 2.4x less memory than a comparable FPGA baseline "
    "(M3ViT abstract, ZCU104)",
    "task_switch": "zero-overhead task switching: experts are shared, only the task's router "
    "weights change (M3ViT's hardware co-design)",
}


# ------------------------------------------------------------------ cost model
@dataclass(frozen=True)
class EngineCosts:
    """Sizes and rates of one MoE layer's engine (cycles of the kernel clock).

    Attributes:
        tokens: T; experts: E; top_k: k.
        expert_bytes: one expert's image in DDR (AXI aligned).
        axi_bytes: bytes per AXI beat; latency: cycles from request to first beat.
        row_cycles: MAC-array cycles of one (token, expert) row (fc1 + fc2).
    """

    tokens: int
    experts: int
    top_k: int
    expert_bytes: int
    axi_bytes: int
    latency: int
    row_cycles: int

    @property
    def load_beats(self) -> int:
        """AXI beats of one expert image."""
        return -(-self.expert_bytes // self.axi_bytes)

    @property
    def load_cycles(self) -> int:
        """Cycles of one expert fetch (latency + beats)."""
        return self.latency + self.load_beats


def reordered(c: EngineCosts, ids: np.ndarray) -> dict[str, Any]:
    """(b): the double-buffered expert-by-expert schedule of ``ExpertFFN`` on ids (T, k)."""
    counts = np.bincount(np.asarray(ids).ravel(), minlength=c.experts)
    prologue = c.tokens + c.experts + c.tokens * c.top_k
    s = ffn_schedule(counts, c.load_beats, c.latency, c.row_cycles, prologue, c.axi_bytes)
    return {
        "ddr_bytes": len(s.steps) * c.expert_bytes,
        "loads": len(s.steps),
        "onchip_bytes": 2 * c.expert_bytes,
        "cycles_overlap": s.total_cycles,
        "cycles_serial": s.no_overlap_cycles,
    }


def token_order(c: EngineCosts, ids: np.ndarray, slots: int = 2) -> dict[str, Any]:
    """(a): tokens in order with an LRU cache of ``slots`` experts.

    A miss evicts the least recently used expert; its fetch may start once the DMA is free
    and the victim slot's last row has finished, so it overlaps the rows before it.
    Without overlap every fetch and every row are in sequence.
    """
    seq = [int(e) for e in np.asarray(ids).reshape(-1)]
    prologue = c.tokens
    cache: list[int] = []  # experts, least recently used first
    slot_of: dict[int, int] = {}
    ready = [prologue] * slots  # fetch end per slot
    release = [prologue] * slots  # end of the last row that used the slot
    dma_free, ce_prev, loads = prologue, prologue, 0
    for e in seq:
        if e in slot_of:
            slot = slot_of[e]
            cache.remove(e)
        else:
            loads += 1
            if len(cache) < slots:
                slot = len(cache)
            else:
                victim = cache.pop(0)
                slot = slot_of.pop(victim)
            ls = max(dma_free, release[slot])
            ready[slot] = dma_free = ls + c.load_cycles
            slot_of[e] = slot
        cache.append(e)
        cs = max(ready[slot], ce_prev)
        ce_prev = release[slot] = cs + c.row_cycles
    serial = prologue + loads * c.load_cycles + len(seq) * c.row_cycles
    return {
        "ddr_bytes": loads * c.expert_bytes,
        "loads": loads,
        "onchip_bytes": slots * c.expert_bytes,
        "cycles_overlap": ce_prev,
        "cycles_serial": serial,
    }


def all_resident(c: EngineCosts, ids: np.ndarray) -> dict[str, Any]:
    """(c): every expert on chip; rows in token order, no fetches per frame."""
    cycles = c.tokens + int(np.asarray(ids).size) * c.row_cycles
    return {
        "ddr_bytes": 0,
        "loads": 0,
        "onchip_bytes": c.experts * c.expert_bytes,
        "cycles_overlap": cycles,
        "cycles_serial": cycles,
    }


SCHEDULES = {
    "token_order_2slot": token_order,
    "reordered_double_buffered": reordered,
    "all_resident": all_resident,
}
LABELS = {
    "token_order_2slot": "(a) token order, 2-slot cache",
    "reordered_double_buffered": "(b) reordered, double-buffered",
    "all_resident": "(c) all experts resident",
}


def evaluate(c: EngineCosts, routings: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """Mean and max of every quantity over ``routings`` (one (T, k) array per frame-layer)."""
    out: dict[str, dict[str, float]] = {}
    for name, fn in SCHEDULES.items():
        rows = [fn(c, r) for r in routings]
        out[name] = {}
        for key in rows[0]:
            vals = np.array([r[key] for r in rows], dtype=np.float64)
            out[name][key] = float(vals.mean())
            out[name][f"{key}_max"] = float(vals.max())
    return out


# ------------------------------------------------------------------ modelled routing
def stretch_profile(load: np.ndarray, experts: int) -> np.ndarray:
    """The rank profile of an expert-load distribution (E,) resampled to ``experts``
    experts (the sorted loads as a piecewise-linear CDF on [0, 1]); sums to 1."""
    p = np.sort(np.asarray(load, dtype=np.float64))[::-1]
    p = p / p.sum()
    cdf = np.concatenate([[0.0], np.cumsum(p)])
    grid = np.linspace(0.0, 1.0, len(p) + 1)
    q = np.diff(np.interp(np.linspace(0.0, 1.0, experts + 1), grid, cdf))
    q = np.clip(q, 1e-12, None)
    return q / q.sum()


def sample_routing(
    prob: np.ndarray, tokens: int, top_k: int, rng: np.random.Generator
) -> np.ndarray:
    """ids (T, k): each token picks k distinct experts with probabilities ``prob``
    (independently of other tokens; Gumbel top-k = sampling without replacement)."""
    g = rng.gumbel(size=(tokens, prob.size)) + np.log(prob)[None]
    perm = rng.permutation(prob.size)  # which expert id gets which load rank
    return perm[np.argsort(-g, axis=1)[:, :top_k]]


# ------------------------------------------------------------------ model and data
def expert_image_bytes(dim: int, hidden: int, bits: int, axi_bits: int) -> int:
    """One expert's DDR image (finn_flow/moe_ops/ddr.py layout, shared thresholds):
    W1, W2 at ``bits``, b1 on a 24-bit accumulator grid, b2 at 16 bits."""
    from finn_flow.moe_ops.ddr import expert_layout

    counts = {"w1": dim * hidden, "b1": hidden, "thr1": 0, "w2": dim * hidden, "b2": dim}
    widths = {"w1": bits, "b1": 24, "thr1": 0, "w2": bits, "b2": 16}
    return expert_layout(dim, hidden, counts, widths, axi_bits).stride


def _images(cfg: Any, n: int, size: tuple[int, int], seed: int) -> tuple[list, str]:
    """Up to n normalised (1, 3, H, W) val images at ``size``, or synthetic ones."""
    import torch
    import torch.nn.functional as F

    try:
        from mmengine.registry import init_default_scope
        from mmseg.registry import DATASETS, MODELS

        import mmseg_m3vit  # noqa: F401

        init_default_scope(cfg.get("default_scope", "mmseg"))
        dcfg = dict(cfg.val_dataloader.dataset)
        root = Path(dcfg.get("data_root", ""))
        if not root.is_absolute():
            root = REPO / root
        if not root.exists():
            raise FileNotFoundError(f"data root {root} does not exist")
        dcfg["data_root"] = str(root)
        dataset = DATASETS.build(dcfg)
        pre = MODELS.build(dict(cfg.model.data_preprocessor))
        imgs = []
        for i in range(min(n, len(dataset))):
            batch = pre(dict(inputs=[dataset[i]["inputs"]]), False)["inputs"].float()
            imgs.append(F.interpolate(batch, size=size, mode="bilinear", align_corners=False))
        if imgs:
            return imgs, f"val split of {root} ({len(imgs)} images)"
        raise ValueError("the val split is empty")
    except Exception as err:  # noqa: BLE001 - said in the output
        gen = torch.Generator().manual_seed(seed)
        imgs = [torch.randn(1, 3, *size, generator=gen) for _ in range(n)]
        return imgs, f"SYNTHETIC N(0,1) images (val data unusable: {err})"


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model, route the images; returns routing per task / image / layer."""
    import torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    import mmseg_m3vit  # noqa: F401
    from mmseg_m3vit.compat.checkpoint import load_model_checkpoint

    cfg = Config.fromfile(args.config)
    init_default_scope(cfg.get("default_scope", "mmseg"))
    from mmseg_m3vit.models.segmentors import model_head_configs

    tasks = list(model_head_configs(cfg.model))  # as the segmentor chooses them
    if args.task not in tasks:
        raise SystemExit(f"analyze_schedule.py: error: unknown task {args.task!r}; valid: {tasks}")
    torch.manual_seed(args.seed)
    mcfg = cfg.model.copy()
    mcfg["backbone"] = dict(mcfg["backbone"], pretrained=None)
    mcfg["backbone"].pop("init_cfg", None)
    model = MODELS.build(mcfg).eval()
    if args.checkpoint:
        load_model_checkpoint(model, args.checkpoint, trust=args.trust_checkpoint or None)
    fpga = dict(cfg.get("fpga", {}))
    size = tuple(fpga.get("input_size", cfg.model.backbone.get("img_size", (64, 80))))
    images, note = _images(cfg, args.images, size, args.seed)
    backbone = model.backbone
    routing: dict[str, list[list[np.ndarray]]] = {}
    with torch.no_grad():
        for task in tasks:
            per_img = []
            for img in images:
                out = backbone(img, None if backbone.router_variant == "shared" else task)
                per_img.append([r.expert_ids.reshape(-1, r.expert_ids.shape[-1]).numpy()
                                for r in out.routing])  # fmt: skip
            routing[task] = per_img
    heads = {t: sum(p.numel() for p in model.heads[t].parameters()) for t in tasks}
    moe = backbone.blocks[backbone.moe_layers[0]].moe
    e, d, hd = moe.w1.shape
    return {
        "tasks": tasks,
        "routing": routing,
        "images": note,
        "input_size": list(size),
        "tokens": int(routing[tasks[0]][0][0].shape[0]),
        "dims": {
            "D": int(d),
            "Hd": int(hd),
            "E": int(e),
            "k": int(moe.top_k),
            "moe_layers": len(backbone.moe_layers),
        },  # fmt: skip
        "head_params": heads,
        "router_params_per_layer": int(d) * int(e),
        "bits": int(fpga.get("bits", 8)),
    }


def balanced_fold(
    d: int, hd: int, tokens: int, k: int, e: int, load_cycles: int
) -> tuple[int, int]:
    """PE, SIMD as the MoE replacement chooses them by default (balanced MAC array)."""
    from finn_flow.moe_ops.transform import default_folding

    prm = {"D": d, "Hd": hd, "T": tokens, "k": k, "E": e}
    fold = default_folding(prm, 0, load_cycles, 0)["ExpertFFN"]
    return fold["PE"], fold["SIMD"]


# ------------------------------------------------------------------ analysis
def analyse(data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """All numbers of the report (measured routing + modelled scaling)."""
    dims, bits = data["dims"], data["bits"]
    d, hd, e, k = dims["D"], dims["Hd"], dims["E"], dims["k"]
    axi_bytes = args.axi_bits // 8
    ebytes = expert_image_bytes(d, hd, bits, args.axi_bits)

    t_meas = data["tokens"]
    # one MAC array for every point (the config's balanced default, or --pe / --simd), so
    # that the scaling plots compare schedules, not foldings
    load = args.latency + -(-ebytes // axi_bytes)
    pe, simd = (args.pe, args.simd) if args.pe else balanced_fold(d, hd, t_meas, k, e, load)
    row = (hd // pe) * (d // simd) + (d // pe) * (hd // simd)

    def costs(tokens: int, experts: int) -> EngineCosts:
        return EngineCosts(tokens, experts, k, ebytes, axi_bytes, args.latency, row)

    base = costs(t_meas, e)
    measured = {}
    for task in data["tasks"]:
        frames = [r for img in data["routing"][task] for r in img]
        per_layer = {}
        for layer in range(dims["moe_layers"]):
            per_layer[layer] = evaluate(base, [img[layer] for img in data["routing"][task]])
        measured[task] = {"all_layers": evaluate(base, frames), "per_layer": per_layer}
    main = measured[args.task]["all_layers"]
    layers = dims["moe_layers"]
    # load distribution of the analysed task, per layer (for the modelled points)
    loads = []
    for layer in range(layers):
        ids = np.concatenate([img[layer].ravel() for img in data["routing"][args.task]])
        loads.append(np.bincount(ids, minlength=e).astype(np.float64))
    rng = np.random.default_rng(args.seed)
    scaling = []
    for tokens in SCALE_T:
        for experts in SCALE_E:
            is_measured = tokens == t_meas and experts == e
            c = costs(tokens, experts)
            if is_measured:
                res = main
            else:
                frames = []
                for load in loads:
                    prob = stretch_profile(load, experts)
                    frames += [sample_routing(prob, tokens, k, rng) for _ in range(args.samples)]
                res = evaluate(c, frames)
            scaling.append({"tokens": tokens, "experts": experts,
                            "source": "measured" if is_measured else "modelled",
                            "row_cycles": c.row_cycles, "results": res})  # fmt: skip
    # task switching (bytes and cycles over the same AXI port)
    wbytes = bits / 8
    router = data["router_params_per_layer"] * layers * wbytes
    heads = {t: n * wbytes for t, n in data["head_params"].items()}
    switch = {
        "router_bytes_all_layers": router,
        "router_load_cycles": math.ceil(router / axi_bytes),
        "head_bytes": heads,
        "head_load_cycles": {t: math.ceil(b / axi_bytes) for t, b in heads.items()},
        "expert_bytes_reloaded": 0,
        "note": "experts are shared by all tasks: a task switch changes no expert weight; "
        "with every task's routers kept on chip (tasks x router bytes) the switch itself is "
        "free, otherwise it costs the router fetch; a different head is a different "
        "hardware pathway in this flow (one head per build)",
    }
    a, b, cres = (main[n] for n in SCHEDULES)
    claims = {
        "memory": {
            "paper": PAPER_CLAIMS["memory"],
            "measured": f"on-chip expert weights per MoE layer: all resident "
            f"{cres['onchip_bytes'] / 1024:.1f} KiB vs reordered {b['onchip_bytes'] / 1024:.1f} "
            f"KiB = {cres['onchip_bytes'] / b['onchip_bytes']:.2f}x less (E={e}; E/2 by "
            f"construction); DDR expert bytes per frame: reordered "
            f"{b['ddr_bytes'] * layers / 1024:.1f} KiB vs token order with the same 2 buffers "
            f"{a['ddr_bytes'] * layers / 1024:.1f} KiB "
            f"({a['ddr_bytes'] / max(b['ddr_bytes'], 1):.2f}x)",
        },
        "task_switch": {
            "paper": PAPER_CLAIMS["task_switch"],
            "measured": f"router weights {router / 1024:.1f} KiB for {layers} MoE layers "
            f"({switch['router_load_cycles']} cycles at {args.axi_bits} bit/cycle, or 0 with "
            f"all {len(data['tasks'])} tasks' routers on chip: "
            f"{router * len(data['tasks']) / 1024:.1f} KiB); no expert weight moves",
        },
    }
    return {
        "untrained_routing": not bool(args.checkpoint),
        "checkpoint": args.checkpoint,
        "task": args.task,
        "images": data["images"],
        "input_size": data["input_size"],
        "tokens": t_meas,
        "dims": dims,
        "engine": {
            **asdict(base),
            "load_cycles": base.load_cycles,
            "clock_MHz": args.clock_mhz,
            "PE": pe,
            "SIMD": simd,
        },  # fmt: skip
        "measured": measured,
        "per_frame_all_moe_layers": {
            n: {
                key: v * layers
                for key, v in r.items()
                if key in ("ddr_bytes", "onchip_bytes", "cycles_overlap", "cycles_serial", "loads")
            }
            for n, r in main.items()
        },  # fmt: skip
        "task_switch": switch,
        "claims": claims,
        "scaling": scaling,
    }


def print_report(rep: dict[str, Any]) -> None:
    """The comparison table and the paper's claims beside the measured values."""
    if rep["untrained_routing"]:
        print("*** ROUTING IS UNTRAINED (no --checkpoint: random routers); the numbers show "
              "the method, not a trained model ***")  # fmt: skip
    d = rep["dims"]
    print(f"task {rep['task']}: {rep['images']}; input {rep['input_size']} -> T={rep['tokens']} "
          f"tokens; D={d['D']} Hd={d['Hd']} E={d['E']} top-{d['k']}, {d['moe_layers']} MoE "
          f"layers; expert image {rep['engine']['expert_bytes']} B, "
          f"{rep['engine']['axi_bytes'] * 8}-bit AXI, fetch {rep['engine']['load_cycles']} "
          f"cycles, row {rep['engine']['row_cycles']} cycles")  # fmt: skip
    print("\nper MoE layer and frame (mean over images and layers; max in brackets):")
    head = f"{'schedule':<34}{'DDR KiB':>14}{'on-chip KiB':>13}{'cycles':>18}{'no overlap':>18}"
    print(head)
    for name, r in rep["measured"][rep["task"]]["all_layers"].items():
        print(f"{LABELS[name]:<34}{r['ddr_bytes'] / 1024:>7.1f} ({r['ddr_bytes_max'] / 1024:>5.1f})"
              f"{r['onchip_bytes'] / 1024:>13.1f}"
              f"{r['cycles_overlap']:>10.0f} ({r['cycles_overlap_max']:>6.0f})"
              f"{r['cycles_serial']:>10.0f} ({r['cycles_serial_max']:>6.0f})")  # fmt: skip
    print("\nother tasks (reordered schedule, mean DDR KiB / cycles per layer):")
    for task, m in rep["measured"].items():
        r = m["all_layers"]["reordered_double_buffered"]
        print(f"  {task:<10} {r['ddr_bytes'] / 1024:7.1f} KiB  {r['cycles_overlap']:9.0f} cycles")
    print("\npaper vs measured:")
    for claim in rep["claims"].values():
        print(f"  paper:    {claim['paper']}")
        print(f"  measured: {claim['measured']}")


def plot(rep: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per quantity: panels per T, x = E, one line per schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantities = {
        "ddr_bytes": ("expert bytes from DDR per frame and layer", 1 / 1024, "KiB"),
        "onchip_bytes": ("on-chip expert-weight bytes per layer", 1 / 1024, "KiB"),
        "cycles_overlap": ("cycles per frame and layer (load/compute overlap)", 1, "cycles"),
        "cycles_serial": ("cycles per frame and layer (no overlap)", 1, "cycles"),
    }
    paths = []
    tag = "UNTRAINED routing" if rep["untrained_routing"] else "trained routing"
    for key, (title, scale, unit) in quantities.items():
        fig, axes = plt.subplots(1, len(SCALE_T), figsize=(4.2 * len(SCALE_T), 3.6))
        for ax, tokens in zip(axes, SCALE_T):
            pts = [p for p in rep["scaling"] if p["tokens"] == tokens]
            for name in SCHEDULES:
                xs = [p["experts"] for p in pts]
                ys = [p["results"][name][key] * scale for p in pts]
                if not any(y > 0 for y in ys):  # (c) fetches nothing: no point on a log axis
                    ax.plot([], [], " ", label=f"{LABELS[name]}: 0")
                    continue
                (line,) = ax.plot(xs, ys, "-", label=LABELS[name])
                for p, y in zip(pts, ys):
                    meas = p["source"] == "measured"
                    color = line.get_color()
                    face = color if meas else "none"
                    ax.plot(p["experts"], y, "o", color=color, mfc=face, ms=7 if meas else 5)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(list(SCALE_E), [str(x) for x in SCALE_E])
            measured = any(p["source"] == "measured" for p in pts)
            ax.set_title(f"T = {tokens}" + ("" if measured else " (modelled)"), fontsize=9)
            ax.set_xlabel("experts E")
            ax.set_ylabel(unit)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{title} — {rep['task']}, {tag}; filled: measured routing, hollow: "
                     "modelled from the measured load distribution", fontsize=9)  # fmt: skip
        fig.tight_layout()
        path = out / f"schedule_{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="normals")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--images", type=int, default=8, help="val images to route")
    p.add_argument("--out", default=None, help="output folder (default work_dirs/schedule/<task>)")
    p.add_argument("--axi-bits", type=int, default=128, help="AXI width of the expert port")
    p.add_argument("--latency", type=int, default=64, help="cycles per expert fetch request")
    p.add_argument("--clock-mhz", type=float, default=200.0)
    p.add_argument("--pe", type=int, default=0, help="ExpertFFN PE (0: balanced default)")
    p.add_argument("--simd", type=int, default=0, help="ExpertFFN SIMD (with --pe)")
    p.add_argument("--samples", type=int, default=16, help="modelled frames per layer and point")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load a checkpoint holding objects outside the safe allow-list",
    )
    args = p.parse_args(argv)
    if args.checkpoint and not Path(args.checkpoint).is_file():
        p.error(f"checkpoint {args.checkpoint!r} does not exist")
    if not Path(args.config).is_file():
        p.error(f"config {args.config!r} does not exist")
    if args.images < 1 or args.samples < 1:
        p.error("--images and --samples must be positive")
    if bool(args.pe) != bool(args.simd):
        p.error("--pe and --simd go together")
    return args


def main(argv: list[str] | None = None) -> int:
    """Route, analyse, print, plot; returns 0."""
    args = parse_args(argv)
    t0 = time.time()
    data = collect(args)
    rep = analyse(data, args)
    out = Path(args.out or REPO / "work_dirs" / "schedule" / args.task)
    out.mkdir(parents=True, exist_ok=True)
    print_report(rep)
    pngs = plot(rep, out)
    tmp = out / ".schedule_analysis.json.tmp"
    tmp.write_text(json.dumps(rep, indent=1, default=float) + "\n")
    os.replace(tmp, out / "schedule_analysis.json")
    print(f"\nwrote {out / 'schedule_analysis.json'} and {len(pngs)} PNGs in {out} "
          f"({time.time() - t0:.1f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
