"""PASCAL-Context in the multi-task layout of the MTL literature (PASCAL_MT).

Layout under ``data_root``::

    JPEGImages/<id>.jpg
    ImageSets/Context/train.txt, val.txt          one id per line (4998 / 5105 ids)
    semseg/pascal-context/<id>.png                21-class VOC ids, 0 = background, 255 ignore
    human_parts/<id>.mat                          PASCAL-Part 'anno' struct (person parts
                                                  -> 7 classes, see loading.PASCAL_PART_TO_ID)
    normals_distill/<id>.png                      RGB, n = 2 * v / 255 - 1
    sal_distill/<id>.png                          grey, salient where v / 255 > 0.5
    pascal-context/trainval/<id>.mat              'LabelMap'; edges = its seg2bmap

Human parts: images with no ``human_parts/<id>.mat`` (or no person with parts in it) get
an all-255 (ignore) parts map, so they add nothing to the parts loss or mIoU.

Edges are the boundary map of the label map as SEISM's ``seg2bmap`` builds it for
evaluation (the edge metric thins it, as SEISM does); the MTL-literature training loaders
instead thin the Laplacian's non-zero pixels. Distilled normals are used on every pixel
(the literature masks them with a list of PASCAL-Context classes that have meaningful
normals, which is not part of the published layout).
"""

from __future__ import annotations

from mmseg.registry import DATASETS

from .base_mt import BaseMultiTaskDataset

VOC21_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

HUMAN_PARTS_CLASSES = (
    "background", "head", "torso", "upper arm", "lower arm", "upper leg", "lower leg",
)  # fmt: skip


@DATASETS.register_module()
class PascalMTDataset(BaseMultiTaskDataset):
    """PASCAL-MT (tasks: semseg, parts, sal, normals, edge). Arguments: see
    :class:`~mmseg_m3vit.datasets.base_mt.BaseMultiTaskDataset`."""

    METAINFO = dict(
        dataset="pascal",
        classes=VOC21_CLASSES,
        parts_classes=HUMAN_PARTS_CLASSES,
    )
    DATASET = "pascal"
    IMG_DIR = "JPEGImages"
    IMG_SUFFIX = ".jpg"
    TASK_FILES = {
        "semseg": ("semseg/pascal-context", ".png"),
        "parts": ("human_parts", ".mat"),
        "sal": ("sal_distill", ".png"),
        "normals": ("normals_distill", ".png"),
        "edge": ("pascal-context/trainval", ".mat"),
    }
    SPLIT_FILES = {"train": "ImageSets/Context/train.txt", "val": "ImageSets/Context/val.txt"}
    OPTIONAL_TASKS = frozenset({"parts"})
