"""Routing statistics: which experts each task's tokens go to, per MoE layer.

``load[t][l, e]`` is the fraction of tokens (CLS included, padding excluded only in the
sense that padded batches are not used: the loaders run with batch size 1 at test time)
whose top-k experts in MoE layer ``l`` include expert ``e`` when the backbone runs for
task ``t``. Each row sums to k (every token picks k distinct experts); a uniform router
gives k / E everywhere.
"""

from __future__ import annotations

import os
import os.path as osp
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from mmengine.utils import ProgressBar


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def collect_routing(
    model: torch.nn.Module,
    batches: Iterable[Any],
    tasks: Sequence[str],
    max_batches: int | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Count, per task and MoE layer, the tokens routed to each expert.

    Args:
        model: a built segmentor with ``data_preprocessor`` and ``backbone`` (M3ViT).
        batches: a dataloader (mmengine data batches).
        tasks: the tasks to route for (backbone task names).
        max_batches: stop after this many batches (None: all).
        progress: show a progress bar.

    Returns:
        task -> float64 array (L, E) of token fractions (see the module docstring);
        L = 0 for a backbone without MoE layers.
    """
    model = _unwrap(model)
    model.eval()
    backbone = model.backbone
    num_layers = len(getattr(backbone, "moe_layers", []))
    num_experts = None
    counts: dict[str, np.ndarray] = {}
    tokens: dict[str, int] = {t: 0 for t in tasks}
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    bar = ProgressBar(total, file=sys.stdout) if progress and total else None
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        data = model.data_preprocessor(batch, False)
        inputs = data["inputs"]
        for task in tasks:
            out = backbone(inputs, None if backbone.router_variant == "shared" else task)
            for layer, r in enumerate(out.routing):
                ids = r.expert_ids.reshape(-1).cpu()
                if num_experts is None:
                    num_experts = int(backbone.blocks[backbone.moe_layers[0]].moe.w1.shape[0])
                if task not in counts:
                    counts[task] = np.zeros((num_layers, num_experts), dtype=np.float64)
                counts[task][layer] += torch.bincount(ids, minlength=num_experts).numpy()
            tokens[task] += int(out.tokens.shape[0] * out.tokens.shape[1])
        if bar is not None:
            bar.update()
    if bar is not None:
        print()
    if num_layers == 0:
        return {t: np.zeros((0, 0)) for t in tasks}
    return {t: counts[t] / max(tokens[t], 1) for t in tasks}


def routing_k(load: Mapping[str, np.ndarray]) -> int:
    """k (experts per token) from the routing fractions: every row sums to k.

    Raises:
        ValueError: the rows do not all sum to the same whole number.
    """
    sums = np.concatenate([a.sum(axis=1) for a in load.values() if a.size])
    k = int(round(float(sums[0]))) if sums.size else 0
    if sums.size and not np.allclose(sums, k, atol=1e-6):
        raise ValueError(f"routing rows must each sum to k (experts per token), got {sums}")
    return k


def routing_summary(load: Mapping[str, np.ndarray], moe_blocks: Sequence[int] | None = None) -> str:
    """Text table, one row per task and MoE layer, with a legend of its columns.

    Args:
        load: task -> (L, E) routing fractions (see the module docstring).
        moe_blocks: the backbone block index of each MoE layer (shown beside it).
    """
    arrays = [a for a in load.values() if a.size]
    if not arrays:
        return "routing: the backbone has no MoE layers"
    num_experts = arrays[0].shape[1]
    k = routing_k(load)
    head = (
        f"{'task':<10}{'layer':>6}{'block':>6}{'used':>8}{'busiest':>9}{'share':>8}{'entropy':>9}"
    )
    lines = [
        f"expert routing: fraction of tokens sent to each of E = {num_experts} experts, "
        f"top-k = {k} per token",
        head,
        "-" * len(head),
    ]
    for task, arr in load.items():
        if arr.size == 0:
            lines.append(f"{task:<10}  (no MoE layers)")
            continue
        for layer, row in enumerate(arr):
            p = row / row.sum() if row.sum() > 0 else row
            nz = p[p > 0]
            entropy = 0.0 - float((nz * np.log2(nz)).sum())  # 0.0, never -0.0
            block = str(moe_blocks[layer]) if moe_blocks is not None else "-"
            used = f"{int((row > 0).sum())}/{num_experts}"
            lines.append(
                f"{task:<10}{layer:>6}{block:>6}{used:>8}{int(row.argmax()):>9}"
                f"{row.max():>8.3f}{entropy:>9.2f}"
            )
    lines += [
        "-" * len(head),
        "used: experts that received at least one token",
        f"busiest, share: the expert with the most tokens and the fraction of tokens routed "
        f"to it (even routing: k/E = {k / num_experts:.3f})",
        f"entropy: of the layer's expert shares in bits (even routing: log2 E = "
        f"{np.log2(num_experts):.2f})",
    ]
    return "\n".join(lines)


def plot_routing(
    load: Mapping[str, np.ndarray],
    path: str,
    title: str = "",
    moe_blocks: Sequence[int] | None = None,
) -> None:
    """Save one heat map per task (rows: MoE layers, columns: experts) as a PNG.

    Cells are the fraction of the task's tokens routed to the expert; each row sums to k
    (top-k experts per token), which the figure states.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t, a in load.items() if a.size]
    if not tasks:
        raise ValueError("no routing to plot: the backbone has no MoE layers")
    k = routing_k(load)
    num_layers, num_experts = load[tasks[0]].shape
    vmax = max(float(load[t].max()) for t in tasks)
    fig, axes = plt.subplots(
        1,
        len(tasks),
        figsize=(0.25 * num_experts * len(tasks) + 2, 0.35 * num_layers + 1.6),
        squeeze=False,
        sharey=True,
    )
    rows = [f"block {b}" for b in moe_blocks] if moe_blocks is not None else None
    for ax, task in zip(axes[0], tasks):
        im = ax.imshow(load[task], vmin=0, vmax=vmax, cmap="magma", aspect="auto")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_xticks(range(num_experts))
        ax.set_xticklabels([str(e) for e in range(num_experts)], fontsize=6)
        ax.set_yticks(range(num_layers))
        ax.set_yticklabels(rows or [str(i) for i in range(num_layers)], fontsize=7)
    axes[0, 0].set_ylabel("MoE layer", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="fraction of tokens")
    note = (
        f"fraction of tokens routed to each expert; each row sums to k = {k} "
        f"(top-{k} of {num_experts} experts per token)"
    )
    # above the axes whatever the figure height (the saved figure grows to fit it)
    fig.suptitle(f"{title}\n{note}" if title else note, fontsize=9, y=1.0, va="bottom")
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
