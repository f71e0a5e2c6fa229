"""Geometric transforms that know surface normals are vectors, not colours.

mmseg's ``RandomFlip`` / ``Resize`` / ``RandomCrop`` already move every map listed in
``results['seg_fields']`` (nearest-neighbour for maps, so normals stay unit length;
``RandomCrop`` crops every map but never pads, and its ``cat_max_ratio`` reads only
``gt_seg_map``, so keep it at 1.0 when semseg is not a chosen task). What they cannot
know is that moving the image moves the normal vectors too: after a horizontal flip the
x component of every normal changes sign, and an in-plane rotation rotates (x, y).
mmseg's ``RandomRotate`` also pads every map with one value (255, wrong for depth and
normals); :class:`MultiTaskRandomRotate` pads each with its task's ``pad_value``.

NYUD-MT training augmentation of docs/model.md s. 3 (scale in {1, 1.2, 1.5}, crop to 480x640,
h-flip)::

    dict(type='LoadImageFromFile'), dict(type='LoadMultiTaskAnnotations'),
    dict(type='RandomChoiceResize', scales=[(640, 480), (768, 576), (960, 720)],
         keep_ratio=True),
    dict(type='RandomCrop', crop_size=(480, 640)),
    dict(type='MultiTaskRandomFlip', prob=0.5), dict(type='PackMultiTaskInputs')

PASCAL-MT adds ``dict(type='MultiTaskRandomRotate', prob=1.0, degree=20)``.

Normals convention (camera frame, as in NYUD-MT): x to the right of the image, y up,
z towards the camera (visible surfaces have z > 0).
"""

from __future__ import annotations

import mmcv
import numpy as np
from mmcv.transforms import BaseTransform
from mmcv.transforms.utils import cache_randomness
from mmseg.datasets.transforms import RandomFlip
from mmseg.registry import TRANSFORMS

from mmseg_m3vit.tasks import TASK_SPECS, get_task

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


def rotate_normal_vectors(normals: np.ndarray, degree: float) -> np.ndarray:
    """Rotate the (x, y) components of camera-frame normals (x right, y up) as the image
    content is rotated clockwise by ``degree`` on screen (mmcv's ``imrotate`` sign).

    Args:
        normals: (H, W, 3) float map. Returns a new (H, W, 3) float32 map.
    """
    theta = np.deg2rad(degree)
    c, s = np.cos(theta), np.sin(theta)
    out = np.array(normals, dtype=np.float32, copy=True)
    x, y = normals[..., 0], normals[..., 1]
    out[..., 0] = c * x + s * y
    out[..., 1] = -s * x + c * y
    return out


@TRANSFORMS.register_module()
class MultiTaskRandomRotate(BaseTransform):
    """Rotate the image and every task map by a random angle about the image centre.

    The image is resampled bilinearly and padded with ``pad_val``; maps use nearest
    neighbour (labels stay labels, normals stay unit length) and are padded with their
    task's ``TaskSpec.pad_value`` (255 labels/edges, 0 depth, 0 normals). Normal
    vectors are rotated in the image plane with the content; depth (distance along
    the optical axis) is unchanged by a rotation about that axis.

    Args:
        prob: probability of rotating.
        degree: range (min, max) in degrees, or d for (-d, d); positive = clockwise.
        pad_val: image padding value.
        auto_bound: enlarge the output to hold the whole rotated image.
    """

    def __init__(
        self,
        prob: float,
        degree: float | tuple[float, float],
        pad_val: float = 0,
        auto_bound: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob {prob} must be in [0, 1]")
        if isinstance(degree, (int, float)):
            if degree <= 0:
                raise ValueError(f"degree {degree} must be positive")
            degree = (-float(degree), float(degree))
        if len(degree) != 2:
            raise ValueError(f"degree {degree} must be a number or (min, max)")
        self.prob = prob
        self.degree = (min(degree), max(degree))
        self.pad_val = pad_val
        self.auto_bound = auto_bound
        self._specs = {spec.results_key: spec for spec in TASK_SPECS.values()}

    @cache_randomness
    def _sample(self) -> tuple[bool, float]:
        return bool(np.random.rand() < self.prob), float(np.random.uniform(*self.degree))

    def transform(self, results: dict) -> dict:
        rotate, degree = self._sample()
        if not rotate:
            return results
        results["img"] = mmcv.imrotate(
            results["img"], degree, border_value=self.pad_val, auto_bound=self.auto_bound
        )
        normals_key = get_task("normals").results_key
        for key in results.get("seg_fields", []):
            if results.get(key) is None:
                continue
            spec = self._specs.get(key)
            if spec is None:
                raise KeyError(
                    f"MultiTaskRandomRotate: seg field {key!r} is not a task map of the task "
                    f"table ({sorted(self._specs)}); its padding value is unknown"
                )
            rotated = mmcv.imrotate(
                results[key],
                degree,
                border_value=spec.pad_value,
                interpolation="nearest",
                auto_bound=self.auto_bound,
            )
            if key == normals_key:
                rotated = rotate_normal_vectors(rotated, degree)
            results[key] = rotated
        results["img_shape"] = results["img"].shape[:2]
        results["rotate_degree"] = degree
        return results

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(prob={self.prob}, degree={self.degree})"
