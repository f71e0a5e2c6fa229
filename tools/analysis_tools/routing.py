"""Routing statistics of a trained M3ViT: the fraction of tokens each task sends to each
expert, per MoE layer, as a text table and a heat-map PNG.

Usage::

    python tools/analysis_tools/routing.py CONFIG CHECKPOINT [--task T ...]
        [--split val|test] [--max-images N] [--out routing.png] [--cfg-options ...]
        [--trust-checkpoint]

Works for any data set config (NYUD, PASCAL, synthetic); ``--task`` restricts the tasks.
"""

from __future__ import annotations

import argparse
import os.path as osp
import sys

from mmengine.config import Config, DictAction
from mmengine.registry import init_default_scope
from mmengine.runner import Runner

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import mmseg_m3vit  # noqa: E402, F401
from mmseg_m3vit.compat import load_model_checkpoint, trusted_checkpoints  # noqa: E402
from mmseg_m3vit.engine import check_config_tasks, check_data_roots, config_tasks  # noqa: E402
from mmseg_m3vit.engine.cli import add_trust_arg  # noqa: E402
from mmseg_m3vit.engine.routing import (  # noqa: E402
    collect_routing,
    plot_routing,
    routing_summary,
)
from mmseg_m3vit.tasks import check_tasks  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the routing tool."""
    parser = argparse.ArgumentParser(description="Per-task expert routing statistics")
    parser.add_argument("config")
    parser.add_argument("checkpoint")
    parser.add_argument("--task", nargs="+", default=None, help="tasks (default: all)")
    parser.add_argument(
        "--split", choices=["val", "test"], default="test", help="which dataloader to use"
    )
    parser.add_argument("--max-images", type=int, default=50, help="images to route (0: all)")
    parser.add_argument("--out", default=None, help="PNG path (default: next to the ckpt)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction)
    add_trust_arg(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Route the images, print the table, save the plot; returns task -> (L, E) array."""
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    check_config_tasks(cfg)
    tasks = check_tasks(args.task or config_tasks(cfg), config_tasks(cfg), what="--task")
    loader_key = f"{args.split}_dataloader"
    check_data_roots(cfg, (loader_key,))
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist")
    init_default_scope(cfg.get("default_scope", "mmseg"))
    from mmseg.registry import MODELS

    model = MODELS.build(cfg.model)
    with trusted_checkpoints(args.trust_checkpoint):
        load_model_checkpoint(model, args.checkpoint)
    loader_cfg = cfg[loader_key].copy()
    loader_cfg.update(batch_size=1, num_workers=0, persistent_workers=False)
    loader = Runner.build_dataloader(loader_cfg)
    max_batches = args.max_images or None
    load = collect_routing(model, loader, tasks, max_batches=max_batches)
    print(routing_summary(load))
    if all(a.size == 0 for a in load.values()):
        print("the backbone has no MoE layers: nothing to plot")
        return load
    out = args.out or osp.join(osp.dirname(osp.abspath(args.checkpoint)), "routing.png")
    plot_routing(load, out, title=f"{osp.basename(args.config)} ({args.split})")
    print(f"saved {out}")
    return load


if __name__ == "__main__":
    main()
