"""Command-line pieces shared by ``tools/train.py`` and ``tools/test.py``."""

from __future__ import annotations

import argparse
import os
import os.path as osp

from mmengine.config import Config, DictAction


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
    parser.add_argument("--work-dir", help="directory for logs (and checkpoints when training)")
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        action=DictAction,
        help=f"override config settings, e.g. {cfg_options_example}",
    )
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    add_trust_arg(parser)


def parse_runner_args(
    parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> argparse.Namespace:
    """Parse ``argv`` and export ``LOCAL_RANK`` (torch.distributed.launch style) if unset."""
    args = parser.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


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


def dist_backend(cfg: Config) -> str:
    """The process-group backend for CPU runs: the config's, with NCCL replaced by gloo."""
    backend = cfg.get("env_cfg", {}).get("dist_cfg", {}).get("backend", "nccl")
    return "gloo" if backend == "nccl" else backend
