"""Command-line pieces shared by the tools: mmseg's runner flags, config loading, the
metric table."""

from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
from mmengine.config import Config, DictAction
from mmengine.runner import Runner

from ..tasks import DATASET_TASKS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` shows every default (an option without one says in its help what its
    absence means) and keeps the description's and epilog's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def task_names_help() -> str:
    """The task names a config may hold, per data set of the task table."""
    return "; ".join(f"{name}: {' '.join(tasks)}" for name, tasks in DATASET_TASKS.items())


def add_trust_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--trust-checkpoint``: unpickle checkpoints without the safe allow-list."""
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load checkpoints with unrestricted unpickling (it can run code stored in "
        "the file: only for files you trust); same as M3VIT_TRUST_CHECKPOINT=1",
    )


def add_runner_args(parser: argparse.ArgumentParser, cfg_options_example: str) -> None:
    """Add mmseg's common flags ``--work-dir --cfg-options --launcher --local_rank`` and
    ``--trust-checkpoint``."""
    parser.add_argument(
        "--work-dir",
        help="directory for logs (and checkpoints when training); default: the config's "
        "work_dir, else ./work_dirs/<config name>",
    )
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        action=DictAction,
        help=f"override config settings (key=value ...), e.g. {cfg_options_example}",
    )
    parser.add_argument(
        "--launcher",
        choices=["none", "pytorch", "slurm", "mpi"],
        default="none",
        help="process launcher ('pytorch' under torchrun, as tools/dist_*.sh do)",
    )
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=0, help="set by torch launchers"
    )
    add_trust_arg(parser)


def parse_runner_args(
    parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> argparse.Namespace:
    """Parse ``argv`` and export ``LOCAL_RANK`` (torch.distributed.launch style) if unset."""
    args = parser.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


@contextmanager
def preflight_errors(prog: str) -> Iterator[None]:
    """Pre-flight failures (a bad config key, a missing data root or checkpoint: the
    ``ValueError`` / ``FileNotFoundError`` of the checks) end the tool with one line on
    stderr, ``<prog>: error: <message>``, and exit status 2, as argparse does for a bad
    flag; no traceback. Wrap only the checks, so that errors of the run itself keep theirs.
    """
    try:
        yield
    except (FileNotFoundError, ValueError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def load_config(args: argparse.Namespace) -> Config:
    """Read ``args.config``, apply ``--cfg-options``, the launcher and the work dir.

    The work dir defaults to ``./work_dirs/<config name>`` when neither the command line
    nor the config sets one.

    Raises:
        FileNotFoundError: naming the config path when it is not a file.
    """
    if not osp.isfile(args.config):
        raise FileNotFoundError(f"config file {args.config!r} does not exist")
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir", None) is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
    return cfg


def build_runner(cfg: Config) -> Runner:
    """The config's runner: ``runner_type`` from mmseg's RUNNERS (as mmseg's tools do),
    else mmengine's ``Runner``."""
    if "runner_type" in cfg:
        from mmseg.registry import RUNNERS

        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


def dist_backend(cfg: Config) -> str:
    """The process-group backend for CPU runs: the config's, with NCCL replaced by gloo."""
    backend = cfg.get("env_cfg", {}).get("dist_cfg", {}).get("backend", "nccl")
    return "gloo" if backend == "nccl" else backend


def ensure_custom_hooks(cfg: Config, types: list[str]) -> None:
    """Append ``dict(type=T)`` to ``cfg.custom_hooks`` for each hook type not there yet
    (the plugin's safety hooks stay on when a config replaces ``custom_hooks``)."""
    hooks = list(cfg.get("custom_hooks") or [])
    present = {h.get("type") for h in hooks if isinstance(h, dict)}
    hooks.extend(dict(type=t) for t in types if t not in present)
    cfg.custom_hooks = hooks


def format_metric_table(metrics: Mapping[str, Any], digits: int = 4) -> str:
    """Metrics dict ``{'semseg/mIoU': 41.2, ...}`` -> a plain two-column text table."""
    if not metrics:
        return "(no metrics)"
    width = max(len(k) for k in metrics)
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  {'-' * 10}"]
    for key, value in metrics.items():
        if isinstance(value, float | int | np.floating):
            text = f"{float(value):.{digits}f}"
        else:
            text = str(value)
        lines.append(f"{key.ljust(width)}  {text}")
    return "\n".join(lines)
