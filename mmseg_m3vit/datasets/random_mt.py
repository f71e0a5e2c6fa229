"""Random multi-task samples held in memory, for throughput runs (no files, no decoding).

:func:`random_batch` draws NYUD-like samples already in the form the data loader
collates (``PackMultiTaskInputs`` output): image uint8 (3, H, W), semseg ids in [0, 40),
depth in [0.5, 10) m, unit normals, binary edges. :class:`RandomMultiTaskDataset`
(registered in mmseg's DATASETS) cycles over a small pool of such samples, so that a
training run measures the model, not the loader. The values mean nothing; for
learnable synthetic scenes see :mod:`.synthetic_nyud`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from mmseg.registry import DATASETS
from torch.utils.data import Dataset

from .transforms.formatting import PackMultiTaskInputs

RANDOM_TASKS = ("semseg", "depth", "normals", "edge")


def random_batch(num: int, size: Sequence[int], tasks: Sequence[str], seed: int) -> dict:
    """``num`` random samples of ``size`` (H, W) with ground truth for ``tasks`` (a subset
    of :data:`RANDOM_TASKS`); returns ``{'inputs': [...], 'data_samples': [...]}``."""
    unknown = [t for t in tasks if t not in RANDOM_TASKS]
    if unknown:
        raise ValueError(f"random_batch: no random maps for tasks {unknown}; use {RANDOM_TASKS}")
    rng = np.random.default_rng(seed)
    h, w = (int(s) for s in size)
    pack = PackMultiTaskInputs()
    inputs, samples = [], []
    for i in range(num):
        normals = rng.standard_normal((h, w, 3)).astype(np.float32)
        normals /= np.linalg.norm(normals, axis=2, keepdims=True)
        maps = {
            "semseg": ("gt_seg_map", rng.integers(0, 40, (h, w), dtype=np.uint8)),
            "depth": ("gt_depth_map", rng.uniform(0.5, 10.0, (h, w)).astype(np.float32)),
            "normals": ("gt_normal_map", normals),
            "edge": ("gt_edge_map", (rng.random((h, w)) < 0.1).astype(np.uint8)),
        }
        results = {
            "img": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            "img_path": f"random_{seed}_{i}.jpg",
            "ori_shape": (h, w),
            "img_shape": (h, w),
            "scale_factor": (1.0, 1.0),
            "flip": False,
            "flip_direction": None,
        }
        results.update({maps[t][0]: maps[t][1] for t in tasks})
        packed = pack(results)
        inputs.append(packed["inputs"])
        samples.append(packed["data_samples"])
    return {"inputs": inputs, "data_samples": samples}


@DATASETS.register_module()
class RandomMultiTaskDataset(Dataset):
    """``length`` items cycling over ``pool`` samples of :func:`random_batch`.

    Args:
        length: items per epoch.
        pool: distinct samples drawn once.
        size: (H, W).
        tasks: tasks with ground truth (subset of :data:`RANDOM_TASKS`).
        seed: of the pool.
    """

    def __init__(
        self,
        length: int = 10000,
        pool: int = 16,
        size: Sequence[int] = (480, 640),
        tasks: Sequence[str] = RANDOM_TASKS,
        seed: int = 0,
    ) -> None:
        batch = random_batch(pool, size, list(tasks), seed)
        self.items = list(zip(batch["inputs"], batch["data_samples"], strict=True))
        self.length = length
        self.metainfo = {"tasks": list(tasks)}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int) -> dict:
        inputs, sample = self.items[idx % len(self.items)]
        return {"inputs": inputs, "data_samples": sample.clone()}
