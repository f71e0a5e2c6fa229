"""The test-time hook that saves one image | prediction | ground-truth panel per image."""

from __future__ import annotations

import os.path as osp
from collections.abc import Sequence
from typing import Any

from mmengine.hooks import Hook
from mmseg.registry import HOOKS

from ...utils.visualization import prediction_panel, sample_maps, save_png


@HOOKS.register_module()
class MultiTaskVisualizationHook(Hook):
    """Save ``image | predictions / ground truth`` panels of every task during testing.

    A multi-task replacement of mmseg's ``SegVisualizationHook`` (which draws only
    ``pred_sem_seg``); ``tools/test.py --show-dir DIR`` turns it on.

    Args:
        draw: save panels at all (off by default, as mmseg's hook).
        interval: save every ``interval``-th test batch.
        out_dir: folder of the PNGs (relative paths go under the runner's work dir).
        max_images: stop after this many panels (None: all).
    """

    priority = "NORMAL"

    def __init__(
        self,
        draw: bool = False,
        interval: int = 1,
        out_dir: str = "vis",
        max_images: int | None = None,
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.draw, self.interval, self.out_dir = draw, interval, out_dir
        self.max_images = max_images
        self._saved = 0

    def after_test_iter(
        self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Sequence = ()
    ) -> None:
        """Render and save the panels of this batch."""
        if not self.draw or batch_idx % self.interval:
            return
        import mmcv

        out_dir = self.out_dir
        if not osp.isabs(out_dir):
            out_dir = osp.join(runner.work_dir, out_dir)
        meta = getattr(runner.test_dataloader.dataset, "metainfo", {}) or {}
        class_names = {"semseg": meta.get("classes"), "parts": meta.get("parts_classes")}
        for sample in outputs:
            if self.max_images is not None and self._saved >= self.max_images:
                return
            img_path = sample.metainfo.get("img_path")
            if img_path is None:
                continue
            img = mmcv.imread(img_path, channel_order="rgb")
            preds, gts = sample_maps(sample)
            name = osp.splitext(osp.basename(img_path))[0]
            panel = prediction_panel(img, preds, gts, title=name, class_names=class_names)
            save_png(osp.join(out_dir, f"{name}.png"), panel)
            self._saved += 1
