"""Registered runtime parts: hooks, the bf16 test loop, the CPU-capable DDP wrapper."""

from .distributed import CPUAwareDistributedDataParallel, init_cpu_distributed
from .hooks import MultiTaskVisualizationHook, NonFiniteLossError, NonFiniteLossHook
from .loops import AmpTestLoop

__all__ = [
    "AmpTestLoop",
    "CPUAwareDistributedDataParallel",
    "MultiTaskVisualizationHook",
    "NonFiniteLossError",
    "NonFiniteLossHook",
    "init_cpu_distributed",
]
