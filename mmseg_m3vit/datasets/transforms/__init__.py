"""Multi-task transforms, registered in mmseg's TRANSFORMS on import (see docs/design.md)."""

from .formatting import PackMultiTaskInputs
from .loading import LoadImageFromFile, LoadMultiTaskAnnotations
from .transforms import (
    MultiTaskRandomFlip,
    MultiTaskRandomRotate,
    flip_normals,
    rotate_normal_vectors,
)

__all__ = [
    "LoadImageFromFile",
    "LoadMultiTaskAnnotations",
    "MultiTaskRandomFlip",
    "MultiTaskRandomRotate",
    "PackMultiTaskInputs",
    "flip_normals",
    "rotate_normal_vectors",
]
