"""Train a multi-task segmentor (mmseg's ``tools/train.py``, plus the plugin's checks).

Usage::

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
        [--cfg-options key=value ...] [--launcher none|pytorch|slurm|mpi]
        [--trust-checkpoint]

Checkpoints are written only when every parameter, buffer and optimizer-state tensor is
finite, and resuming is strict (``CheckpointGuardHook``, added when the config lacks it).
Checkpoints (resumed, pretrained) are unpickled safely unless ``--trust-checkpoint``.

Multi-GPU (or multi-process CPU): ``bash tools/dist_train.sh CONFIG NPROC``.
"""

from __future__ import annotations

import argparse
import os.path as osp
import sys

from mmengine.config import Config

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import mmseg_m3vit  # noqa: E402, F401  (registers the plugin before the config is read)
from mmseg_m3vit.compat import trusted_checkpoints  # noqa: E402
from mmseg_m3vit.engine import BF16_OPTIM_WRAPPER, init_cpu_distributed  # noqa: E402
from mmseg_m3vit.utils import check_config_tasks, check_data_roots, check_pretrained  # noqa: E402
from mmseg_m3vit.utils.cli import (  # noqa: E402
    HelpFormatter,
    add_runner_args,
    build_runner,
    dist_backend,
    ensure_custom_hooks,
    load_config,
    parse_runner_args,
    preflight_errors,
)

EXAMPLES = """examples:
  python tools/train.py configs/m3vit_synthetic.py --work-dir work_dirs/synthetic
  python tools/train.py configs/m3vit_nyud.py --resume
  python tools/train.py configs/m3vit_nyud.py --cfg-options \\
      train_dataloader.dataset.data_root=data/NYUD_MT val_dataloader.dataset.data_root=data/NYUD_MT
  bash tools/dist_train.sh configs/m3vit_nyud.py 2     # 2 processes (GPUs, or gloo on CPU)
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the training tool (mmseg's flags)."""
    parser = argparse.ArgumentParser(
        description="Train an M3ViT multi-task segmentor",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("config", help="train config file path")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="CKPT",
        help="resume from CKPT, or (no value) from the latest checkpoint in the work dir",
    )
    parser.add_argument(
        "--amp", action="store_true", default=False, help="bfloat16 automatic mixed precision (GPU)"
    )
    add_runner_args(parser, "train_cfg.max_iters=100")
    return parse_runner_args(parser, argv)


def build_config(args: argparse.Namespace) -> Config:
    """Load the config, apply the command line, and run the pre-flight checks."""
    cfg = load_config(args)
    if args.amp:
        wrapper = cfg.optim_wrapper.get("type", "OptimWrapper")
        if wrapper not in ("OptimWrapper", "AmpOptimWrapper"):
            raise ValueError(
                f"--amp needs optim_wrapper.type 'OptimWrapper' or 'AmpOptimWrapper', "
                f"got {wrapper!r} in {args.config}"
            )
        # a loss_scale set in the config is kept
        cfg.optim_wrapper.type = BF16_OPTIM_WRAPPER["type"]
        cfg.optim_wrapper.dtype = BF16_OPTIM_WRAPPER["dtype"]
        cfg.optim_wrapper.setdefault("loss_scale", dict(BF16_OPTIM_WRAPPER["loss_scale"]))
    if args.resume == "auto":
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise FileNotFoundError(f"--resume checkpoint {args.resume!r} does not exist")
        cfg.resume = True
        cfg.load_from = args.resume
    check_config_tasks(cfg)
    check_data_roots(cfg, ("train_dataloader", "val_dataloader"))
    check_pretrained(cfg)  # the runner initialises weights even when resuming
    ensure_custom_hooks(cfg, ["NonFiniteLossHook", "CheckpointGuardHook"])
    return cfg


def main(argv: list[str] | None = None) -> None:
    """Build the runner from the config and train."""
    args = parse_args(argv)
    with preflight_errors("train.py"):
        cfg = build_config(args)
    init_cpu_distributed(args.launcher, dist_backend(cfg))
    with trusted_checkpoints(args.trust_checkpoint):
        runner = build_runner(cfg)
        runner.train()


if __name__ == "__main__":
    main()
