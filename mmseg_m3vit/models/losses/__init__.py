"""Dense per-task losses (registered in mmseg's MODELS on import)."""

from .dense_losses import (
    BalancedBCELoss,
    DepthL1Loss,
    LabelCheck,
    NormalsL1Loss,
    PixelCrossEntropyLoss,
    raise_label_errors,
)

__all__ = [
    "BalancedBCELoss",
    "DepthL1Loss",
    "LabelCheck",
    "NormalsL1Loss",
    "PixelCrossEntropyLoss",
    "raise_label_errors",
]
