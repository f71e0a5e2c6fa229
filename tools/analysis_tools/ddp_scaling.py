"""Data-parallel scaling of the 4-task NYUD training on one host.

    python tools/analysis_tools/ddp_scaling.py --gpus 1 2 [--iters 80]

Writes a throughput config into the work root (the 4-task NYUD config with
:class:`~mmseg_m3vit.datasets.RandomMultiTaskDataset` in memory, no validation or
checkpoints) and, for each GPU count N, runs ``bash tools/dist_train.sh CONFIG N``
(torchrun + mmengine DDP, 8 images per GPU, bf16 autocast, 480x640), reads the
per-iteration ``time`` that mmengine logs in ``vis_data/scalars.json`` (mean over each
10-iteration window), drops the first two windows (warm-up), and prints
images/s = N x 8 / median time and the scaling
efficiency images/s(N) / (N x images/s(1)) as a markdown table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import time

HERE = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(osp.dirname(HERE))
BASE_CONFIG = osp.join(
    ROOT, "configs", "m3vit", "m3vit_vit-s16-moe16-top4-mg_2xb8-5k_nyud-480x640.py"
)
PER_GPU_BATCH = 8
THROUGHPUT_CONFIG = """\
# Throughput config written by tools/analysis_tools/ddp_scaling.py: the 4-task NYUD
# M3ViT on in-memory random data, no validation or checkpoints.
_base_ = [{base!r}]
model = dict(backbone=dict(pretrained=None))
train_dataloader = dict(
    batch_size={batch},
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(_delete_=True, type="RandomMultiTaskDataset", pool=16, size=(480, 640)),
)
max_iters = 80
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=10**9)
param_scheduler = [dict(type="PolyLR", power=0.9, begin=0, end=max_iters, by_epoch=False)]
val_dataloader = None
val_evaluator = None
val_cfg = None
test_dataloader = None
test_evaluator = None
test_cfg = None
default_hooks = dict(
    logger=dict(type="LoggerHook", interval=10, log_metric_by_epoch=False),
    checkpoint=dict(type="CheckpointHook", interval=10**9, save_best=None, save_last=False),
    visualization=dict(type="MultiTaskVisualizationHook", draw=False),
)
"""


def write_config(work_root: str) -> str:
    """Write the throughput config into ``work_root``; returns its path."""
    os.makedirs(work_root, exist_ok=True)
    path = osp.join(work_root, "ddp_random_nyud.py")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(THROUGHPUT_CONFIG.format(base=BASE_CONFIG, batch=PER_GPU_BATCH))
    os.replace(tmp, path)
    return path


def run(config: str, n: int, iters: int, work_root: str) -> list[float]:
    """Train on ``n`` GPUs; return the logged seconds per iteration, warm-up dropped."""
    work_dir = osp.join(work_root, f"ddp_{n}gpu")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    env["PYTHON"] = sys.executable
    env["PORT"] = str(29500 + n)
    cmd = [
        "bash",
        osp.join(ROOT, "tools", "dist_train.sh"),
        config,
        str(n),
        "--work-dir",
        work_dir,
        "--cfg-options",
        f"train_cfg.max_iters={iters}",
        "optim_wrapper.type=AmpOptimWrapper",
        "optim_wrapper.dtype=bfloat16",
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    print(f"{n} GPU(s): exit {proc.returncode} after {time.time() - t0:.0f} s", flush=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n")
        raise SystemExit(f"dist_train.sh failed on {n} GPU(s)")
    scalars = sorted(glob.glob(osp.join(work_dir, "*", "vis_data", "scalars.json")))[-1]
    with open(scalars) as f:
        times = [json.loads(line)["time"] for line in f if '"time"' in line]
    return times[2:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    p.add_argument("--iters", type=int, default=80)
    p.add_argument("--work-root", default="work_dirs/ddp_scaling")
    args = p.parse_args()
    config = write_config(args.work_root)
    results = {n: statistics.median(run(config, n, args.iters, args.work_root)) for n in args.gpus}
    base = PER_GPU_BATCH / results[args.gpus[0]] / args.gpus[0]
    rows = []
    for n, sec in results.items():
        ips = n * PER_GPU_BATCH / sec
        rows.append(
            f"| {n} | {n * PER_GPU_BATCH} | {sec * 1e3:.1f} | {ips:.1f} | {ips / (n * base):.1%} |"
        )
    print(
        "\n**DDP scaling, 4-task NYUD M3ViT, 480x640, 8 images/GPU, bf16 autocast, "
        "default MoE dispatch, task-batched, random in-memory data (tools/dist_train.sh)**\n\n"
        "| GPUs | global batch | ms/iter (median) | images/s | scaling efficiency |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows)
    )


if __name__ == "__main__":
    main()
