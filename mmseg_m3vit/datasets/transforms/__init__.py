"""Multi-task transforms, registered in mmseg's TRANSFORMS on import (see docs/design.md)."""

from .formatting import PackMultiTaskInputs
from .loading import LoadMultiTaskAnnotations
from .transforms import MultiTaskRandomFlip, flip_normals

__all__ = [
    "LoadMultiTaskAnnotations",
    "MultiTaskRandomFlip",
    "PackMultiTaskInputs",
    "flip_normals",
]
