"""Dense per-task losses (registered in mmseg's MODELS on import)."""

from .dense_losses import BalancedBCELoss, DepthL1Loss, NormalsL1Loss, PixelCrossEntropyLoss

__all__ = ["BalancedBCELoss", "DepthL1Loss", "NormalsL1Loss", "PixelCrossEntropyLoss"]
