"""Segmentors (registered in mmseg's MODELS on import)."""

from .multitask import MultiTaskSegmentor, model_head_configs, task_head_configs

__all__ = ["MultiTaskSegmentor", "model_head_configs", "task_head_configs"]
