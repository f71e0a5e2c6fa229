"""Registered runtime parts: the runner, hooks, the bf16 test loop, the CPU-capable DDP
wrapper."""

from .distributed import CPUAwareDistributedDataParallel, init_cpu_distributed
from .hooks import (
    MultiTaskVisualizationHook,
    NonFiniteLossError,
    NonFiniteLossHook,
    ProgressBarHook,
)
from .loops import BF16_OPTIM_WRAPPER, AmpTestLoop
from .runner import M3ViTRunner

__all__ = [
    "BF16_OPTIM_WRAPPER",
    "AmpTestLoop",
    "CPUAwareDistributedDataParallel",
    "M3ViTRunner",
    "MultiTaskVisualizationHook",
    "NonFiniteLossError",
    "NonFiniteLossHook",
    "ProgressBarHook",
    "init_cpu_distributed",
]
