"""Decode heads (registered in mmseg's MODELS on import)."""

from .pup_head import PUPHead, default_output_kind
from .tam import TaskAttentionModule, tam_group_weights

__all__ = ["PUPHead", "TaskAttentionModule", "default_output_kind", "tam_group_weights"]
