"""Count multiply-adds of an M3ViT multi-task model, per task, split by component.

Usage::

    python tools/analysis_tools/flops.py CONFIG [--task T ...] [--shape H W] [--json PATH]

Counts come from ``torch.utils.flop_counter.FlopCounterMode``, which sees every matmul,
linear, convolution and attention product actually executed (the CPU fused attention
kernel is added through a custom mapping). Convention: 1 MAC = 1 multiply-add = 2 FLOPs
as counted by torch; biases, norms, activations, softmax and resizes are not counted.
Only the top-k experts each token was routed to are executed, so MoE counts are the
active cost. The model is randomly initialised: routing (hence which experts run) does
not change the count, because every token runs exactly k experts.

Rows: one per task (single-task inference: that task's routers and head only) and
``all`` (every task of the config, as ``predict`` runs them; with task-batched mode
everything before the first router is shared: the blocks before the first MoE layer and
that layer's attention). Columns, in GMAC: patch embedding,
attention (qkv, QK^T, AV, proj), dense MLP, MoE experts, routers, heads, total.
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import re
import sys
import tempfile
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

COLUMNS = ("patch_embed", "attention", "dense_mlp", "moe_experts", "routers", "heads", "total")


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, **kw):
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts PyTorch's fused CPU attention kernel."""
    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flop
    return FlopCounterMode(display=False, custom_mapping=mapping)


def categorize(flop_counts: dict[str, dict], backbone_name: str) -> dict[str, int]:
    """Split FlopCounterMode's per-module FLOPs into :data:`COLUMNS`, in MACs.

    ``flop_counts`` is ``FlopCounterMode.get_flop_counts()`` (hierarchical: parents include
    their children); ``backbone_name`` the root name of the backbone (its class name).
    """
    total = {name: sum(ops.values()) for name, ops in flop_counts.items()}
    prefix = re.escape(backbone_name)
    out = dict.fromkeys(COLUMNS, 0)
    for name, flops in total.items():
        if re.fullmatch(prefix + r"\.patch_embed\.proj", name):
            out["patch_embed"] += flops
        elif re.fullmatch(prefix + r"\.blocks\.\d+\.attn", name):
            out["attention"] += flops
        elif re.fullmatch(prefix + r"\.blocks\.\d+\.mlp", name):
            out["dense_mlp"] += flops
        elif re.fullmatch(prefix + r"\.blocks\.\d+\.moe", name):
            out["moe_experts"] += flops
        elif re.fullmatch(prefix + r"\.blocks\.\d+\.moe\.router", name):
            out["routers"] += flops
    out["moe_experts"] -= out["routers"]
    glob = total.get("Global", 0)
    out["heads"] = glob - total.get(backbone_name, 0)
    out["total"] = glob
    backbone_rest = total.get(backbone_name, 0) - sum(
        out[c] for c in ("patch_embed", "attention", "dense_mlp", "moe_experts", "routers")
    )
    if backbone_rest:
        raise RuntimeError(
            f"{backbone_rest} backbone FLOPs fall in no category; module names changed? "
            f"({sorted(total)})"
        )
    return {k: v // 2 for k, v in out.items()}  # FLOPs -> MACs


@torch.no_grad()
def count_macs(model: nn.Module, inputs: torch.Tensor, tasks: Sequence[str]) -> dict[str, int]:
    """MACs of ``model._forward(inputs, tasks=tasks)`` (a MultiTaskSegmentor) per column."""
    model.eval()
    with flop_counter() as counter:
        model._forward(inputs, tasks=list(tasks))
    return categorize(counter.get_flop_counts(), type(model.backbone).__name__)


def format_table(rows: dict[str, dict[str, int]], shape: Sequence[int]) -> str:
    """Fixed-width table of GMAC per row and column."""
    head = f"{'task':<10}" + "".join(f"{c:>13}" for c in COLUMNS)
    lines = [f"multiply-adds (GMAC, 1 MAC = 2 FLOPs) at {shape[0]}x{shape[1]}, batch 1", head]
    lines.append("-" * len(head))
    for name, row in rows.items():
        lines.append(f"{name:<10}" + "".join(f"{row[c] / 1e9:>13.3f}" for c in COLUMNS))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line: CONFIG [--task T ...] [--shape H W] [--json PATH]."""
    from mmseg_m3vit.utils.cli import HelpFormatter, task_names_help

    p = argparse.ArgumentParser(
        description="Count M3ViT multiply-adds per task and component",
        formatter_class=HelpFormatter,
    )
    p.add_argument("config", help="model config file")
    p.add_argument(
        "--task",
        nargs="+",
        help=f"tasks to count; default: every task of the config ({task_names_help()})",
    )
    p.add_argument(
        "--shape",
        nargs=2,
        type=int,
        default=None,
        metavar=("H", "W"),
        help="input size in pixels (default: the backbone's img_size)",
    )
    p.add_argument("--json", help="also write the counts (MACs) to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Build the model from CONFIG, count, print the table; returns the JSON payload."""
    args = parse_args(argv)
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    import mmseg_m3vit  # noqa: F401  (registers the plugin)

    cfg = Config.fromfile(args.config)
    init_default_scope(cfg.get("default_scope", "mmseg"))
    model_cfg = cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model)
    model_cfg["backbone"].pop("pretrained", None)  # counting needs no weights
    model = MODELS.build(model_cfg)
    shape = args.shape or list(model.backbone.img_size)
    tasks = model.tasks if not args.task else args.task
    for t in tasks:
        if t not in model.tasks:
            raise SystemExit(f"unknown task {t!r}; the config's tasks are {model.tasks}")
    x = torch.randn(1, 3, *shape)
    rows: dict[str, dict[str, int]] = {}
    for t in tasks:
        print(f"counting {t} ...", file=sys.stderr, flush=True)
        rows[t] = count_macs(model, x, [t])
    if len(tasks) > 1:
        print("counting all tasks together ...", file=sys.stderr, flush=True)
        rows["all"] = count_macs(model, x, tasks)
    print(format_table(rows, shape))
    payload = {"config": args.config, "shape": list(shape), "unit": "MAC", "rows": rows}
    if args.json:
        d = osp.dirname(osp.abspath(args.json))
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".json.tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
