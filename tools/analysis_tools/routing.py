"""Routing statistics of a trained M3ViT: the fraction of tokens each task sends to each
expert, per MoE layer, as a text table and a heat-map PNG.

Usage::

    python tools/analysis_tools/routing.py CONFIG [CHECKPOINT | --init-seed S] [--task T ...]
        [--split val|test] [--max-images N] [--out routing.png] [--json routing.json]
        [--device cpu|cuda] [--cfg-options ...] [--trust-checkpoint]

Works for any data set config (NYUD, PASCAL, synthetic); ``--task`` restricts the tasks.
Without a checkpoint the model is randomly initialised (``--init-seed``): the routing a
trained model starts from, to tell learnt task specialisation from random routers.
``--json`` also writes the fractions: ``{"config", "checkpoint", "split", "images",
"load": {task: [[fraction per expert] per MoE layer]}}`` (each row sums to top-k).
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import sys
import tempfile

from mmengine.config import Config, DictAction
from mmengine.registry import init_default_scope
from mmengine.runner import Runner

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import mmseg_m3vit  # noqa: E402, F401
from mmseg_m3vit.compat import load_model_checkpoint, trusted_checkpoints  # noqa: E402
from mmseg_m3vit.tasks import check_tasks  # noqa: E402
from mmseg_m3vit.utils import check_config_tasks, check_data_roots, config_tasks  # noqa: E402
from mmseg_m3vit.utils.cli import HelpFormatter, add_trust_arg, task_names_help  # noqa: E402
from mmseg_m3vit.utils.routing import (  # noqa: E402
    collect_routing,
    plot_routing,
    routing_summary,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the routing tool."""
    parser = argparse.ArgumentParser(
        description="Per-task expert routing statistics of a trained M3ViT: a table and a "
        "heat map of the fraction of tokens each task sends to each expert",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("config", help="config file path")
    parser.add_argument(
        "checkpoint",
        nargs="?",
        default=None,
        help="checkpoint file; omit it for a randomly initialised model (see --init-seed)",
    )
    parser.add_argument(
        "--init-seed",
        type=int,
        default=0,
        help="seed of the random initialisation when no checkpoint is given",
    )
    parser.add_argument(
        "--task",
        nargs="+",
        default=None,
        help=f"tasks to route for; default: every task of the config ({task_names_help()})",
    )
    parser.add_argument(
        "--split", choices=["val", "test"], default="test", help="which dataloader to use"
    )
    parser.add_argument(
        "--max-images", type=int, default=50, help="route at most this many images (0: all)"
    )
    parser.add_argument(
        "--out", default=None, help="PNG path; default: routing.png beside the checkpoint"
    )
    parser.add_argument("--json", default=None, help="also write the fractions to this file")
    parser.add_argument("--device", default="cpu", help="device to run the model on")
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        action=DictAction,
        help="override config settings (key=value ...), e.g. "
        "test_dataloader.dataset.data_root=data/NYUD_MT",
    )
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
    if args.checkpoint is not None and not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist")
    init_default_scope(cfg.get("default_scope", "mmseg"))
    from mmseg.registry import MODELS

    if args.checkpoint is None:  # the untrained model, as training starts from it
        from mmengine.runner import set_random_seed

        set_random_seed(args.init_seed)
        cfg.model.backbone.pretrained = None
        model = MODELS.build(cfg.model)
        model.init_weights()
        print(f"random initialisation (seed {args.init_seed}), no checkpoint")
    else:
        model = MODELS.build(cfg.model)
        with trusted_checkpoints(args.trust_checkpoint):
            load_model_checkpoint(model, args.checkpoint)
    model.to(args.device)
    loader_cfg = cfg[loader_key].copy()
    loader_cfg.update(batch_size=1, num_workers=0, persistent_workers=False)
    loader = Runner.build_dataloader(loader_cfg)
    max_batches = args.max_images or None
    load = collect_routing(model, loader, tasks, max_batches=max_batches)
    moe_blocks = list(getattr(model.backbone, "moe_layers", []))
    print(routing_summary(load, moe_blocks))
    if args.json:
        payload = dict(
            config=osp.basename(args.config),
            checkpoint=osp.basename(args.checkpoint) if args.checkpoint else None,
            init_seed=None if args.checkpoint else args.init_seed,
            split=args.split,
            images=min(max_batches or len(loader), len(loader)),
            load={t: a.tolist() for t, a in load.items()},
        )
        out_dir = osp.dirname(osp.abspath(args.json))
        os.makedirs(out_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".json.tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    if all(a.size == 0 for a in load.values()):
        print("the backbone has no MoE layers: nothing to plot")
        return load
    if args.out is None and args.checkpoint is None:
        raise ValueError("--out is needed without a checkpoint (the PNG goes next to it)")
    out = args.out or osp.join(osp.dirname(osp.abspath(args.checkpoint)), "routing.png")
    plot_routing(load, out, f"{osp.basename(args.config)} ({args.split})", moe_blocks)
    print(f"saved {out}")
    return load


if __name__ == "__main__":
    main()
