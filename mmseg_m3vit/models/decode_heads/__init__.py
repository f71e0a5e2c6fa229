"""Decode heads (registered in mmseg's MODELS on import)."""

from .pup_head import PUPHead, default_output_kind

__all__ = ["PUPHead", "default_output_kind"]
