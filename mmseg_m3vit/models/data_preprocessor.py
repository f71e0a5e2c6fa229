"""Multi-task data preprocessor (MODELS: ``MultiTaskDataPreprocessor``).

mmseg's ``SegDataPreProcessor`` pads only ``gt_sem_seg`` / ``gt_edge_map`` /
``gt_depth_map``, all with one value (255: wrong for depth) and ignores other fields.
This one pads every task map with its own ``TaskSpec.pad_value`` from the task table
(labels and edges 255 = ignore, depth 0 = invalid, normals 0 = invalid).
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Number
from typing import Any

import torch
import torch.nn.functional as F
from mmengine.model import BaseDataPreprocessor
from mmseg.registry import MODELS

from mmseg_m3vit.tasks import TASK_SPECS


def _padded_hw(
    sizes: list[tuple[int, int]], size: Sequence[int] | None, size_divisor: int | None
) -> tuple[int, int]:
    """Batch (H, W) after padding: at least every image, then ``size`` or a multiple of
    ``size_divisor`` (images larger than ``size`` are not cropped)."""
    h = max(s[0] for s in sizes)
    w = max(s[1] for s in sizes)
    if size is not None:
        h, w = max(h, int(size[0])), max(w, int(size[1]))
    elif size_divisor is not None and size_divisor > 1:
        h = -(-h // size_divisor) * size_divisor
        w = -(-w // size_divisor) * size_divisor
    return h, w


@MODELS.register_module()
class MultiTaskDataPreprocessor(BaseDataPreprocessor):
    """Normalise, pad and batch images; pad every task's ground truth with its own value.

    Input (from the data loader's ``pseudo_collate``): ``inputs`` a list of uint8
    tensors (3, H_i, W_i), ``data_samples`` a list of ``SegDataSample`` from
    ``PackMultiTaskInputs``.

    Output: ``inputs`` float tensor (B, 3, H, W), normalised as
    ``(x[rgb] - mean) / std`` and padded bottom/right with ``pad_val`` (after
    normalisation, as mmseg); ``data_samples`` with metainfo ``img_shape`` (H_i, W_i
    before padding), ``pad_shape`` (H, W) and ``padding_size`` (left, right, top,
    bottom) in pixels.

    Training: every task map (each ``TaskSpec.gt_field`` present) is padded like its
    image with ``TaskSpec.pad_value``. Testing: only the images are padded (to
    ``test_cfg['size' | 'size_divisor']`` if given, else to the largest image of the
    batch); ground truth stays at its own size for the metrics.

    Args:
        mean, std: per-channel statistics (RGB order when ``bgr_to_rgb``); both or none.
        size: (H, W) to pad training batches to. Exactly one of ``size`` and
            ``size_divisor`` must be given for training.
        size_divisor: pad training batches to a multiple of this.
        pad_val: image padding value (in normalised units).
        bgr_to_rgb, rgb_to_bgr: swap channels 0 and 2 first (at most one).
        test_cfg: optional ``dict(size=...)`` or ``dict(size_divisor=...)`` for testing.
        non_blocking: copy the batch to the device without making the host wait (True,
            unlike mmengine's default). A blocking copy first waits for the GPU to finish
            the previous step, so the new step's launches start on an idle device. The
            copies are stream-ordered either way; the values are the same.
    """

    def __init__(
        self,
        mean: Sequence[Number] | None = None,
        std: Sequence[Number] | None = None,
        size: Sequence[int] | None = None,
        size_divisor: int | None = None,
        pad_val: Number = 0,
        bgr_to_rgb: bool = False,
        rgb_to_bgr: bool = False,
        test_cfg: dict | None = None,
        non_blocking: bool = True,
    ) -> None:
        super().__init__(non_blocking=non_blocking)
        if (mean is None) != (std is None):
            raise ValueError(f"give both mean and std or neither (got mean={mean}, std={std})")
        if bgr_to_rgb and rgb_to_bgr:
            raise ValueError("bgr_to_rgb and rgb_to_bgr cannot both be True")
        if size is not None and size_divisor is not None:
            raise ValueError(
                f"give only one of size={size} and size_divisor={size_divisor} for padding"
            )
        if size is not None and len(size) != 2:
            raise ValueError(f"size must be (H, W), got {size}")
        if test_cfg is not None:
            bad = set(test_cfg) - {"size", "size_divisor"}
            if bad or len(test_cfg) > 1:
                raise ValueError(
                    f"test_cfg {test_cfg} must be dict(size=(H, W)) or dict(size_divisor=n)"
                )
        self.size = tuple(size) if size is not None else None
        self.size_divisor = size_divisor
        self.pad_val = pad_val
        self.channel_conversion = bgr_to_rgb or rgb_to_bgr
        self.test_cfg = dict(test_cfg) if test_cfg else {}
        self._normalize = mean is not None
        if self._normalize:
            self.register_buffer(
                "mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), False
            )
            self.register_buffer(
                "std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), False
            )

    def forward(self, data: dict, training: bool = False) -> dict[str, Any]:
        """See the class docstring; ``data`` is ``dict(inputs=[...], data_samples=[...])``."""
        data = self.cast_data(data)
        inputs = data["inputs"]
        samples = data.get("data_samples")
        if isinstance(inputs, torch.Tensor):
            inputs = list(inputs)
        if not inputs:
            raise ValueError("MultiTaskDataPreprocessor got an empty batch")
        for i, x in enumerate(inputs):
            if x.ndim != 3:
                raise ValueError(f"input {i} should be (C, H, W), got shape {tuple(x.shape)}")
        if self.channel_conversion:
            # flip, not x[[2, 1, 0]]: a list index is copied to the device, and that
            # copy from pageable memory waits for the GPU to drain (once per image)
            inputs = [x.flip(0) if x.shape[0] == 3 else x for x in inputs]
        inputs = [x.float() for x in inputs]
        if self._normalize:
            inputs = [(x - self.mean) / self.std for x in inputs]

        if training:
            if samples is None:
                raise ValueError("training needs data_samples with the ground truth")
            if self.size is None and self.size_divisor is None:
                raise ValueError(
                    "MultiTaskDataPreprocessor needs size=(H, W) or size_divisor=n to pad "
                    "training batches"
                )
            size, divisor = self.size, self.size_divisor
        else:
            size, divisor = self.test_cfg.get("size"), self.test_cfg.get("size_divisor")

        sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in inputs]
        pad_h, pad_w = _padded_hw(sizes, size, divisor)
        padded = []
        for i, x in enumerate(inputs):
            h, w = sizes[i]
            padding = (0, pad_w - w, 0, pad_h - h)  # (left, right, top, bottom)
            padded.append(F.pad(x, padding, value=self.pad_val))
            if samples is None:
                continue
            sample = samples[i]
            if training:
                self._pad_ground_truth(sample, (h, w), padding)
            sample.set_metainfo(
                dict(img_shape=(h, w), pad_shape=(pad_h, pad_w), padding_size=padding)
            )
        return dict(inputs=torch.stack(padded, 0), data_samples=samples)

    @staticmethod
    def _pad_ground_truth(sample, img_hw: tuple[int, int], padding: tuple[int, ...]) -> None:
        """Pad each task map of ``sample`` in place with its task's pad value."""
        for spec in TASK_SPECS.values():
            if spec.gt_field not in sample:
                continue
            pixel_data = sample.get(spec.gt_field)
            gt = pixel_data.data
            if tuple(gt.shape[-2:]) != img_hw:
                raise ValueError(
                    f"{spec.gt_field} of {sample.metainfo.get('img_path')!r} has size "
                    f"{tuple(gt.shape[-2:])} but its image has size {img_hw}"
                )
            del pixel_data.data
            pixel_data.data = F.pad(gt, padding, value=spec.pad_value)
