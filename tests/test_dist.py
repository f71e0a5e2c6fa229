"""Distributed data parallel on CPU: two gloo processes started by tools/dist_train.sh
(torchrun) end with the same weights as one process with the same global batch.

What makes the two runs exactly comparable (all of it is about the test, not the code):
per-sample-decomposable losses (semseg CE on the synthetic set, which has no void label,
and edge BCE, which has no ignored pixels), GroupNorm heads (BatchNorm statistics depend
on the per-process batch, and SyncBN needs a GPU), no random augmentation (each process
draws its own random numbers), and the MoE balance loss weighted 0 (its cv^2 over a
batch is not a mean over samples). The data sharding (InfiniteSampler) gives process r
the samples r, r+2, ... of the same seeded permutation, so process 0's batch {0, 2} and
process 1's batch {1, 3} together equal the single process's batch {0, 1, 2, 3}, and
DDP's gradient average equals the single process's gradient.
"""

from __future__ import annotations

import os
import os.path as osp
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
ITERS = 3

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: str, data_root: str, batch_size: int, norm: str = "GN") -> str:
    """Tiny 2-task config; ``norm`` 'GN' (CPU-comparable) or 'SyncBN' (needs GPUs)."""
    base = osp.join(ROOT, "configs", "m3vit_synthetic.py")
    norm_cfg = (
        "dict(type='GN', num_groups=4, requires_grad=True)"
        if norm == "GN"
        else f"dict(type={norm!r}, requires_grad=True)"
    )
    text = f"""
    _base_ = [{base!r}]
    tasks = ['semseg', 'edge']
    pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadMultiTaskAnnotations'),
        dict(type='PackMultiTaskInputs'),
    ]
    gn = {norm_cfg}
    model = dict(
        tasks=tasks,
        backbone=dict(img_size=(32, 48), embed_dims=32, num_heads=2, num_experts=4,
                      top_k=2, expert_hidden_dims=16),
        head_template=dict(channels=8, norm_cfg=gn),
        moe_balance_weight=0.0,
    )
    train_dataloader = dict(
        batch_size={batch_size},
        dataset=dict(data_root={data_root!r}, tasks=tasks, pipeline=pipeline),
    )
    test_dataloader = dict(dataset=dict(data_root={data_root!r}, tasks=tasks,
                                        pipeline=pipeline))
    test_evaluator = [dict(type='MultiTaskIoUMetric', task='semseg', num_classes=40)]
    val_dataloader = None
    val_evaluator = None
    val_cfg = None
    param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0,
                            end={ITERS}, by_epoch=False)]
    train_cfg = dict(max_iters={ITERS}, val_interval={ITERS + 100})
    default_hooks = dict(logger=dict(interval=1),
                         checkpoint=dict(interval={ITERS}, save_best=None))
    """
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    return path


def train_single_and_dist(tmp_path, norm: str, env_extra: dict[str, str]) -> tuple[dict, dict, str]:
    """Train the tiny config once with batch 4 and once on 2 processes with batch 2 each.

    Returns the two final state dicts and the config path of the single run.
    """
    from mmseg_m3vit.datasets.synthetic_nyud import generate

    if shutil.which("bash") is None:
        pytest.skip("bash is needed for tools/dist_train.sh")
    data_root = str(tmp_path / "syn")
    generate(data_root, 12, 2, size=(32, 48), workers=1, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **env_extra}

    single_cfg = write_config(str(tmp_path / "single.py"), data_root, 4, norm)
    single = subprocess.run(
        [sys.executable, "tools/train.py", single_cfg, "--work-dir", str(tmp_path / "single")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]

    dist_cfg = write_config(str(tmp_path / "dist.py"), data_root, 2, norm)
    dist = subprocess.run(
        ["bash", "tools/dist_train.sh", dist_cfg, "2", "--work-dir", str(tmp_path / "dist")],
        cwd=ROOT, env={**env, "PORT": str(free_port())}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    log = dist.stdout + dist.stderr
    assert dist.returncode == 0, log[-4000:]
    assert "Distributed training is not used" not in log
    assert "Distributed training: True" in log, log[-3000:]

    def state(work: str) -> dict[str, torch.Tensor]:
        ckpt = torch.load(osp.join(work, f"iter_{ITERS}.pth"), map_location="cpu",
                          weights_only=False)  # fmt: skip
        return ckpt["state_dict"]

    return state(str(tmp_path / "single")), state(str(tmp_path / "dist")), single_cfg


def test_two_gloo_processes_equal_one_process(tmp_path) -> None:
    one, two, single_cfg = train_single_and_dist(tmp_path, "GN", {"CUDA_VISIBLE_DEVICES": ""})
    assert one.keys() == two.keys()
    assert not any(k.startswith("module.") for k in two)  # a plain single-file checkpoint
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    # the weights moved: the comparison is between trained models
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    import mmseg_m3vit  # noqa: F401

    init_default_scope("mmseg")
    cfg = Config.fromfile(single_cfg)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    init = model.state_dict()
    moved = [k for k in one if one[k].is_floating_point() and not torch.equal(one[k], init[k])]
    assert len(moved) > len(one) // 2
    # the distributed checkpoint loads into a plain (CPU, single-process) model
    model.load_state_dict(two, strict=True)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_with_syncbn_equal_one_gpu(tmp_path) -> None:
    """NCCL + SyncBN heads: 2 GPUs x 2 images end like 1 GPU x 4 images (BN statistics
    over the global batch, running stats included). TF32 off so fp32 is comparable."""
    one, two, _ = train_single_and_dist(tmp_path, "SyncBN", {"NVIDIA_TF32_OVERRIDE": "0"})
    assert one.keys() == two.keys()
    bn = [k for k in one if k.endswith(("running_mean", "running_var"))]
    assert bn, "the heads should hold (Sync)BN running statistics"
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    # control: per-GPU BN (statistics over 2 images) must NOT match, else the
    # comparison above could not tell SyncBN from BN
    (tmp_path / "bn").mkdir()
    one_bn, two_bn, _ = train_single_and_dist(tmp_path / "bn", "BN", {"NVIDIA_TF32_OVERRIDE": "0"})
    worst = max((two_bn[k] - one_bn[k]).abs().max().item() for k in bn)
    assert worst > 1e-3, f"plain BN on 2 GPUs matched the 1-GPU run (max diff {worst})"
