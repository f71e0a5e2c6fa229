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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

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
