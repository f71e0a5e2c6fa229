"""NYUD-v2 in the multi-task layout of the MTL literature (NYUD_MT).

Layout under ``data_root``::

    images/<id>.jpg
    segmentation/<id>.png   0 = void, 1..40 = NYUv2-40 classes (-> 0..39, void -> 255)
    depth/<id>.npy          float (H, W), metres, 0 = invalid
    normals/<id>.npy        float (H, W, 3) in [-1, 1], camera frame (x right, y up,
                            z towards the camera); all-zero = invalid
    edge/<id>.npy           binary (H, W)
    gt_sets/train.txt, gt_sets/val.txt   one id per line (795 / 654 ids)

``tools/dataset_converters/make_synthetic_nyud.py`` renders data in this layout.
"""

from __future__ import annotations

import numpy as np
from mmseg.registry import DATASETS

from .base_mt import BaseMultiTaskDataset

#: NYUv2 40-class names; index i is label i (= file value i + 1).
NYUD40_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
    "bookshelf", "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser",
    "pillow", "mirror", "floor mat", "clothes", "ceiling", "books", "refridgerator",
    "television", "paper", "towel", "shower curtain", "box", "whiteboard", "person",
    "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure",
    "otherfurniture", "otherprop",
)  # fmt: skip


def _palette(n: int, seed: int) -> list[list[int]]:
    """A fixed random colour per class (for visualisation)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3)).tolist()


@DATASETS.register_module()
class NYUDMTDataset(BaseMultiTaskDataset):
    """NYUD-MT (tasks: semseg, depth, normals, edge). Arguments: see
    :class:`~mmseg_m3vit.datasets.base_mt.BaseMultiTaskDataset`.

    Example::

        dict(type='NYUDMTDataset', data_root='data/nyud', split='train',
             tasks=['semseg', 'depth'], holdout=dict(fraction=0.1, seed=0, part='train'),
             pipeline=train_pipeline)
    """

    METAINFO = dict(
        dataset="nyud", classes=NYUD40_CLASSES, palette=_palette(len(NYUD40_CLASSES), 40)
    )
    DATASET = "nyud"
    IMG_DIR = "images"
    IMG_SUFFIX = ".jpg"
    TASK_FILES = {
        "semseg": ("segmentation", ".png"),
        "depth": ("depth", ".npy"),
        "normals": ("normals", ".npy"),
        "edge": ("edge", ".npy"),
    }
    SPLIT_FILES = {"train": "gt_sets/train.txt", "val": "gt_sets/val.txt"}
