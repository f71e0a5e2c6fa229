"""Geometric transforms that know surface normals are vectors, not colours.

mmseg's ``RandomFlip`` / ``Resize`` / ``RandomCrop`` already move every map listed in
``results['seg_fields']`` (nearest-neighbour for maps, so normals stay unit length).
What they cannot know is that mirroring the image mirrors the normal vectors too:
after a horizontal flip the x component of every normal changes sign.

Normals convention (camera frame, as in NYUD-MT): x to the right of the image, y up,
z towards the camera (visible surfaces have z > 0).
"""

from __future__ import annotations

import mmcv
import numpy as np
from mmseg.datasets.transforms import RandomFlip
from mmseg.registry import TRANSFORMS

from mmseg_m3vit.tasks import get_task

#: Flip direction -> normal components whose sign changes (x: 0, y: 1).
_NEGATED_COMPONENTS = {"horizontal": (0,), "vertical": (1,), "diagonal": (0, 1)}


def flip_normals(normals: np.ndarray, direction: str) -> np.ndarray:
    """Mirror a normal map: move the pixels and negate the mirrored components.

    Args:
        normals: (H, W, 3) float normal map in the camera frame (x right, y up).
        direction: ``'horizontal'`` (negates x), ``'vertical'`` (negates y) or
            ``'diagonal'`` (both).

    Returns:
        the flipped (H, W, 3) map (a new array; invalid all-zero vectors stay zero).
    """
    if direction not in _NEGATED_COMPONENTS:
        raise ValueError(f"flip direction {direction!r} not in {list(_NEGATED_COMPONENTS)}")
    if normals.ndim != 3 or normals.shape[2] != 3:
        raise ValueError(f"flip_normals expects an (H, W, 3) map, got shape {normals.shape}")
    out = mmcv.imflip(normals, direction=direction).copy()
    for c in _NEGATED_COMPONENTS[direction]:
        out[..., c] = -out[..., c]
    return out


@TRANSFORMS.register_module()
class MultiTaskRandomFlip(RandomFlip):
    """mmseg's ``RandomFlip`` for multi-task samples: also mirrors the normal vectors.

    Flips ``img`` and every map in ``seg_fields``; the normal map (the task table's
    ``normals.results_key``) additionally has its x component negated on a horizontal
    flip (y on a vertical one). Same arguments as mmseg's ``RandomFlip``
    (``prob``, ``direction``) except ``swap_seg_labels``, which mmseg would apply to
    every map (depth and normals included) and is therefore refused.
    """

    def __init__(self, *args, **kwargs) -> None:
        if kwargs.get("swap_seg_labels") is not None:
            raise ValueError(
                "MultiTaskRandomFlip does not support swap_seg_labels: mmseg applies it to "
                "every map in seg_fields, depth and normals included"
            )
        super().__init__(*args, **kwargs)

    def _flip(self, results: dict) -> None:
        direction = results["flip_direction"]
        results["img"] = mmcv.imflip(results["img"], direction=direction)
        normals_key = get_task("normals").results_key
        for key in results.get("seg_fields", []):
            if results.get(key) is None:
                continue
            if key == normals_key:
                results[key] = flip_normals(results[key], direction)
            else:
                results[key] = mmcv.imflip(results[key], direction=direction).copy()
