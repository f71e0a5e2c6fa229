"""tools/analysis_tools/inference_speed.py: which files it reads from a work directory,
the timing helper against a known sleep, and the JSON it writes (CPU, tiny model)."""

from __future__ import annotations

import glob
import importlib.util
import json
import os.path as osp
import sys
import time

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "m3vit_inference_speed", osp.join(ROOT, "tools", "analysis_tools", "inference_speed.py")
)
speed = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = speed
_spec.loader.exec_module(speed)


def test_work_dir_files(tmp_path) -> None:
    for name in ("iter_50.pth", "iter_100.pth", "iter_75.pth"):
        (tmp_path / name).write_bytes(b"")
    assert speed.work_dir_checkpoint(str(tmp_path)).endswith("iter_100.pth")
    (tmp_path / "best_multitask_delta_m_iter_75.pth").write_bytes(b"")
    assert speed.work_dir_checkpoint(str(tmp_path)).endswith("best_multitask_delta_m_iter_75.pth")
    with pytest.raises(FileNotFoundError, match="no best_"):
        speed.work_dir_checkpoint(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="exactly one config dump"):
        speed.work_dir_config(str(tmp_path))
    (tmp_path / "a.py").write_text("")
    assert speed.work_dir_config(str(tmp_path)).endswith("a.py")
    (tmp_path / "b.py").write_text("")
    with pytest.raises(FileNotFoundError, match=r"found \['a.py', 'b.py'\]"):
        speed.work_dir_config(str(tmp_path))


def test_time_ms_measures_a_known_sleep() -> None:
    calls = []

    def fn() -> None:
        calls.append(1)
        time.sleep(0.02)

    ms = speed.time_ms(fn, "cpu", warmup=2, reps=5)
    assert len(calls) == 7
    assert 19.0 <= ms < 200.0  # a sleep lasts at least what was asked for


def test_random_weights_payload(tmp_path) -> None:
    (cfg,) = glob.glob(osp.join(ROOT, "configs", "comparison", "*-mg_*.py"))
    tiny = tmp_path / "tiny.py"
    tiny.write_text(
        f"_base_ = [{cfg!r}]\n"
        "model = dict(backbone=dict(img_size=(32, 48), embed_dims=32, num_layers=2,\n"
        "    num_heads=2, num_experts=4, top_k=2, expert_hidden_dims=64),\n"
        "    head_template=dict(channels=8))\n"
    )
    out = str(tmp_path / "speed.json")
    args = ["--config", str(tiny), "--random-input", "--device", "cpu", "--batch", "1", "3"]
    (payload,) = speed.main([*args, "--reps", "2", "--warmup", "1", "--json", out])
    assert json.load(open(out)) == payload
    assert payload["dtype"] == "float32" and payload["shape"] == [32, 48]
    assert payload["tasks"] == ["semseg", "depth"] and payload["checkpoint"] is None
    for b in ("1", "3"):
        row = payload["ms_per_image"][b]
        assert set(row) == {"semseg", "depth", "all"} and all(v > 0 for v in row.values())
    with pytest.raises(SystemExit):
        speed.main(["--config", str(tiny), "--batch", "0"])


def test_refuses_a_harmful_checkpoint(harmful_checkpoint, tmp_path) -> None:
    from mmseg_m3vit.compat.checkpoint import UntrustedCheckpointError

    path, marker = harmful_checkpoint
    (cfg,) = glob.glob(osp.join(ROOT, "configs", "comparison", "*-mg_*.py"))
    with pytest.raises(UntrustedCheckpointError):
        speed.main(
            ["--config", cfg, "--checkpoint", str(path), "--random-input", "--device", "cpu"]
        )
    assert not marker.exists()
