"""Helpers shared by the per-task metrics: reading maps out of mmengine's dict samples."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from mmseg_m3vit.tasks import TaskSpec, get_task


def task_spec(task: str, allowed: tuple[str, ...], metric: str) -> TaskSpec:
    """Return the :class:`TaskSpec` of ``task`` after checking ``metric`` supports it."""
    if task not in allowed:
        raise ValueError(f"{metric} evaluates tasks {list(allowed)}, got task={task!r}")
    return get_task(task)


def _field(data_sample: Mapping[str, Any], field: str, spec: TaskSpec) -> np.ndarray:
    try:
        value = data_sample[field]
    except KeyError:
        raise KeyError(
            f"task {spec.name!r}: data sample has no {field!r} (keys: {sorted(data_sample)})"
        ) from None
    if isinstance(value, Mapping):
        value = value["data"]
    else:  # a PixelData that was not converted to a dict
        value = value.data
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def read_pair(
    data_sample: Mapping[str, Any], spec: TaskSpec, channels: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(pred, gt)`` of one sample as numpy arrays of shape (C, H, W).

    Reads ``data_sample[spec.pred_field]['data']`` and ``data_sample[spec.gt_field]['data']``
    (tensors on any device, or arrays); a 2-D map is taken as (1, H, W).

    Raises:
        KeyError: a field is missing (naming the task and field).
        ValueError: a map does not have ``channels`` channels, or pred and GT differ in size.
    """
    pred = _field(data_sample, spec.pred_field, spec)
    gt = _field(data_sample, spec.gt_field, spec)
    out = []
    for name, arr in (("prediction", pred), ("ground truth", gt)):
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[0] != channels:
            raise ValueError(
                f"task {spec.name!r}: {name} must have shape ({channels}, H, W), "
                f"got {tuple(arr.shape)}"
            )
        out.append(arr)
    if out[0].shape[1:] != out[1].shape[1:]:
        raise ValueError(
            f"task {spec.name!r}: prediction size {out[0].shape[1:]} differs from ground "
            f"truth size {out[1].shape[1:]}; predictions must be at the ground-truth size"
        )
    return out[0], out[1]


def safe_div(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """``num / den`` elementwise, NaN where ``den == 0`` (no warning)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out
