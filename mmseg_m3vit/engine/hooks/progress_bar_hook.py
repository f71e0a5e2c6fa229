"""A progress bar with the images done, the rate and the ETA while a model is tested."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from mmengine.dist import get_world_size, is_main_process
from mmengine.hooks import Hook
from mmengine.utils import ProgressBar
from mmseg.registry import HOOKS


@HOOKS.register_module()
class ProgressBarHook(Hook):
    """Draw ``[>>>>   ] 120/654, 3.1 task/s, elapsed: 39s, ETA:   172s`` over the test set.

    ``tools/test.py`` adds it and silences the logger's per-batch test lines (the bar
    replaces them). Only the main process draws; with several processes each step counts
    the batch of every process.
    """

    priority = "LOW"

    def __init__(self) -> None:
        self._bar: ProgressBar | None = None

    def before_test_epoch(self, runner: Any) -> None:
        """Start the bar at 0 of the test set's images."""
        if is_main_process():
            self._bar = ProgressBar(len(runner.test_dataloader.dataset), file=sys.stdout)

    def after_test_iter(
        self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Sequence = ()
    ) -> None:
        """Advance by the images of this step (all processes)."""
        if self._bar is not None:
            done = self._bar.completed + len(outputs) * get_world_size()
            self._bar.update(min(done, self._bar.task_num) - self._bar.completed)

    def after_test_epoch(self, runner: Any, metrics: dict | None = None) -> None:
        """End the bar's line before the metrics are logged."""
        if self._bar is not None:
            self._bar.file.write("\n")
            self._bar.file.flush()
            self._bar = None
