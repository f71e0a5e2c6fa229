"""Colour maps for every task and the image | prediction | ground truth | key panel.

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
from collections.abc import Mapping, Sequence
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


def normals_angular_error(pred: Any, gt: Any) -> np.ndarray:
    """Per-pixel angle in degrees between predicted and ground-truth normals.

    Args:
        pred, gt: normal maps (3, H, W) (any length; both are normalised per pixel).

    Returns:
        float64 (H, W) in [0, 180]; NaN where the ground truth is the zero vector
        (invalid) or the prediction is zero.
    """
    p = _to_numpy(pred)[:3].astype(np.float64)
    g = _to_numpy(gt)[:3].astype(np.float64)
    pn, gn = np.linalg.norm(p, axis=0), np.linalg.norm(g, axis=0)
    valid = (pn > 0) & (gn > 0)
    cos = (p * g).sum(axis=0) / np.where(valid, pn * gn, 1.0)
    angle = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    return np.where(valid, angle, np.nan)


#: Classes listed in a panel's colour key at most (the most frequent ones).
MAX_KEY_CLASSES = 14
#: Upper end of the colour scale of the normals' angular error, in degrees.
MAX_ERROR_DEG = 60.0


def _class_key(ax: Any, maps: list[np.ndarray], names: Sequence[str] | None) -> None:
    """Draw a colour key of the classes in ``maps`` (most frequent first) into ``ax``."""
    from matplotlib.patches import Patch

    ids = np.concatenate([m[0].ravel() for m in maps]).astype(np.int64)
    ids = ids[(ids >= 0) & (ids < 255)]
    counts = np.bincount(ids) if ids.size else np.zeros(0, np.int64)
    order = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
    shown = order[:MAX_KEY_CLASSES]
    handles = [
        Patch(
            color=_PALETTE[c] / 255.0,
            label=f"{c} {names[c]}" if names is not None and c < len(names) else str(c),
        )
        for c in sorted(shown)
    ]
    if len(order) > len(shown):
        handles.append(Patch(color="white", label=f"+{len(order) - len(shown)} more"))
    ax.legend(handles=handles, loc="upper left", fontsize=6, frameon=False, ncol=1)


def prediction_panel(
    image_rgb: np.ndarray,
    preds: Mapping[str, Any],
    gts: Mapping[str, Any] | None = None,
    title: str = "",
    class_names: Mapping[str, Sequence[str]] | None = None,
) -> np.ndarray:
    """One figure of an image and every task's prediction, ground truth and key, as RGB.

    Columns: the image, then one per task. Rows: prediction, ground truth (when given),
    then a key row: the colour key of the classes shown (semseg, parts; names from
    ``class_names``) and the angular error of the normals (degrees, with its colour bar).
    Depth prediction and ground truth share one colour scale in metres (the ground
    truth's valid range), shown by a colour bar beside each.

    Args:
        image_rgb: (H, W, 3) uint8 RGB image.
        preds: task -> predicted map (C, H, W), at the image size.
        gts: task -> ground-truth map; tasks without GT show an empty cell.
        title: figure title (e.g. the image name).
        class_names: task -> class names of the label tasks (index = class id).

    Returns:
        (h, w, 3) uint8 RGB rendering of the figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    gts = gts or {}
    class_names = class_names or {}
    tasks = [t for t in preds if t in TASK_SPECS]
    keyed = [t for t in tasks if get_task(t).is_label and t in ("semseg", "parts")]
    has_key_row = bool(keyed) or ("normals" in tasks and "normals" in gts)
    rows = 1 + bool(gts) + has_key_row
    cols = 1 + len(tasks)
    fig, axes = plt.subplots(rows, cols, figsize=(2.7 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(image_rgb)
    axes[0, 0].set_title("image", fontsize=9)
    key_row = rows - 1
    for j, task in enumerate(tasks, start=1):
        cells = [("pred", preds[task], 0)]
        if task in gts:
            cells.append(("GT", gts[task], 1))
        depth_range = None
        if task == "depth":
            gt = _to_numpy(gts[task])[0] if task in gts else _to_numpy(preds[task])[0]
            valid = gt[np.isfinite(gt) & (gt > 0)]
            if valid.size:
                depth_range = (float(valid.min()), float(valid.max()))
        for label, data, row in cells:
            ax = axes[row, j]
            ax.imshow(colorize(task, data, depth_range))
            ax.set_title(f"{task} {label}", fontsize=9)
            if task == "depth" and depth_range is not None:
                scale = ScalarMappable(Normalize(*depth_range), cmap="viridis")
                bar = fig.colorbar(scale, ax=ax, fraction=0.046, pad=0.02, extend="both")
                bar.set_label("depth (m)", fontsize=7)
                bar.ax.tick_params(labelsize=6)
        if task in keyed:
            maps = [_to_numpy(preds[task])] + ([_to_numpy(gts[task])] if task in gts else [])
            _class_key(axes[key_row, j], maps, class_names.get(task))
            axes[key_row, j].set_title(f"{task} classes", fontsize=9)
        if task == "normals" and task in gts:
            error = normals_angular_error(preds[task], gts[task])
            ax = axes[key_row, j]
            cmap = matplotlib.colormaps["inferno"].with_extremes(bad="0.6")
            ax.imshow(np.ma.masked_invalid(error), cmap=cmap, vmin=0, vmax=MAX_ERROR_DEG)
            mean = float(np.nanmean(error)) if np.isfinite(error).any() else float("nan")
            ax.set_title(f"normals error, mean {mean:.1f}°", fontsize=9)
            scale = ScalarMappable(Normalize(0, MAX_ERROR_DEG), cmap=cmap)
            bar = fig.colorbar(scale, ax=ax, fraction=0.046, pad=0.02, extend="max")
            bar.set_label("angle (°); grey: no GT", fontsize=7)
            bar.ax.tick_params(labelsize=6)
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
