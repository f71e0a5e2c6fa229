"""Depth errors over valid pixels, aggregated per pixel over the whole data set.

Keys (prefix defaults to ``depth``): ``depth/rmse`` (metres), ``depth/log_rmse`` (natural
log), ``depth/abs_rel`` (ratio), ``depth/delta1`` (percent of pixels with
``max(pred/gt, gt/pred) < 1.25``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from mmengine.evaluator import BaseMetric
from mmseg.registry import METRICS

from .common import read_pair, task_spec


def depth_sums(pred: np.ndarray, gt: np.ndarray, min_depth: float = 1e-3) -> np.ndarray:
    """Error sums of one image over its valid pixels (``gt > 0``).

    Args:
        pred: predicted depth in metres, any shape.
        gt: ground-truth depth in metres, same shape; ``<= 0`` (or non-finite) is invalid.
        min_depth: predictions are clamped to at least this (metres) for the log and the
            ratio terms only; the RMSE and abs-rel use the raw prediction.

    Returns:
        float64 array (5,): sum of squared errors (m^2), sum of squared log errors,
        sum of ``|pred - gt| / gt``, number of pixels with delta < 1.25, number of valid
        pixels.
    """
    valid = np.isfinite(gt) & (gt > 0)
    g = gt[valid].astype(np.float64)
    p = pred[valid].astype(np.float64)
    pc = np.maximum(p, min_depth)
    ratio = np.maximum(pc / g, g / pc)
    return np.array(
        [
            np.sum((p - g) ** 2),
            np.sum((np.log(pc) - np.log(g)) ** 2),
            np.sum(np.abs(p - g) / g),
            np.sum(ratio < 1.25),
            g.size,
        ],
        dtype=np.float64,
    )


@METRICS.register_module()
class DepthErrorMetric(BaseMetric):
    """Depth RMSE, log RMSE, abs rel and delta < 1.25 over the valid pixels of a data set.

    Aggregation is per pixel over the whole data set, as in the MTL literature's NYUD
    evaluation (Vandenhende et al.'s survey code): ``rmse = sqrt(sum_i sum_px e^2 /
    sum_i n_valid_i)``, not the mean of per-image RMSEs. Per image only five sums are kept.

    Args:
        task: the task scored (only ``'depth'``; the argument lets every task metric be
            configured alike).
        min_depth: lower clamp (metres) of the prediction in the log and ratio terms.
        collect_device / prefix: as :class:`mmengine.evaluator.BaseMetric`; ``prefix``
            defaults to the task.
    """

    def __init__(
        self,
        task: str = "depth",
        min_depth: float = 1e-3,
        collect_device: str = "cpu",
        prefix: str | None = None,
    ) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix or task)
        self.spec = task_spec(task, ("depth",), type(self).__name__)
        self.task = task
        if min_depth <= 0:
            raise ValueError(f"min_depth must be > 0 metres, got {min_depth}")
        self.min_depth = min_depth

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        """Store the five error sums of every sample."""
        for sample in data_samples:
            pred, gt = read_pair(sample, self.spec)
            self.results.append(depth_sums(pred, gt, self.min_depth))

    def compute_metrics(self, results: list) -> dict[str, float]:
        """Per-pixel data-set aggregates; NaN when no valid pixel was seen."""
        sq, sq_log, rel, good, n = np.sum(results, axis=0)
        if n == 0:
            return dict.fromkeys(("rmse", "log_rmse", "abs_rel", "delta1"), float("nan"))
        return {
            "rmse": float(np.sqrt(sq / n)),
            "log_rmse": float(np.sqrt(sq_log / n)),
            "abs_rel": float(rel / n),
            "delta1": float(good / n * 100),
        }
