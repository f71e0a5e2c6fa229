"""The README's main job, end to end on 2 CPU cores in under 10 minutes.

1. generate the synthetic NYUD-MT set (96x128 ray-cast rooms) if it is absent;
2. train the small M3ViT config (``configs/m3vit_synthetic.py``) on it;
3. evaluate all four tasks on the synthetic val split and print the per-task metric
   table (with Δm) beside trivial predictors fitted on the training split: majority
   class (semseg mIoU), mean depth (RMSE), mean normal (angular error), all-zero edges;
4. save PNGs in the work dir: ``predictions/*.png`` (image | each task's prediction /
   ground truth) and ``routing.png`` (per task and MoE layer, the fraction of tokens
   sent to each expert).

Usage::

    python tools/demo.py [--work-dir work_dirs/demo] [--data-root data/synthetic_nyud]
        [--iters N] [--num-train 320 --num-val 80] [--cfg-options ...]
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from mmengine.config import Config, DictAction
from mmengine.evaluator import Evaluator
from mmengine.registry import init_default_scope
from mmengine.runner import Runner
from mmengine.structures import PixelData

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

import mmseg_m3vit  # noqa: E402, F401
from mmseg_m3vit.engine import check_config_tasks, check_data_roots, config_tasks  # noqa: E402
from mmseg_m3vit.engine.routing import (  # noqa: E402
    collect_routing,
    plot_routing,
    routing_summary,
)
from mmseg_m3vit.evaluation.metrics import delta_m  # noqa: E402
from mmseg_m3vit.tasks import TASK_SPECS  # noqa: E402

DEFAULT_CONFIG = osp.join(ROOT, "configs", "m3vit_synthetic.py")
LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")
TRIVIAL_NAMES = {
    "semseg": "majority class",
    "depth": "mean depth",
    "normals": "mean normal",
    "edge": "all-zero edges",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the demo."""
    parser = argparse.ArgumentParser(description="M3ViT main job on synthetic NYUD-MT")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--work-dir", default="work_dirs/demo")
    parser.add_argument("--data-root", default="data/synthetic_nyud")
    parser.add_argument("--num-train", type=int, default=320, help="images to generate")
    parser.add_argument("--num-val", type=int, default=80, help="images to generate")
    parser.add_argument("--iters", type=int, default=None, help="override max_iters")
    parser.add_argument("--num-vis", type=int, default=6, help="prediction PNGs to save")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction)
    return parser.parse_args(argv)


class Stopwatch:
    """Prints each stage with its wall time and the total so far."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()

    def __call__(self, message: str) -> None:
        now = time.perf_counter()
        print(
            f"[demo] {message} ({now - self.last:.0f} s; total {now - self.start:.0f} s)",
            flush=True,
        )
        self.last = now


def ensure_data(root: str, size: Sequence[int], num_train: int, num_val: int) -> bool:
    """Generate the synthetic set at ``root`` unless it exists; True when generated."""
    if osp.isdir(root):
        meta_path = osp.join(root, "meta.json")
        if osp.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            if list(meta.get("size", size)) != list(size):
                print(
                    f"[demo] warning: {root} holds {meta['size']} images, the config "
                    f"expects {list(size)}; delete it to regenerate",
                    flush=True,
                )
        return False
    from mmseg_m3vit.datasets.synthetic_nyud import generate

    print(f"[demo] generating {num_train}+{num_val} synthetic images at {root}", flush=True)
    generate(root, num_train, num_val, size=tuple(size), workers=2, progress=True)
    return True


def build_demo_config(args: argparse.Namespace) -> Config:
    """The small config with the demo's data root, work dir, iterations and PNG hook."""
    cfg = Config.fromfile(args.config)
    for key in LOADERS:
        cfg[key].dataset.data_root = args.data_root
    if args.iters is not None:
        if args.iters < 1:
            raise ValueError(f"--iters must be >= 1, got {args.iters}")
        cfg.train_cfg.max_iters = args.iters
        cfg.train_cfg.val_interval = min(cfg.train_cfg.val_interval, args.iters)
        for sched in cfg.param_scheduler:
            if sched.get("end") is not None:
                sched.end = args.iters
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.work_dir = args.work_dir
    cfg.default_hooks.visualization = dict(
        type="MultiTaskVisualizationHook",
        draw=True,
        out_dir="predictions",
        max_images=args.num_vis,
    )
    check_config_tasks(cfg)
    return cfg


def _map(sample: Any, field: str) -> np.ndarray:
    return sample.get(field).data.numpy()


def fit_trivial(cfg: Config, tasks: Sequence[str]) -> dict[str, Any]:
    """Statistics of the training split for the trivial predictors (no augmentation)."""
    init_default_scope(cfg.get("default_scope", "mmseg"))
    ds_cfg = cfg.train_dataloader.dataset.copy()
    ds_cfg.pipeline = cfg.test_dataloader.dataset.pipeline
    from mmseg.registry import DATASETS

    dataset = DATASETS.build(ds_cfg)
    class_hist = np.zeros(256, dtype=np.int64)
    depth_sum, depth_n = 0.0, 0
    normal_sum = np.zeros(3)
    for i in range(len(dataset)):
        sample = dataset[i]["data_samples"]
        if "semseg" in tasks:
            seg = _map(sample, TASK_SPECS["semseg"].gt_field).ravel()
            class_hist += np.bincount(seg[seg != 255], minlength=256)[:256]
        if "depth" in tasks:
            d = _map(sample, TASK_SPECS["depth"].gt_field)
            valid = d > 0
            depth_sum += float(d[valid].sum())
            depth_n += int(valid.sum())
        if "normals" in tasks:
            n = _map(sample, TASK_SPECS["normals"].gt_field).reshape(3, -1)
            normal_sum += n[:, np.any(n != 0, axis=0)].sum(axis=1)
    stats: dict[str, Any] = {}
    if "semseg" in tasks:
        stats["semseg"] = int(class_hist.argmax())
    if "depth" in tasks:
        stats["depth"] = depth_sum / max(depth_n, 1)
    if "normals" in tasks:
        stats["normals"] = normal_sum / max(np.linalg.norm(normal_sum), 1e-12)
    if "edge" in tasks:
        stats["edge"] = 0.0
    return stats


def trivial_prediction(task: str, stat: Any, hw: tuple[int, int]) -> torch.Tensor:
    """A constant prediction map of ``task`` at size ``hw`` (pred-field layout)."""
    h, w = hw
    if task == "semseg":
        return torch.full((1, h, w), int(stat), dtype=torch.long)
    if task == "normals":
        return torch.tensor(stat, dtype=torch.float32).view(3, 1, 1).expand(3, h, w).clone()
    return torch.full((1, h, w), float(stat), dtype=torch.float32)


def evaluate_trivial(cfg: Config, stats: Mapping[str, Any]) -> dict[str, float]:
    """Evaluate the trivial predictors with the config's own test metrics."""
    init_default_scope(cfg.get("default_scope", "mmseg"))
    loader_cfg = cfg.test_dataloader.copy()
    loader_cfg.update(num_workers=0, persistent_workers=False)
    loader = Runner.build_dataloader(loader_cfg)
    evaluator = Evaluator(cfg.test_evaluator)
    evaluator.dataset_meta = loader.dataset.metainfo  # as mmengine's test loop does
    for batch in loader:
        samples = batch["data_samples"]
        for sample in samples:
            hw = tuple(sample.metainfo["ori_shape"])
            for task, stat in stats.items():
                pred = trivial_prediction(task, stat, hw)
                sample.set_data({TASK_SPECS[task].pred_field: PixelData(data=pred)})
        evaluator.process(samples, batch)
    return evaluator.evaluate(len(loader.dataset))


def delta_m_key(metrics: Mapping[str, Any]) -> str | None:
    """The key of the multi-task delta in a metrics dict, if the config computes one."""
    for key in metrics:
        if key.rsplit("/", 1)[-1].lower() in ("dm", "delta_m", "deltam"):
            return key
    return None


def result_table(
    tasks: Sequence[str], model: Mapping[str, Any], trivial: Mapping[str, Any]
) -> tuple[str, bool]:
    """Per-task main metric of the model beside the trivial predictor, plus Δm.

    Returns the table text and whether the model beats the trivial predictor on every task.
    """
    lines = [
        f"{'task':<8} {'metric':<14} {'M3ViT':>9} {'trivial':>9}  {'trivial predictor':<18} better",
        "-" * 72,
    ]
    all_better = True
    for task in tasks:
        spec = TASK_SPECS[task]
        key = f"{task}/{spec.main_metric}"
        m, t = float(model[key]), float(trivial[key])
        better = m < t if spec.lower_is_better else m > t
        all_better &= better
        arrow = "lower" if spec.lower_is_better else "higher"
        lines.append(
            f"{task:<8} {spec.main_metric + ' (' + arrow + ')':<14} {m:>9.3f} {t:>9.3f}  "
            f"{TRIVIAL_NAMES.get(task, '-'):<18} {'yes' if better else 'NO'}"
        )
    lines.append("-" * 72)
    dm = delta_m_key(model)
    if dm is not None:
        lines.append(
            f"{'Δm (%)':<8} {'vs config ref':<14} {float(model[dm]):>9.2f} "
            f"{float(trivial.get(dm, float('nan'))):>9.2f}  paper's NYUD STL numbers"
        )
    # Δm of the model with the trivial predictors as the reference (tasks whose trivial
    # score is not 0: an all-zero edge map scores odsF 0 and cannot be a reference)
    values, refs = {}, {}
    for task in tasks:
        key = f"{task}/{TASK_SPECS[task].main_metric}"
        if float(trivial[key]) != 0:
            values[task], refs[task] = float(model[key]), float(trivial[key])
    if values:
        dm_trivial, _ = delta_m(values, refs)
        lines.append(
            f"{'Δm (%)':<8} {'vs trivial':<14} {dm_trivial:>9.2f} {0.0:>9.2f}  "
            f"over {', '.join(values)}"
        )
    return "\n".join(lines), all_better


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the main job; returns the metrics of the model and of the trivial predictors."""
    args = parse_args(argv)
    clock = Stopwatch()
    cfg = build_demo_config(args)
    tasks = config_tasks(cfg)
    size = tuple(cfg.model.backbone.img_size)
    if ensure_data(args.data_root, size, args.num_train, args.num_val):
        clock("data generated")
    check_data_roots(cfg)

    runner = Runner.from_cfg(cfg)
    runner.train()
    clock(f"trained {cfg.train_cfg.max_iters} iterations")

    # model selection: the checkpoint with the best Δm on the held-out part of train
    best = runner.message_hub.get_info("best_ckpt")
    if best and osp.isfile(best):
        runner.load_checkpoint(best, map_location="cpu")
        print(f"[demo] evaluating the best checkpoint on the held-out split: {best}")
    metrics = runner.test()
    clock("evaluated the model on the val split")

    stats = fit_trivial(cfg, tasks)
    trivial = evaluate_trivial(cfg, stats)
    clock("evaluated the trivial predictors")

    loader_cfg = cfg.test_dataloader.copy()
    loader_cfg.update(num_workers=0, persistent_workers=False, batch_size=4)
    load = collect_routing(
        runner.model, Runner.build_dataloader(loader_cfg), tasks, max_batches=5, progress=False
    )
    routing_png = osp.join(cfg.work_dir, "routing.png")
    plot_routing(load, routing_png, title="token fraction per expert (synthetic val)")
    print(routing_summary(load))
    clock("routing statistics saved")

    table, all_better = result_table(tasks, metrics, trivial)
    print("\nPer-task results on the synthetic val split:\n" + table)
    pred_dir = osp.join(cfg.work_dir, "predictions")
    n_png = (
        len([f for f in os.listdir(pred_dir) if f.endswith(".png")]) if osp.isdir(pred_dir) else 0
    )
    print(f"\nsaved {n_png} prediction PNGs in {pred_dir} and {routing_png}")
    if not all_better:
        print("WARNING: the model does not beat every trivial predictor; train longer (--iters)")
    with open(osp.join(cfg.work_dir, "demo_metrics.json"), "w") as f:
        json.dump(
            dict(
                model=metrics,
                trivial=trivial,
                trivial_stats={
                    k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in stats.items()
                },
            ),
            f,
            indent=2,
            default=float,
        )
    clock("done")
    return dict(model=metrics, trivial=trivial, beats_trivial=all_better)


if __name__ == "__main__":
    main()
