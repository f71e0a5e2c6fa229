"""Evaluate a trained multi-task segmentor, on all tasks or only the chosen ones.

Usage::

    python tools/test.py CONFIG CHECKPOINT [--task T ...] [--show-dir DIR] [--out FILE.pkl]
        [--work-dir DIR] [--cfg-options key=value ...] [--launcher none|pytorch|...]
        [--trust-checkpoint]

The checkpoint is loaded strictly (:func:`mmseg_m3vit.compat.load_model_checkpoint`):
missing, unexpected or mis-shaped keys fail, naming the first few; task routers map by
task name; the file is unpickled safely unless ``--trust-checkpoint``.

``--task semseg depth`` evaluates only those tasks through the single-task pathway
(``head_t(backbone(x, task=t))``: only task t's routers and head run); the metrics of the
other tasks are dropped and Δm is computed over the chosen tasks.
"""

from __future__ import annotations

import argparse
import os.path as osp
import sys

from mmengine.config import Config

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import mmseg_m3vit  # noqa: E402, F401  (registers the plugin before the config is read)
from mmseg_m3vit.compat import load_model_checkpoint, trusted_checkpoints  # noqa: E402
from mmseg_m3vit.engine import init_cpu_distributed  # noqa: E402
from mmseg_m3vit.utils import (  # noqa: E402
    check_config_tasks,
    check_data_roots,
    format_metric_table,
    restrict_to_tasks,
)
from mmseg_m3vit.utils.cli import (  # noqa: E402
    HelpFormatter,
    add_runner_args,
    build_runner,
    dist_backend,
    load_config,
    parse_runner_args,
    preflight_errors,
    task_names_help,
)

EXAMPLES = """examples (CKPT: e.g. work_dirs/m3vit_nyud/best_multitask_delta_m_iter_5000.pth):
  python tools/test.py configs/m3vit_nyud.py CKPT
  python tools/test.py configs/m3vit_nyud.py CKPT --task depth --show-dir vis
  python tools/test.py configs/m3vit_nyud.py CKPT \\
      --cfg-options test_dataloader.dataset.data_root=data/NYUD_MT
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the evaluation tool."""
    parser = argparse.ArgumentParser(
        description="Evaluate an M3ViT multi-task segmentor on the config's test split",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("config", help="config file path")
    parser.add_argument("checkpoint", help="checkpoint file")
    parser.add_argument(
        "--task",
        nargs="+",
        default=None,
        help="evaluate only these tasks, each through its single-task pathway (only its "
        f"routers and head run); default: every task of the config ({task_names_help()})",
    )
    parser.add_argument(
        "--amp", action="store_true", help="run the model under bfloat16 autocast (GPU, or CPU)"
    )
    parser.add_argument("--out", help="also dump the predictions to this pickle file (.pkl)")
    parser.add_argument(
        "--show-dir",
        help="save one image | prediction | ground-truth PNG per test image here (relative: "
        "under the work dir)",
    )
    add_runner_args(parser, "test_dataloader.dataset.data_root=data/NYUD_MT")
    return parse_runner_args(parser, argv)


def build_config(args: argparse.Namespace) -> Config:
    """Load the config, apply the command line and ``--task``, run the pre-flight checks."""
    cfg = load_config(args)
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist")
    check_config_tasks(cfg)
    if args.task:
        cfg = restrict_to_tasks(cfg, args.task)
    cfg.load_from = None  # loaded strictly by main(), not by the runner's lenient loader
    cfg.resume = False
    if args.amp:
        cfg.test_cfg = dict(type="AmpTestLoop", dtype="bfloat16")
    # a progress bar with the ETA instead of the logger's line every `interval` batches
    cfg.custom_hooks = [*cfg.get("custom_hooks", []), dict(type="ProgressBarHook")]
    cfg.default_hooks.logger.interval = sys.maxsize
    if args.show_dir:
        cfg.default_hooks.visualization = dict(
            type="MultiTaskVisualizationHook", draw=True, out_dir=args.show_dir, interval=1
        )
    if args.out is not None and not args.out.endswith((".pkl", ".pickle")):
        raise ValueError(f"--out must be a .pkl/.pickle file, got {args.out!r}")
    check_data_roots(cfg, ("test_dataloader",))
    return cfg


def main(argv: list[str] | None = None) -> dict:
    """Build the runner, evaluate, print the metric table; returns the metrics."""
    args = parse_args(argv)
    with preflight_errors("test.py"):
        cfg = build_config(args)
    init_cpu_distributed(args.launcher, dist_backend(cfg))
    with trusted_checkpoints(args.trust_checkpoint):
        runner = build_runner(cfg)
        load_model_checkpoint(runner.model, args.checkpoint)
    runner.logger.info(f"Loaded checkpoint {args.checkpoint}")
    if args.out is not None:
        from mmengine.evaluator import DumpResults

        runner.test_evaluator.metrics.append(DumpResults(out_file_path=args.out))
    metrics = runner.test()
    if runner.rank == 0:
        print(format_metric_table(metrics))
    return metrics


if __name__ == "__main__":
    main()
