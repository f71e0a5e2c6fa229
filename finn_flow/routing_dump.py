"""Routing of the float model and of the quantized FPGA pathway, side by side.

For every val image, MoE layer and task: the k expert ids and gates the float
``M3ViT`` picks (its ``MoERouting``: softmax over all experts, then top-k, gates not
renormalised) and the ones the quantized pathway picks
(:class:`finn_flow.quant_model.QuantTopKGate`: probabilities quantized to
``1/(2^b - 1)``, exact top-k with ties to the lower expert index, gates on that grid).
The FINN design is verified against the quantized pathway, so its routing is the
quantized one.

Agreement (per layer and over all layers), over tokens (CLS included):

- ``set``: % of tokens whose set of k experts is the same;
- ``top1``: % of tokens whose highest-gate expert is the same;
- ``slots``: % of (token, rank) pairs with the same expert at the same rank;
- ``gate_abs_diff``: mean |float gate - quantized gate| over the experts both picked.

Shapes: T tokens (1 + h*w), k experts per token, L MoE layers.

Command line (every task of the config, the val split's frames at the FPGA size)::

    python finn_flow/routing_dump.py --checkpoint CKPT [--config CFG] [--images N]
        [--out DIR]

writes ``DIR/routing.json`` (the dump, agreement, per-layer expert load and its entropy
for both models) and ``DIR/expert_load.png`` (float model's load per task and layer),
and prints the agreement and entropy tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow `python finn_flow/routing_dump.py` from a checkout
    sys.path.insert(0, str(REPO))
DEFAULT_CONFIG = (
    REPO / "configs" / "fpga" / "m3vit_vit-t16-6blk-moe16-top2-mg_fpga_synthnyud-64x80.py"
)

#: One layer's routing: (expert ids (T, k) int64, gates (T, k) float32), ids ordered by
#: descending gate (ties: lower expert id first).
LayerRouting = tuple[np.ndarray, np.ndarray]


def order_by_gate(ids: np.ndarray, gates: np.ndarray) -> LayerRouting:
    """Sort each token's k (id, gate) pairs by descending gate, ties to the lower id."""
    ids = np.asarray(ids, dtype=np.int64)
    gates = np.asarray(gates, dtype=np.float32)
    order = np.lexsort((ids, -gates), axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(gates, order, -1)


@torch.no_grad()
def float_routing(backbone: nn.Module, image: Tensor, task: str) -> list[LayerRouting]:
    """The float backbone's routing of one image (1, 3, H, W) for ``task``, per layer."""
    out = backbone(image, task)
    return [order_by_gate(r.expert_ids.cpu().numpy(), r.gates.cpu().numpy()) for r in out.routing]


@torch.no_grad()
def quant_gate_routing(gate: nn.Module, probs: Tensor) -> LayerRouting:
    """Routing of one :class:`QuantTopKGate` for softmax probabilities (1, T, E).

    The selection is the gate's own comparison network (``drop < 0``: kept), not the
    non-zero gates, so an expert kept with a gate that quantized to 0 still counts.
    """
    pq = gate.prob_quant(probs)[0]
    drop = gate.drop(gate.count(gate.beats(gate.diff(gate.diff_in(probs)))))[0]
    g = gate.gate_quant(pq * (1.0 - drop) * 0.5)
    k = gate.top_k
    kept = drop < 0
    if not bool(torch.all(kept.sum(-1) == k)):
        raise RuntimeError(f"quantized gate keeps {kept.sum(-1).tolist()} experts, not {k}")
    ids = torch.nonzero(kept)[:, 1].reshape(-1, k).cpu().numpy()
    gates = torch.gather(g, 1, torch.as_tensor(ids)).cpu().numpy()
    return order_by_gate(ids, gates)


@torch.no_grad()
def quant_routing(qpath: nn.Module, patches: Tensor) -> list[LayerRouting]:
    """The quantized pathway's routing of one frame (1, T, C*p*p), per MoE layer."""
    from finn_flow.quant_model import QuantMoE

    gates = [b.ffn.gate for b in qpath.blocks if isinstance(b.ffn, QuantMoE)]
    seen: dict[int, LayerRouting] = {}
    hooks = []
    for i, gate in enumerate(gates):

        def hook(module: nn.Module, args: tuple, output: Tensor, i: int = i) -> None:
            seen[i] = quant_gate_routing(module, args[0])

        hooks.append(gate.register_forward_hook(hook))
    try:
        qpath(patches)
    finally:
        for h in hooks:
            h.remove()
    return [seen[i] for i in range(len(gates))]


def agreement(float_r: Sequence[LayerRouting], quant_r: Sequence[LayerRouting]) -> dict:
    """Agreement of two routings of the same frames (see the module docstring).

    Args:
        float_r / quant_r: per (frame, layer) pair, ``(ids (T, k), gates (T, k))``, in
            the same order.

    Returns:
        ``{'tokens', 'set', 'top1', 'slots', 'gate_abs_diff'}`` (percentages, and the
        mean absolute gate difference over the experts picked by both).
    """
    tokens = same_set = same_top1 = same_slot = slots = 0
    diffs: list[float] = []
    for (fi, fg), (qi, qg) in zip(float_r, quant_r, strict=True):
        if fi.shape != qi.shape:
            raise ValueError(f"routing shapes differ: {fi.shape} vs {qi.shape}")
        tokens += fi.shape[0]
        same_set += int(np.all(np.sort(fi, -1) == np.sort(qi, -1), axis=-1).sum())
        same_top1 += int((fi[:, 0] == qi[:, 0]).sum())
        same_slot += int((fi == qi).sum())
        slots += fi.size
        for t in range(fi.shape[0]):
            for j, e in enumerate(fi[t]):
                hit = np.nonzero(qi[t] == e)[0]
                if hit.size:
                    diffs.append(abs(float(fg[t, j]) - float(qg[t, hit[0]])))
    pct = 100.0 / max(tokens, 1)
    return {
        "tokens": tokens,
        "set": same_set * pct,
        "top1": same_top1 * pct,
        "slots": 100.0 * same_slot / max(slots, 1),
        "gate_abs_diff": float(np.mean(diffs)) if diffs else float("nan"),
    }


def routing_dump(
    images: Sequence[Tensor],
    tasks: Sequence[str],
    float_fn: Callable[[Tensor, str], list[LayerRouting]],
    quant_fn: Callable[[Tensor, str], list[LayerRouting]],
) -> dict[str, Any]:
    """Route every image for every task with both models; JSON-ready.

    Args:
        images: normalised (1, 3, H, W) frames of the FPGA input size.
        tasks: task names.
        float_fn / quant_fn: (image, task) -> per-layer routing (e.g. :func:`float_routing`
            and :func:`quant_routing` on the task's pathway with the patches cut).

    Returns:
        ``{"tasks": {task: {"images": [{"float": [layer: {"ids", "gates"}], "quantized":
        [...]}], "agreement": {...}, "per_layer": [{...}], "expert_load": {"float":
        (L, E) token fractions ...}}}, "agreement": {...}}`` (all tasks pooled).
    """
    out: dict[str, Any] = {"tasks": {}}
    pooled_f: list[LayerRouting] = []
    pooled_q: list[LayerRouting] = []
    for task in tasks:
        per_image = []
        fr_all: list[list[LayerRouting]] = []
        qr_all: list[list[LayerRouting]] = []
        for img in images:
            fr, qr = float_fn(img, task), quant_fn(img, task)
            if len(fr) != len(qr):
                raise ValueError(f"{len(fr)} float vs {len(qr)} quantized MoE layers")
            fr_all.append(fr)
            qr_all.append(qr)
            per_image.append(
                {
                    kind: [{"ids": r[0].tolist(), "gates": r[1].tolist()} for r in rs]
                    for kind, rs in (("float", fr), ("quantized", qr))
                }
            )
        layers = len(fr_all[0]) if fr_all else 0
        per_layer = [
            agreement([f[li] for f in fr_all], [q[li] for q in qr_all]) for li in range(layers)
        ]
        flat_f = [r for f in fr_all for r in f]
        flat_q = [r for q in qr_all for r in q]
        pooled_f += flat_f
        pooled_q += flat_q
        out["tasks"][task] = {
            "images": per_image,
            "per_layer": per_layer,
            "agreement": agreement(flat_f, flat_q),
        }
    out["agreement"] = agreement(pooled_f, pooled_q)
    return out


def expert_load(routings: Sequence[Sequence[LayerRouting]], num_experts: int) -> np.ndarray:
    """(L, E) fraction of tokens whose k experts include expert e, per layer.

    ``routings``: per frame, per layer ``(ids, gates)``. Rows sum to k.
    """
    layers = len(routings[0])
    counts = np.zeros((layers, num_experts))
    tokens = 0
    for frame in routings:
        tokens += frame[0][0].shape[0]
        for li, (ids, _) in enumerate(frame):
            counts[li] += np.bincount(ids.ravel(), minlength=num_experts)
    return counts / max(tokens, 1)


def load_entropy(load: np.ndarray) -> np.ndarray:
    """Entropy in bits of each layer's normalised load row (log2(E): perfectly even)."""
    p = load / load.sum(axis=1, keepdims=True).clip(min=1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(p), 0.0)
    return terms.sum(axis=1)


def load_report(dump: dict[str, Any], num_experts: int) -> dict[str, Any]:
    """Per task: expert load (L, E) and its entropy per layer, for both models."""
    out: dict[str, Any] = {}
    for task, entry in dump["tasks"].items():
        out[task] = {}
        for kind in ("float", "quantized"):
            frames = [
                [(np.asarray(r["ids"]), np.asarray(r["gates"])) for r in img[kind]]
                for img in entry["images"]
            ]
            load = expert_load(frames, num_experts)
            out[task][kind] = {
                "load": load.tolist(),
                "entropy_bits": load_entropy(load).tolist(),
                "max_entropy_bits": float(np.log2(num_experts)),
                "experts_used": (load > 0).sum(axis=1).tolist(),
                "busiest_share": (load.max(axis=1) / load.sum(axis=1)).tolist(),
            }
    return out


def dump_all_tasks(
    cfg: Any,
    checkpoint: str | None,
    num_images: int | None,
    seed: int = 0,
    trust: bool | None = None,
) -> dict[str, Any]:
    """Route the val frames for every task of ``cfg`` with the float model and with each
    task's calibrated quantized pathway (calibrated as ``build.py`` does)."""
    from finn_flow import quant_model as qm
    from finn_flow.evaluate import input_frames, val_frames
    from finn_flow.float_model import FloatPathway, build_float_pathway

    fpga = dict(cfg.fpga)
    size = tuple(fpga["input_size"])
    tasks = list(cfg.model.get("decode_heads") or {}) or None
    base = build_float_pathway(cfg, tasks[0] if tasks else "normals", checkpoint, seed, trust)
    tasks = list(base.model.heads)
    spec = qm.QuantSpec(
        weight_bits=int(fpga.get("bits", 8)),
        act_bits=int(fpga.get("bits", 8)),
        attn_weight_bits=fpga.get("attn_weight_bits"),
    )
    patch = base.backbone.patch_size
    calib, _ = input_frames(cfg, int(fpga.get("calib_images", 8)), size, seed)
    images = [img for img, _, _ in val_frames(cfg, size, num_images)]
    quant = {}
    for task in tasks:
        fp = FloatPathway(base.model, task, checkpoint)
        qmodel = qm.build_quant_task_model(fp.backbone, fp.head, task, spec, size)
        qm.calibrate(qmodel, [qm.patchify(img, patch) for img in calib])
        quant[task] = qmodel.pathway
    dump = routing_dump(
        images,
        tasks,
        lambda img, task: float_routing(base.backbone, img, task),
        lambda img, task: quant_routing(quant[task], qm.patchify(img, patch)),
    )
    experts = base.moe_layers()[0].num_experts if base.moe_layers() else 0
    dump["load"] = load_report(dump, experts)
    dump["checkpoint"] = checkpoint
    dump["images"] = len(images)
    dump["quantization"] = spec.as_dict()
    return dump


def format_tables(dump: dict[str, Any]) -> str:
    """Agreement and load-entropy tables (text)."""
    lines = [
        f"{'task':<8}{'layer':>6}{'set %':>8}{'top1 %':>8}{'slots %':>9}{'|dg|':>8}"
        f"{'H float':>9}{'H quant':>9}{'max H':>7}"
    ]
    for task, entry in dump["tasks"].items():
        ld = dump["load"][task]
        for li, a in enumerate(entry["per_layer"]):
            lines.append(
                f"{task:<8}{li:>6}{a['set']:>8.1f}{a['top1']:>8.1f}{a['slots']:>9.1f}"
                f"{a['gate_abs_diff']:>8.4f}{ld['float']['entropy_bits'][li]:>9.2f}"
                f"{ld['quantized']['entropy_bits'][li]:>9.2f}"
                f"{ld['float']['max_entropy_bits']:>7.2f}"
            )
    a = dump["agreement"]
    lines.append(
        f"all tasks and layers ({a['tokens']} token-layers): same expert set {a['set']:.1f} %, "
        f"same top-1 {a['top1']:.1f} %, same expert per slot {a['slots']:.1f} %, "
        f"mean |gate difference| {a['gate_abs_diff']:.4f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--checkpoint", default=None, help="whole-model checkpoint (tools/train.py)")
    p.add_argument("--trust-checkpoint", action="store_true")
    p.add_argument("--images", type=int, default=None, help="val images (default: all)")
    p.add_argument("--out", default=str(REPO / "work_dirs" / "routing"))
    args = p.parse_args(argv)
    from mmengine.config import Config

    if not Path(args.config).is_file():
        print(f"routing_dump.py: error: config {args.config!r} does not exist", file=sys.stderr)
        return 2
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        print(f"routing_dump.py: error: checkpoint {args.checkpoint!r} does not exist")
        return 2
    from mmseg_m3vit.utils.routing import plot_routing

    cfg = Config.fromfile(args.config)
    trust = True if args.trust_checkpoint else None
    dump = dump_all_tasks(cfg, args.checkpoint, args.images, trust=trust)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".routing.json.tmp"
    tmp.write_text(json.dumps(dump) + "\n")
    tmp.replace(out / "routing.json")
    loads = {t: np.asarray(v["float"]["load"]) for t, v in dump["load"].items()}
    title = f"float model, {dump['images']} val frames" + (
        "" if args.checkpoint else " (RANDOM WEIGHTS)"
    )
    plot_routing(loads, str(out / "expert_load.png"), title=title)
    print(format_tables(dump))
    print(f"wrote {out / 'routing.json'} and {out / 'expert_load.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
