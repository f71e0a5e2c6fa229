"""Single-task and all-task inference time per image of trained multi-task models.

Usage::

    python tools/analysis_tools/inference_speed.py --work-dirs DIR [DIR ...]
        [--batch 1 16] [--reps 30] [--warmup 10] [--no-amp] [--device cuda|cpu]
        [--trust-checkpoint]
    python tools/analysis_tools/inference_speed.py --config CONFIG [--checkpoint CKPT]
        [--json OUT] ...

For every model: ``model._forward(x, tasks=[t])`` (the single-task pathway: only task t's
routers and head run) for each task, and ``model._forward(x, tasks=all)`` (what
``predict`` runs for every task), on the first images of the config's test split
(random images with ``--random-input``), at each batch size. A work directory is read
as written by ``tools/train.py``: its config dump (``<work_dir>/<name>.py``) and its best
checkpoint (``best_*.pth``, else the newest ``iter_*.pth``); the result goes to
``<work_dir>/inference_speed.json``. Models are timed one after the other in one
process, so nothing else of this tool shares the device with the model being timed.

Timing: CUDA events around each repetition after warm-up, synchronised between
repetitions (host launch overhead included: it is part of what a user waits for),
median over repetitions; ``time.perf_counter`` on CPU (numbers there only exercise the
code). Output, in milliseconds per image (= batch time / batch size)::

    {"device": ..., "dtype": "bfloat16" | "float32", "shape": [H, W], "reps": R,
     "tasks": [...], "ms_per_image": {"1": {"semseg": ..., "depth": ..., "all": ...},
                                      "16": {...}}}
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import os.path as osp
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import mmseg_m3vit  # noqa: E402, F401  (registers the plugin)
from mmseg_m3vit.utils.cli import HelpFormatter, add_trust_arg  # noqa: E402

RESULT_FILE = "inference_speed.json"


def work_dir_config(work_dir: str) -> str:
    """The config dump ``tools/train.py`` wrote into ``work_dir`` (the one ``*.py`` file).

    Raises:
        FileNotFoundError: no or several ``.py`` files at the top of ``work_dir``.
    """
    found = sorted(glob.glob(osp.join(work_dir, "*.py")))
    if len(found) != 1:
        raise FileNotFoundError(
            f"work dir {work_dir!r}: expected exactly one config dump (*.py) at its top, "
            f"found {[osp.basename(f) for f in found]}"
        )
    return found[0]


def work_dir_checkpoint(work_dir: str) -> str:
    """The best checkpoint (``best_*.pth``) of ``work_dir``, else its newest ``iter_N.pth``.

    Raises:
        FileNotFoundError: ``work_dir`` holds no checkpoint.
    """
    best = sorted(glob.glob(osp.join(work_dir, "best_*.pth")))
    if best:
        return best[-1]
    iters = glob.glob(osp.join(work_dir, "iter_*.pth"))
    if not iters:
        raise FileNotFoundError(f"work dir {work_dir!r} holds no best_*.pth or iter_*.pth")
    return max(iters, key=lambda p: int(re.findall(r"iter_(\d+)\.pth$", p)[0]))


def time_ms(fn: Callable[[], object], device: str, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` synchronised runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _build(config: str, checkpoint: str | None, device: str, trust: bool = False):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    from mmseg_m3vit.compat import load_model_checkpoint, trusted_checkpoints

    cfg = Config.fromfile(config)
    init_default_scope(cfg.get("default_scope", "mmseg"))
    model_cfg = cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model)
    model_cfg["backbone"]["pretrained"] = None
    model = MODELS.build(model_cfg)
    if checkpoint is not None:
        with trusted_checkpoints(trust):
            load_model_checkpoint(model, checkpoint)
    return cfg, model.to(device).eval()


def _inputs(cfg, model, n: int, random_input: bool, device: str) -> torch.Tensor:
    """(n, 3, H, W) preprocessed images: the test split's first ``n``, or random."""
    if random_input:
        h, w = model.backbone.img_size
        gen = torch.Generator().manual_seed(0)
        return torch.randn(n, 3, h, w, generator=gen).to(device)
    from mmengine.runner import Runner

    loader_cfg = cfg.test_dataloader.copy()
    loader_cfg.update(batch_size=n, num_workers=0, persistent_workers=False)
    batch = next(iter(Runner.build_dataloader(loader_cfg)))
    inputs = model.data_preprocessor(batch, False)["inputs"]
    if inputs.shape[0] < n:
        raise ValueError(f"the test split has {inputs.shape[0]} images, fewer than batch {n}")
    return inputs.to(device)


def measure(
    config: str,
    checkpoint: str | None,
    batch_sizes: Sequence[int] = (1, 16),
    device: str = "cuda",
    amp: bool = True,
    warmup: int = 10,
    reps: int = 30,
    random_input: bool = False,
    trust: bool = False,
) -> dict:
    """Time the model of ``config`` (weights from ``checkpoint``; random when None;
    ``trust``: unpickle it without the safe allow-list).

    Returns the JSON payload described in the module docstring.
    """
    cfg, model = _build(config, checkpoint, device, trust)
    tasks = list(model.tasks)
    x_all = _inputs(cfg, model, max(batch_sizes), random_input, device)
    use_amp = amp and device.startswith("cuda")
    ctx = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if use_amp
        else contextlib.nullcontext
    )
    result: dict[str, dict[str, float]] = {}
    for b in batch_sizes:
        x = x_all[:b]
        row = {}
        for name, run_tasks in [(t, [t]) for t in tasks] + [("all", tasks)]:

            @torch.no_grad()
            def fn(x=x, run_tasks=run_tasks) -> None:
                with ctx():
                    model._forward(x, tasks=run_tasks)

            row[name] = time_ms(fn, device, warmup, reps) / b
        result[str(b)] = row
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    return {
        "config": osp.basename(config),
        "checkpoint": osp.basename(checkpoint) if checkpoint else None,
        "device": name,
        "torch": torch.__version__,
        "dtype": "bfloat16" if use_amp else "float32",
        "shape": list(x_all.shape[-2:]),
        "input": "random" if random_input else "test split",
        "warmup": warmup,
        "reps": reps,
        "tasks": tasks,
        "ms_per_image": result,
    }


def write_json(payload: dict, path: str) -> None:
    """Write ``payload`` to ``path`` atomically (temp file in the same folder, rename)."""
    d = osp.dirname(osp.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the tool."""
    p = argparse.ArgumentParser(
        description="Inference ms/image per task of trained models", formatter_class=HelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--work-dirs", nargs="+", help="training work directories")
    src.add_argument("--config", help="a config file (with --checkpoint, or random weights)")
    p.add_argument("--checkpoint", help="checkpoint for --config")
    p.add_argument("--json", help="output file for --config (default: print only)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-amp", action="store_true", help="float32 instead of bf16 autocast")
    p.add_argument("--random-input", action="store_true", help="random images, no data set")
    add_trust_arg(p)
    args = p.parse_args(argv)
    if any(b < 1 for b in args.batch):
        p.error(f"--batch sizes must be >= 1, got {args.batch}")
    if args.reps < 1 or args.warmup < 0:
        p.error(f"need --reps >= 1 and --warmup >= 0, got {args.reps}, {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Time every model given; returns the payloads."""
    args = parse_args(argv)
    jobs: list[tuple[str, str | None, str | None]] = []
    if args.work_dirs:
        for wd in args.work_dirs:
            jobs.append((work_dir_config(wd), work_dir_checkpoint(wd), osp.join(wd, RESULT_FILE)))
    else:
        if not osp.isfile(args.config):
            raise FileNotFoundError(f"config {args.config!r} does not exist")
        if args.checkpoint is not None and not osp.isfile(args.checkpoint):
            raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist")
        jobs.append((args.config, args.checkpoint, args.json))
    payloads = []
    for config, ckpt, out in jobs:
        payload = measure(
            config,
            ckpt,
            args.batch,
            args.device,
            amp=not args.no_amp,
            warmup=args.warmup,
            reps=args.reps,
            random_input=args.random_input,
            trust=args.trust_checkpoint,
        )
        rows = ", ".join(
            f"b{b}: " + " ".join(f"{k} {v:.3f}" for k, v in row.items())
            for b, row in payload["ms_per_image"].items()
        )
        print(f"{payload['config']} ({payload['device']}, ms/image) {rows}", flush=True)
        if out:
            write_json(payload, out)
        payloads.append(payload)
    return payloads


if __name__ == "__main__":
    main()
