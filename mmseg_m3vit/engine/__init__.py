"""Training / evaluation machinery: hooks, CPU-capable DDP, pre-flight config checks."""

from .distributed import CPUAwareDistributedDataParallel, init_cpu_distributed
from .hooks import NonFiniteLossError, NonFiniteLossHook
from .loops import AmpTestLoop
from .preflight import (
    check_config_tasks,
    check_data_roots,
    check_pretrained,
    config_tasks,
    resolve_data_root,
    restrict_to_tasks,
)
from .visualization import (
    MultiTaskVisualizationHook,
    colorize,
    format_metric_table,
    prediction_panel,
)

__all__ = [
    "AmpTestLoop",
    "CPUAwareDistributedDataParallel",
    "MultiTaskVisualizationHook",
    "NonFiniteLossError",
    "NonFiniteLossHook",
    "check_config_tasks",
    "check_data_roots",
    "check_pretrained",
    "colorize",
    "config_tasks",
    "format_metric_table",
    "init_cpu_distributed",
    "prediction_panel",
    "resolve_data_root",
    "restrict_to_tasks",
]
