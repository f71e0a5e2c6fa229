"""Fixtures shared by several test files.

* ``harmful_checkpoint``: a checkpoint-shaped file whose unpickling creates a marker file
  (the stand-in for any code an attacker would run); every entry point that reads a
  checkpoint must refuse it by default, and the marker must stay absent.
* ``tiny_nyud_root`` / ``write_tiny_config``: a tiny synthetic NYUD-MT set (12 train +
  4 val images of 32x48) and a tiny config for it that trains in seconds on a CPU.
"""

from __future__ import annotations

import os.path as osp
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


class _CreatesMarker:
    """Unpickling this object calls ``open(path, 'w')``: the file appears."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def harmful_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """``(checkpoint path, marker path)``: an mmengine-like checkpoint (``meta``,
    ``state_dict``) that also holds an object whose unpickling creates the marker file.
    The marker does not exist when the fixture returns."""
    marker = tmp_path / "harmful_pickle_ran"
    path = tmp_path / "harmful.pth"
    torch.save(
        {
            "meta": {"iter": 2},
            "state_dict": {"backbone.cls_token": torch.zeros(1, 1, 8)},
            "message_hub": {"payload": _CreatesMarker(str(marker))},
        },
        path,
    )
    assert not marker.exists()
    return path, marker


@pytest.fixture(scope="session")
def tiny_nyud_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """12 train + 4 val synthetic NYUD-MT images of 32x48 (all four tasks)."""
    from mmseg_m3vit.datasets.synthetic_nyud import generate

    root = str(tmp_path_factory.mktemp("data") / "synthetic_nyud")
    generate(root, 12, 4, size=(32, 48), workers=1, progress=False)
    return root


TINY_MAX_ITERS = 6


def _write_tiny_config(path: str, data_root: str, extra: str = "") -> str:
    base = osp.join(ROOT, "configs", "m3vit_synthetic.py")
    text = f"""
    _base_ = [{base!r}]
    data_root = {data_root!r}
    pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadMultiTaskAnnotations'),
        dict(type='MultiTaskRandomFlip', prob=0.5, direction='horizontal'),
        dict(type='PackMultiTaskInputs'),
    ]
    test_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadMultiTaskAnnotations'),
        dict(type='PackMultiTaskInputs'),
    ]
    model = dict(
        backbone=dict(img_size=(32, 48), embed_dims=32, num_heads=2, num_experts=4,
                      top_k=2, expert_hidden_dims=16),
        head_template=dict(channels=8),
    )
    train_dataloader = dict(batch_size=2,
                            dataset=dict(data_root=data_root, pipeline=pipeline))
    val_dataloader = dict(batch_size=2,
                          dataset=dict(data_root=data_root, pipeline=test_pipeline))
    test_dataloader = dict(batch_size=2,
                           dataset=dict(data_root=data_root, pipeline=test_pipeline))
    val_evaluator = dict(task_metrics=dict(edge=dict(num_thresholds=5)))
    test_evaluator = val_evaluator
    param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0,
                            end={TINY_MAX_ITERS}, by_epoch=False)]
    train_cfg = dict(max_iters={TINY_MAX_ITERS}, val_interval=100)
    default_hooks = dict(
        logger=dict(interval=1),
        checkpoint=dict(interval=2, max_keep_ckpts=-1, save_best=None, save_last=True),
    )
    randomness = dict(seed=0, deterministic=False)
    """
    with open(path, "w") as f:
        f.write(textwrap.dedent(text) + textwrap.dedent(extra))
    return path


@pytest.fixture(scope="session")
def write_tiny_config() -> Callable[..., str]:
    """``write(path, data_root, extra='') -> path``: a tiny config inheriting the
    synthetic one (D 32, 4 experts top-2, 8-channel heads, 6 iterations, a checkpoint
    every 2, no best checkpoint, no validation); ``extra`` is appended config text."""
    return _write_tiny_config
