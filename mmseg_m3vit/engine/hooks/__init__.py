"""Training hooks (registered in ``mmseg.registry.HOOKS``)."""

from .checkpoint_guard_hook import (
    CheckpointGuardHook,
    NonFiniteCheckpointError,
    last_verified_checkpoint,
)
from .non_finite_loss_hook import NonFiniteLossError, NonFiniteLossHook

__all__ = [
    "CheckpointGuardHook",
    "NonFiniteCheckpointError",
    "NonFiniteLossError",
    "NonFiniteLossHook",
    "last_verified_checkpoint",
]
