"""tools/analysis_tools/metric_vs_trivial.py: a checkpoint's test metrics beside the
trivial predictors, and an exit status that says whether it beats all of them."""

from __future__ import annotations

import importlib.util
import json
import os.path as osp
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "analysis_tools" / "metric_vs_trivial.py"
# primary metric of each task and whether larger is better
PRIMARY = {
    "semseg": ("semseg/mIoU", True),
    "depth": ("depth/rmse", False),
    "normals": ("normals/mean", False),
    "edge": ("edge/odsF", True),
}


def _tool():
    spec = importlib.util.spec_from_file_location("metric_vs_trivial", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_checkpoint_beside_trivial_predictors(
    tmp_path: Path, tiny_nyud_root: str, write_tiny_config
) -> None:
    import torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    import mmseg_m3vit  # noqa: F401

    cfg_path = write_tiny_config(str(tmp_path / "tiny.py"), tiny_nyud_root)
    init_default_scope("mmseg")
    model = MODELS.build(Config.fromfile(cfg_path).model)
    ckpt = tmp_path / "random.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {"iter": 0}}, ckpt)
    out = tmp_path / "res" / "metrics.json"
    rc = _tool().main([cfg_path, str(ckpt), "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["checkpoint"] == str(ckpt)
    beats = []
    for key, larger in PRIMARY.values():
        m, t = res["model"][key], res["trivial"][key]
        beats.append(m > t if larger else m < t)
    assert rc == (0 if all(beats) else 1)
    assert not osp.exists(str(out) + ".tmp")


def test_missing_checkpoint_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = ROOT / "configs" / "m3vit_synthetic.py"
    rc = _tool().main([str(cfg), str(tmp_path / "nope.pth")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "checkpoint" in err and "nope.pth" in err and "does not exist" in err
