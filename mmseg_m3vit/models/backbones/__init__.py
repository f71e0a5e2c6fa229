"""Backbones (registered in mmseg's MODELS on import)."""

from .m3vit import M3ViT, M3ViTOutput, resize_pos_embed

__all__ = ["M3ViT", "M3ViTOutput", "resize_pos_embed"]
