"""Routing statistics: which experts each task's tokens go to, per MoE layer.

``load[t][l, e]`` is the fraction of tokens (CLS included, padding excluded only in the
sense that padded batches are not used: the loaders run with batch size 1 at test time)
whose top-k experts in MoE layer ``l`` include expert ``e`` when the backbone runs for
task ``t``. Each row sums to k (every token picks k distinct experts); a uniform router
gives k / E everywhere.
"""

from __future__ import annotations

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
    total = None
    if max_batches is not None:
        total = max_batches
    elif hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]
    bar = ProgressBar(total) if progress and total else None
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


def routing_summary(load: Mapping[str, np.ndarray], top_k: int | None = None) -> str:
    """Text table: per task and layer, experts used, the busiest expert's share, entropy.

    ``entropy`` is of the normalised row (load / k) in bits; log2(E) means perfectly even.
    """
    lines = [f"{'task':<10}{'layer':>6}{'used':>6}{'max':>8}{'entropy':>9}  (max bits)"]
    for task, arr in load.items():
        if arr.size == 0:
            lines.append(f"{task:<10}  (no MoE layers)")
            continue
        e = arr.shape[1]
        for layer, row in enumerate(arr):
            p = row / row.sum() if row.sum() > 0 else row
            nz = p[p > 0]
            ent = float(-(nz * np.log2(nz)).sum())
            lines.append(
                f"{task:<10}{layer:>6}{int((row > 0).sum()):>6}{row.max():>8.3f}{ent:>9.2f}"
                f"  ({np.log2(e):.2f})"
            )
    return "\n".join(lines)


def plot_routing(load: Mapping[str, np.ndarray], path: str, title: str = "") -> None:
    """Save one heat map per task (rows: MoE layers, columns: experts) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t, a in load.items() if a.size]
    if not tasks:
        raise ValueError("no routing to plot: the backbone has no MoE layers")
    vmax = max(float(load[t].max()) for t in tasks)
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(3.2 * len(tasks) + 1, 2.6), squeeze=False, sharey=True
    )
    for ax, task in zip(axes[0], tasks):
        arr = load[task]
        im = ax.imshow(arr, vmin=0, vmax=vmax, cmap="magma", aspect="auto")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(arr.shape[1]))
        ax.set_xticklabels([str(i) if i % 2 == 0 else "" for i in range(arr.shape[1])], fontsize=7)
        ax.set_yticks(range(arr.shape[0]))
    axes[0, 0].set_ylabel("MoE layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="fraction of tokens")
    if title:
        fig.suptitle(title, fontsize=9, y=1.06)
    import os
    import os.path as osp

    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
