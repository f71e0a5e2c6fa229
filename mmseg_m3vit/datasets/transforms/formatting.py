"""Pack a multi-task sample into ``inputs`` + ``SegDataSample`` (one field per task)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from mmcv.transforms import BaseTransform
from mmengine.structures import PixelData
from mmseg.registry import TRANSFORMS
from mmseg.structures import SegDataSample

from mmseg_m3vit.tasks import TASK_SPECS

DEFAULT_META_KEYS = (
    "img_path",
    "sample_id",
    "dataset",
    "ori_shape",
    "img_shape",
    "pad_shape",
    "scale_factor",
    "flip",
    "flip_direction",
)


@TRANSFORMS.register_module()
class PackMultiTaskInputs(BaseTransform):
    """Pack the image and every task map present in ``results``.

    Output:
        ``inputs``: uint8 tensor (3, H, W) (channel order as loaded, BGR by default).
        ``data_samples``: ``SegDataSample`` with, for each task of the task table whose
        ``results_key`` is in ``results``, a ``PixelData`` under ``TaskSpec.gt_field``
        with ``data`` of shape (C, H, W): int64 for label maps (semseg, parts, edge,
        sal), float32 for depth (metres) and normals (C = 3). Meta information: the
        ``meta_keys`` found in ``results`` plus ``tasks`` (the tasks packed).

    Args:
        meta_keys: keys copied from ``results`` into the sample's metainfo.
    """

    def __init__(self, meta_keys: Sequence[str] = DEFAULT_META_KEYS) -> None:
        super().__init__()
        self.meta_keys = tuple(meta_keys)

    def transform(self, results: dict) -> dict:
        packed: dict = {}
        if "img" in results:
            img = results["img"]
            if img.ndim == 2:
                img = img[:, :, None]
            packed["inputs"] = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        sample = SegDataSample()
        tasks = []
        for spec in TASK_SPECS.values():
            gt = results.get(spec.results_key)
            if gt is None:
                continue
            if spec.map_channels == 1:
                if gt.ndim != 2:
                    raise ValueError(
                        f"{spec.name} map {spec.results_key!r} of {results.get('img_path')!r} "
                        f"should be (H, W), got {gt.shape}"
                    )
                arr = gt[None]
            else:
                if gt.ndim != 3 or gt.shape[2] != spec.map_channels:
                    raise ValueError(
                        f"{spec.name} map {spec.results_key!r} of {results.get('img_path')!r} "
                        f"should be (H, W, {spec.map_channels}), got {gt.shape}"
                    )
                arr = gt.transpose(2, 0, 1)
            dtype = np.int64 if spec.is_label else np.float32
            data = torch.from_numpy(np.ascontiguousarray(arr, dtype=dtype))
            sample.set_field(PixelData(data=data), spec.gt_field)
            tasks.append(spec.name)
        meta = {k: results[k] for k in self.meta_keys if k in results}
        meta["tasks"] = tasks
        sample.set_metainfo(meta)
        packed["data_samples"] = sample
        return packed

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(meta_keys={self.meta_keys})"
