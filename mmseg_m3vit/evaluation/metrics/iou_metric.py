"""Mean IoU for label-map tasks (semantic segmentation, human parts).

Keys (prefix defaults to the task name): ``<task>/mIoU``, ``<task>/aAcc``, ``<task>/mAcc``,
all in percent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from mmengine.evaluator import BaseMetric
from mmengine.logging import print_log
from mmseg.registry import METRICS
from prettytable import PrettyTable

from .common import read_pair, safe_div, task_spec


def label_counts(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """Per-class pixel counts of one image.

    Args:
        pred: predicted class ids, any shape.
        gt: ground-truth class ids, same shape; ``ignore_index`` pixels are skipped.
        num_classes: number of classes C.
        ignore_index: GT value of pixels that are not evaluated.

    Returns:
        int64 array (4, C): rows intersection, union, predicted area, GT area (pixels).

    Raises:
        ValueError: a valid GT label lies outside ``[0, C)``.
    """
    valid = gt != ignore_index
    gt_v = gt[valid].astype(np.int64)
    pred_v = pred[valid].astype(np.int64)
    if gt_v.size and (gt_v.min() < 0 or gt_v.max() >= num_classes):
        raise ValueError(
            f"ground-truth labels must lie in [0, {num_classes}) or be {ignore_index}, "
            f"got values in [{gt_v.min()}, {gt_v.max()}]"
        )
    # Predictions outside [0, C) count as wrong for their GT class only.
    in_range = (pred_v >= 0) & (pred_v < num_classes)
    area_gt = np.bincount(gt_v, minlength=num_classes)
    area_pred = np.bincount(pred_v[in_range], minlength=num_classes)
    inter = np.bincount(gt_v[pred_v == gt_v], minlength=num_classes)
    union = area_gt + area_pred - inter
    return np.stack([inter, union, area_pred, area_gt]).astype(np.int64)


@METRICS.register_module()
class MultiTaskIoUMetric(BaseMetric):
    """Data-set mIoU of a label-map task (``'semseg'`` or ``'parts'``).

    Per image it keeps only the per-class intersection / union / areas (4 x C integers).
    The IoU of class c is ``sum_images inter_c / sum_images union_c``; mIoU is the mean over
    classes that occur in the GT or the prediction of the data set (classes with empty
    union are skipped, as in mmseg's ``IoUMetric``; the MTL survey code counts them as IoU
    0, which only differs when a class never occurs, e.g. on small or synthetic sets).
    ``aAcc`` is the pixel accuracy over valid pixels, ``mAcc`` the mean per-class recall.
    A per-class table is logged.

    Args:
        task: ``'semseg'`` or ``'parts'``; selects the data-sample fields via the task table.
        num_classes: number of classes C; default the data set's, from
            ``dataset_meta['task_channels'][task]`` (set by the runner from the data set).
        ignore_index: GT label of ignored pixels.
        class_names: names for the per-class table; defaults to ``dataset_meta['classes']``
            for semseg when its length is C, else class indices.
        collect_device / prefix: as :class:`mmengine.evaluator.BaseMetric`; ``prefix``
            defaults to ``task``.
    """

    def __init__(
        self,
        task: str,
        num_classes: int | None = None,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        collect_device: str = "cpu",
        prefix: str | None = None,
    ) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix or task)
        self.spec = task_spec(task, ("semseg", "parts"), type(self).__name__)
        self.task = task
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} entries, num_classes is {num_classes}"
            )
        self._num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None

    @property
    def num_classes(self) -> int:
        """C: the configured number of classes, else the data set's."""
        if self._num_classes is not None:
            return self._num_classes
        channels = (self.dataset_meta or {}).get("task_channels", {})
        if self.task not in channels:
            raise ValueError(
                f"{type(self).__name__}(task={self.task!r}): num_classes is not set and "
                f"dataset_meta has no task_channels[{self.task!r}]; give num_classes or "
                f"evaluate on a multi-task data set that has the task"
            )
        return int(channels[self.task])

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        """Store the (4, C) count array of every sample."""
        for sample in data_samples:
            pred, gt = read_pair(sample, self.spec)
            self.results.append(label_counts(pred, gt, self.num_classes, self.ignore_index))

    def _names(self) -> list[str]:
        if self.class_names is not None:
            return self.class_names
        meta = self.dataset_meta or {}
        classes = meta.get("classes")
        if self.task == "semseg" and classes is not None and len(classes) == self.num_classes:
            return list(classes)
        return [str(i) for i in range(self.num_classes)]

    def compute_metrics(self, results: list) -> dict[str, float]:
        """Sum the per-image counts and return mIoU, aAcc, mAcc in percent."""
        inter, union, _, area_gt = np.sum(results, axis=0)
        iou = safe_div(inter, union) * 100
        acc = safe_div(inter, area_gt) * 100
        table = PrettyTable(field_names=["class", "IoU", "Acc"])
        for name, i, a in zip(self._names(), iou, acc):
            table.add_row([name, f"{i:.2f}", f"{a:.2f}"])
        print_log(f"per-class results ({self.task}):\n{table.get_string()}", logger="current")
        valid_pixels = area_gt.sum()
        return {
            "mIoU": float(np.nanmean(iou)) if np.any(union > 0) else float("nan"),
            "aAcc": float(inter.sum() / valid_pixels * 100) if valid_pixels else float("nan"),
            "mAcc": float(np.nanmean(acc)) if np.any(area_gt > 0) else float("nan"),
        }
