"""Runner hooks (registered in ``mmseg.registry.HOOKS``)."""

from .non_finite_loss_hook import NonFiniteLossError, NonFiniteLossHook
from .progress_bar_hook import ProgressBarHook
from .visualization_hook import MultiTaskVisualizationHook

__all__ = [
    "MultiTaskVisualizationHook",
    "NonFiniteLossError",
    "NonFiniteLossHook",
    "ProgressBarHook",
]
