"""Helpers of the command-line tools: shared flags and config loading, pre-flight config
checks, routing statistics, colour maps and prediction panels. Nothing here is
registered; the runtime parts (hooks, loops, the DDP wrapper) live in ``engine``."""

from .cli import (
    HelpFormatter,
    add_runner_args,
    build_runner,
    dist_backend,
    format_metric_table,
    load_config,
    parse_runner_args,
    preflight_errors,
)
from .preflight import (
    check_config_tasks,
    check_data_roots,
    check_pretrained,
    config_tasks,
    resolve_data_root,
    restrict_to_tasks,
)

__all__ = [
    "HelpFormatter",
    "add_runner_args",
    "build_runner",
    "check_config_tasks",
    "check_data_roots",
    "check_pretrained",
    "config_tasks",
    "dist_backend",
    "format_metric_table",
    "load_config",
    "parse_runner_args",
    "preflight_errors",
    "resolve_data_root",
    "restrict_to_tasks",
]
