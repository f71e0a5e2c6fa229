"""Compatibility shims for the pinned stack (mmcv-lite, torch >= 2.6); see each module."""

from .checkpoint import install as install_checkpoint_loader
from .checkpoint import load_local_checkpoint
from .mmcv_ops import install as install_mmcv_ops_fallback

__all__ = ["install_checkpoint_loader", "install_mmcv_ops_fallback", "load_local_checkpoint"]
