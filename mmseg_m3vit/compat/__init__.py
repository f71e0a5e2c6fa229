"""Compatibility shims for the pinned stack (mmcv-lite, torch >= 2.6); see each module."""

from .checkpoint import (
    CheckpointMismatchError,
    UntrustedCheckpointError,
    load_checkpoint_file,
    load_model_checkpoint,
    trusted_checkpoints,
)
from .checkpoint import install as install_checkpoint_loader
from .mmcv_ops import install as install_mmcv_ops_fallback

__all__ = [
    "CheckpointMismatchError",
    "UntrustedCheckpointError",
    "install_checkpoint_loader",
    "install_mmcv_ops_fallback",
    "load_checkpoint_file",
    "load_model_checkpoint",
    "trusted_checkpoints",
]
