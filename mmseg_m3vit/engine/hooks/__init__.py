"""Runner hooks (registered in ``mmseg.registry.HOOKS``)."""

from .checkpoint_guard_hook import (
    CheckpointGuardHook,
    NonFiniteCheckpointError,
    last_verified_checkpoint,
)
from .non_finite_loss_hook import NonFiniteLossError, NonFiniteLossHook
from .progress_bar_hook import ProgressBarHook
from .visualization_hook import MultiTaskVisualizationHook

__all__ = [
    "CheckpointGuardHook",
    "MultiTaskVisualizationHook",
    "NonFiniteCheckpointError",
    "NonFiniteLossError",
    "NonFiniteLossHook",
    "ProgressBarHook",
    "last_verified_checkpoint",
]
