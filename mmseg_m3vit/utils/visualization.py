"""Colour maps for every task and the image | prediction | ground-truth panel.

All renderers turn a task map of shape (C, H, W) (the ``PixelData.data`` layout of
docs/design.md) into an RGB uint8 image (H, W, 3):

- semseg / parts: a fixed palette per class id, ignore (255) black;
- depth: ``viridis`` over ``[vmin, vmax]`` metres, invalid (<= 0) black;
- normals: ``(n + 1) / 2`` per channel (x -> red, y -> green, z -> blue), zero vectors black;
- edge / sal: grey levels of the probability (or binary label), ignore (255) dark red.
"""

from __future__ import annotations

import os
import os.path as osp
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..tasks import TASK_SPECS, get_task


def _to_numpy(data: Any) -> np.ndarray:
    """Tensor / PixelData / dict-with-'data' / array -> float or int numpy (C, H, W)."""
    if isinstance(data, Mapping):
        data = data["data"]
    elif hasattr(data, "data") and not isinstance(data, np.ndarray | torch.Tensor):
        data = data.data
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    arr = np.asarray(data)
    return arr[None] if arr.ndim == 2 else arr


def label_palette(num: int = 256, seed: int = 3) -> np.ndarray:
    """(num, 3) uint8 palette: distinct random colours, index 255 black (ignore)."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(40, 256, size=(num, 3), dtype=np.uint8)
    if num > 255:
        palette[255] = 0
    return palette


_PALETTE = label_palette()


def colorize(task: str, data: Any, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Render one task map as RGB uint8 (H, W, 3); see the module docstring.

    Args:
        task: task name from the task table.
        data: map of shape (C, H, W) or (H, W) (tensor, array, or PixelData).
        value_range: depth range (metres) of the colour map; default the map's valid
            min / max.
    """
    spec = get_task(task)
    arr = _to_numpy(data)
    if task in ("semseg", "parts"):
        ids = arr[0].astype(np.int64).clip(0, 255)
        return _PALETTE[ids]
    if task == "depth":
        import matplotlib

        depth = arr[0].astype(np.float64)
        valid = np.isfinite(depth) & (depth > 0)
        if value_range is None:
            value_range = (
                (float(depth[valid].min()), float(depth[valid].max())) if valid.any() else (0, 1)
            )
        lo, hi = value_range
        norm = np.clip((depth - lo) / max(hi - lo, 1e-6), 0, 1)
        rgb = (matplotlib.colormaps["viridis"](norm)[..., :3] * 255).astype(np.uint8)
        rgb[~valid] = 0
        return rgb
    if task == "normals":
        n = arr[:3].astype(np.float64).transpose(1, 2, 0)
        rgb = ((np.clip(n, -1, 1) + 1) * 127.5).astype(np.uint8)
        rgb[np.all(n == 0, axis=-1)] = 0
        return rgb
    # edge / sal: probability or {0, 1} label, 255 = ignore
    m = arr[0].astype(np.float64)
    ignore = m == spec.pad_value if spec.is_label else np.zeros_like(m, dtype=bool)
    grey = (np.clip(np.where(ignore, 0, m), 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgb[ignore] = (90, 0, 0)
    return rgb


def prediction_panel(
    image_rgb: np.ndarray,
    preds: Mapping[str, Any],
    gts: Mapping[str, Any] | None = None,
    title: str = "",
) -> np.ndarray:
    """Grid ``image | pred task 1 | ... `` over ``(blank) | GT task 1 | ...`` as RGB uint8.

    Args:
        image_rgb: (H, W, 3) uint8 RGB image.
        preds: task -> predicted map (C, H, W), at the image size.
        gts: task -> ground-truth map; tasks without GT show an empty cell.
        title: figure title (e.g. the image name).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in preds if t in TASK_SPECS]
    rows = 2 if gts else 1
    cols = 1 + len(tasks)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.5 * rows), squeeze=False)
    axes[0, 0].imshow(image_rgb)
    axes[0, 0].set_title("image", fontsize=9)
    for j, task in enumerate(tasks, start=1):
        depth_range = None
        if task == "depth" and gts and task in gts:
            gt = _to_numpy(gts[task])[0]
            valid = gt[np.isfinite(gt) & (gt > 0)]
            if valid.size:
                depth_range = (float(valid.min()), float(valid.max()))
        axes[0, j].imshow(colorize(task, preds[task], depth_range))
        axes[0, j].set_title(f"{task} pred", fontsize=9)
        if rows == 2:
            if task in gts:
                axes[1, j].imshow(colorize(task, gts[task], depth_range))
            axes[1, j].set_title(f"{task} GT", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(h_pad=1.2)
    fig.canvas.draw()
    out = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return out


def sample_maps(data_sample: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(preds, gts)`` task -> map of one ``SegDataSample`` (fields from the task table)."""
    preds, gts = {}, {}
    for task, spec in TASK_SPECS.items():
        if spec.pred_field in data_sample:
            preds[task] = data_sample.get(spec.pred_field)
        if spec.gt_field in data_sample:
            gts[task] = data_sample.get(spec.gt_field)
    return preds, gts


def save_png(path: str, rgb: np.ndarray) -> None:
    """Write an RGB uint8 image to ``path`` (PNG), creating the folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    plt.imsave(path, rgb)
