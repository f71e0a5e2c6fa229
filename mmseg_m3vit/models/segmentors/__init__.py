"""Segmentors (registered in mmseg's MODELS on import)."""

from .multitask import MultiTaskSegmentor

__all__ = ["MultiTaskSegmentor"]
