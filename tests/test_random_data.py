"""In-memory random multi-task data (throughput runs) and the scaling tool's config."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope, init_default_scope
from mmseg.registry import DATASETS

import mmseg_m3vit  # noqa: F401  (registers the data set)
from mmseg_m3vit.datasets.random_mt import random_batch


def test_random_batch_fields_shapes_and_ranges() -> None:
    batch = random_batch(3, (8, 12), ["semseg", "depth", "normals", "edge"], seed=1)
    assert len(batch["inputs"]) == len(batch["data_samples"]) == 3
    img, sample = batch["inputs"][0], batch["data_samples"][0]
    assert img.shape == (3, 8, 12) and img.dtype == torch.uint8
    seg = sample.gt_sem_seg.data
    assert seg.shape[-2:] == (8, 12) and int(seg.min()) >= 0 and int(seg.max()) < 40
    depth = sample.gt_depth_map.data
    assert float(depth.min()) >= 0.5 and float(depth.max()) < 10.0
    norms = sample.gt_normal_map.data.reshape(3, -1).norm(dim=0)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    again = random_batch(3, (8, 12), ["semseg", "depth", "normals", "edge"], seed=1)
    assert torch.equal(again["inputs"][2], batch["inputs"][2])


def test_random_batch_rejects_unknown_task() -> None:
    with pytest.raises(ValueError, match="parts"):
        random_batch(1, (4, 4), ["parts"], seed=0)


def test_dataset_cycles_over_its_pool_and_copies_samples() -> None:
    with DefaultScope.overwrite_default_scope("mmseg"):
        ds = DATASETS.build(dict(type="RandomMultiTaskDataset", length=7, pool=3, size=(4, 6)))
    assert len(ds) == 7
    assert torch.equal(ds[4]["inputs"], ds[1]["inputs"])
    assert ds[4]["data_samples"] is not ds[1]["data_samples"]
    assert ds.metainfo["tasks"] == ["semseg", "depth", "normals", "edge"]


def test_ddp_scaling_config_builds_on_the_nyud_config(tmp_path) -> None:
    path = Path(__file__).resolve().parents[1] / "tools" / "analysis_tools" / "ddp_scaling.py"
    spec = importlib.util.spec_from_file_location("m3vit_ddp_scaling", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cfg = Config.fromfile(tool.write_config(str(tmp_path)))
    assert cfg.train_dataloader.dataset == dict(
        type="RandomMultiTaskDataset", pool=16, size=(480, 640)
    )
    assert cfg.model.backbone.pretrained is None and cfg.val_cfg is None
    init_default_scope("mmseg")
    ds = DATASETS.build(dict(cfg.train_dataloader.dataset, pool=1, size=(16, 16)))
    assert ds[0]["inputs"].shape == (3, 16, 16)
