"""Saliency: max-over-thresholds mean IoU and maxF.

Keys (prefix defaults to ``sal``), in percent: ``sal/maxIoU``, ``sal/maxF``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from mmengine.evaluator import BaseMetric
from mmseg.registry import METRICS

from .common import read_pair, safe_div, task_spec


def binary_counts(
    prob: np.ndarray, gt: np.ndarray, thresholds: np.ndarray, ignore_index: int = 255
) -> np.ndarray:
    """TP / FP / FN of ``prob > t`` against a binary GT, for every threshold t.

    Args:
        prob: predicted probabilities, any shape.
        gt: GT with 1 = positive, 0 = negative, ``ignore_index`` = not evaluated.
        thresholds: (K,) thresholds.

    Returns:
        int64 array (3, K): rows true positives, false positives, false negatives (pixels).

    Raises:
        ValueError: GT holds a value other than 0, 1 or ``ignore_index``.
    """
    valid = gt != ignore_index
    g = gt[valid]
    if g.size and not np.isin(g, (0, 1)).all():
        raise ValueError(
            f"binary ground truth must hold 0, 1 or {ignore_index}, got {np.unique(g)[:10]}"
        )
    p = prob[valid].astype(np.float64)
    pos = np.sort(p[g == 1])
    neg = np.sort(p[g == 0])
    # Number of values > t in a sorted array: size - searchsorted(t, side='right').
    tp = pos.size - np.searchsorted(pos, thresholds, side="right")
    fp = neg.size - np.searchsorted(neg, thresholds, side="right")
    fn = pos.size - tp
    return np.stack([tp, fp, fn]).astype(np.int64)


@METRICS.register_module()
class SaliencyMetric(BaseMetric):
    """Max-over-thresholds mean IoU and maxF of a saliency probability map.

    A pixel is predicted salient when ``prob > t``; GT pixels equal to ``ignore_index``
    are skipped (the survey code counts them as salient; here they are ignored).

    - ``maxIoU`` (the MTL survey's "mIoU" for saliency): for each threshold of
      ``iou_thresholds`` (default ``linspace(0.2, 0.9, 15)``, as the survey), the IoU of
      every image (1 when prediction and GT are both empty), averaged over images; then the
      maximum over thresholds.
    - ``maxF``: F-beta with ``beta2 = 0.3`` from precision and recall of TP / FP / FN
      counts summed over the data set (the ATRC / InvPT ``SaliencyMeter`` convention),
      maximum over ``f_thresholds`` (default 99 thresholds 0.01 ... 0.99; ATRC uses
      0.05 ... 0.95). Undefined F (no predicted or no GT positive) counts as 0.

    Per image it keeps 3 x (len(iou_thresholds) + len(f_thresholds)) integers.

    Args:
        task: the task scored (only ``'sal'``; the argument lets every task metric be
            configured alike).
        iou_thresholds: thresholds for maxIoU.
        f_thresholds: thresholds for maxF.
        beta2: beta squared of the F-measure.
        ignore_index: GT value of ignored pixels.
        collect_device / prefix: as :class:`mmengine.evaluator.BaseMetric`; ``prefix``
            defaults to the task.
    """

    def __init__(
        self,
        task: str = "sal",
        iou_thresholds: Sequence[float] | None = None,
        f_thresholds: Sequence[float] | None = None,
        beta2: float = 0.3,
        ignore_index: int = 255,
        collect_device: str = "cpu",
        prefix: str | None = None,
    ) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix or task)
        self.spec = task_spec(task, ("sal",), type(self).__name__)
        self.task = task
        if iou_thresholds is None:
            iou_thresholds = np.linspace(0.2, 0.9, 15)
        if f_thresholds is None:
            f_thresholds = np.linspace(0.01, 0.99, 99)
        self.iou_thresholds = np.asarray(iou_thresholds, dtype=np.float64)
        self.f_thresholds = np.asarray(f_thresholds, dtype=np.float64)
        named = (("iou_thresholds", self.iou_thresholds), ("f_thresholds", self.f_thresholds))
        for name, t in named:
            if t.ndim != 1 or t.size == 0:
                raise ValueError(f"{name} must be a non-empty 1-D sequence, got {t}")
        if beta2 <= 0:
            raise ValueError(f"beta2 must be > 0, got {beta2}")
        self.beta2 = beta2
        self.ignore_index = ignore_index

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        """Store per sample the (3, K_iou) and (3, K_f) TP/FP/FN arrays."""
        for sample in data_samples:
            pred, gt = read_pair(sample, self.spec)
            self.results.append(
                (
                    binary_counts(pred, gt, self.iou_thresholds, self.ignore_index),
                    binary_counts(pred, gt, self.f_thresholds, self.ignore_index),
                )
            )

    def compute_metrics(self, results: list) -> dict[str, float]:
        """maxIoU (mean of per-image IoU, max over thresholds) and maxF, in percent."""
        iou_counts = np.stack([r[0] for r in results])  # (N, 3, K)
        tp, fp, fn = iou_counts[:, 0], iou_counts[:, 1], iou_counts[:, 2]
        union = tp + fp + fn
        iou = np.where(union > 0, tp / np.maximum(union, 1), 1.0)
        tp, fp, fn = np.sum([r[1] for r in results], axis=0)
        precision = safe_div(tp, tp + fp)
        recall = safe_div(tp, tp + fn)
        f = safe_div((1 + self.beta2) * precision * recall, self.beta2 * precision + recall)
        f = np.nan_to_num(f, nan=0.0)
        return {"maxIoU": float(iou.mean(axis=0).max() * 100), "maxF": float(f.max() * 100)}
