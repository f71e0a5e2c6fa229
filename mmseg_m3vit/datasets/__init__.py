"""Data sets and transforms: importing this registers them in mmseg's registries."""

from . import transforms  # noqa: F401
from .nyud_mt import NYUDMTDataset
from .pascal_mt import PascalMTDataset
from .random_mt import RandomMultiTaskDataset

__all__ = ["NYUDMTDataset", "PascalMTDataset", "RandomMultiTaskDataset"]
