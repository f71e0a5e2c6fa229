"""tools/analysis_tools/run_comparison.py: schedule scaling, the iteration rule, derived
configs, process deadlines, packing, and the whole study end to end on CPU at toy size
(three tiny runs of the study's own configs, through the timing probe)."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import os.path as osp
import subprocess
import sys
import tarfile
import time

import pytest
from mmengine.config import Config

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOLS = osp.join(ROOT, "tools", "analysis_tools")
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)
_spec = importlib.util.spec_from_file_location(
    "m3vit_run_comparison", osp.join(TOOLS, "run_comparison.py")
)
rc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = rc
_spec.loader.exec_module(rc)

MG = rc.DEFAULT_RUNS[0][1]
STL = {n.split("-")[2].split("_")[0]: c for n, c, _ in rc.DEFAULT_RUNS if "-stl-" in n}


def test_default_runs_cover_the_study() -> None:
    names = [n for n, _, _ in rc.DEFAULT_RUNS]
    assert len(set(names)) == len(names) == 8
    for _, config, _ in rc.DEFAULT_RUNS:
        assert osp.isfile(osp.join(ROOT, config)), config
    seeds: dict[str, list[int]] = {}
    for _, config, seed in rc.DEFAULT_RUNS:
        seeds.setdefault(config, []).append(seed)
    assert sorted(seeds[MG]) == [0, 1]
    routers = {Config.fromfile(osp.join(ROOT, c)).model.backbone.router for c in seeds}
    assert routers == {"multi_gate", "task_conditioned", "shared"}


def test_parse_run() -> None:
    assert rc.parse_run("a=cfg.py:3") == rc.Run("a", "cfg.py", 3)
    assert rc.parse_run("a_b=dir/x.py") == rc.Run("a_b", "dir/x.py", 0)
    with pytest.raises(Exception, match="NAME=CONFIG"):
        rc.parse_run("no-equals-sign")


def test_scale_schedule_by_hand() -> None:
    cfg = Config.fromfile(osp.join(ROOT, MG))
    assert cfg.train_cfg.max_iters == 1250 and cfg.train_cfg.val_interval == 312
    warm, poly = cfg.param_scheduler
    assert (warm.end, poly.begin, poly.end) == (100, 100, 1250)
    rc.scale_schedule(cfg, 600)
    # the warm-up is left alone; the poly decay ends at the new length; validation and
    # checkpoints keep their fraction of the schedule (312 / 1250 x 600 = 149.8)
    assert [(s.begin, s.end) for s in cfg.param_scheduler] == [(0, 100), (100, 600)]
    assert (cfg.train_cfg.max_iters, cfg.max_iters) == (600, 600)
    assert cfg.train_cfg.val_interval == cfg.default_hooks.checkpoint.interval == 150
    with pytest.raises(ValueError, match=r"param_scheduler\[1\] \(PolyLR\) begins at 100"):
        rc.scale_schedule(Config.fromfile(osp.join(ROOT, MG)), 80)


def test_choose_iters_rule() -> None:
    # one iteration of every run: (0.25 + 0.5 + 0.75) / 3 = 0.5 s; x 1.25 safety = 0.625 s
    spi = {"a": 0.25, "b": 0.5, "c": 0.75}
    assert rc.choose_iters(spi, 600.0, 1.25, 50) == 950  # 960 rounded down to 50s
    assert rc.choose_iters(spi, 600.0, 1.25, 1) == 960
    with pytest.raises(ValueError, match="under 50"):
        rc.choose_iters(spi, 20.0, 1.25, 50)


def test_derive_config(tmp_path) -> None:
    path = rc.derive_config(rc.Run("mg_s1", MG, 1), str(tmp_path), 600, "/data/x")
    assert path == osp.join(str(tmp_path), "mg_s1", osp.basename(MG))
    cfg = Config.fromfile(path)
    assert cfg.randomness.seed == 1
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        assert cfg[key].dataset.data_root == "/data/x"
    assert cfg.train_cfg.max_iters == 600 and cfg.param_scheduler[-1].end == 600
    assert cfg.model.tasks == ["semseg", "depth"]  # a list: the dump keeps its order
    probe = Config.fromfile(rc.derive_config(rc.Run("p", MG, 0), str(tmp_path), 5, None, True))
    assert probe.param_scheduler is None
    assert probe.train_cfg.val_begin > probe.train_cfg.max_iters >= 10**6
    assert probe.default_hooks.logger.interval == probe.log_processor.window_size == 5
    assert probe.optim_wrapper.optimizer.lr == pytest.approx(1e-4)
    assert probe.default_hooks.checkpoint.save_last is False


def test_probe_times_from_logged_scalars(tmp_path) -> None:
    d = tmp_path / "run" / "20261130_000000" / "vis_data"
    d.mkdir(parents=True)
    # windows of 5 iterations: (5, 10] and (10, 15] overlap the warm-up end at 12
    rows = [{"iter": i, "time": t, "data_time": 0.5} for i, t in [(5, 9.0), (10, 9.0), (15, 2.0)]]
    rows += [{"iter": i, "time": t, "data_time": 0.01} for i, t in [(20, 0.3), (25, 0.5)]]
    rows += [{"iter": 30, "time": 0.4, "data_time": 0.02}, {"semseg/mIoU": 1.0, "step": 30}]
    (d / "scalars.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert rc.logged_iters(str(tmp_path / "run")) == 30
    t, data = rc.probe_seconds_per_iter(str(tmp_path / "run"), after=12, window=5)
    assert t == pytest.approx(0.4) and data == pytest.approx(0.01)
    with pytest.raises(
        RuntimeError, match="no iteration times logged for a window after iteration 26"
    ):
        rc.probe_seconds_per_iter(str(tmp_path / "run"), after=26, window=5)


def test_wait_all_stops_processes_at_the_deadline(tmp_path) -> None:
    quick = rc.launch([sys.executable, "-c", "pass"], str(tmp_path / "q.log"))
    slow = rc.launch([sys.executable, "-c", "import time; time.sleep(60)"], str(tmp_path / "s.log"))
    t0 = time.time()
    codes = rc.wait_all({"quick": quick, "slow": slow}, time.time() + 3, "test")
    assert codes == {"quick": 0, "slow": None}
    assert time.time() - t0 < 30 and slow.poll() is not None


def test_pack_keeps_small_result_files_only(tmp_path) -> None:
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    for name in ("cfg.py", "routing.json", "train.log", "iter_10.pth", "last_checkpoint"):
        (root / "run" / name).write_text("x")
    (root / "probe" / "p").mkdir(parents=True)
    (root / "probe" / "p" / "cfg.py").write_text("x")
    (root / "probe" / "p.log").write_text("x")
    out = str(tmp_path / "out" / "r.tar.gz")
    rc.pack(str(root), out)
    with tarfile.open(out) as tar:
        names = sorted(tar.getnames())
    assert names == ["probe/p.log", "run/cfg.py", "run/routing.json", "run/train.log"]


def tiny_config(base: str, path: str, data_root: str) -> str:
    """``base`` at toy size: 32x48 images, a 4-block D-32 backbone, 4 iterations."""
    text = f"""
_base_ = [{base!r}]
crop_size = (32, 48)
model = dict(
    backbone=dict(img_size=crop_size, embed_dims=32, num_layers=4, num_heads=2,
                  num_experts=4, top_k=2, expert_hidden_dims=64),
    head_template=dict(channels=8))
train_pipeline = [
    dict(type="LoadImageFromFile"), dict(type="LoadMultiTaskAnnotations"),
    dict(type="RandomChoiceResize", scales=[(48, 32), (58, 38)], keep_ratio=True),
    dict(type="RandomCrop", crop_size=crop_size, cat_max_ratio=1.0),
    dict(type="MultiTaskRandomFlip", prob=0.5, direction="horizontal"),
    dict(type="PackMultiTaskInputs"),
]
train_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False,
                        dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False)
test_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.1, begin=0, end=1, by_epoch=False),
    dict(type="PolyLR", eta_min=0.0, power=0.9, begin=1, end=4, by_epoch=False),
]
max_iters = 4
train_cfg = dict(max_iters=4, val_interval=2)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
"""
    with open(path, "w") as f:
        f.write(text)
    return path


@pytest.mark.slow
def test_study_end_to_end_on_cpu(tmp_path) -> None:
    """Data, probe, training, test, routing, speed, table and pack; a second call of the
    same command finds everything done and retrains nothing."""
    data = str(tmp_path / "data")
    cfgs = {
        "mg": tiny_config(osp.join(ROOT, MG), str(tmp_path / "mg.py"), data),
        "sem": tiny_config(osp.join(ROOT, STL["semseg"]), str(tmp_path / "sem.py"), data),
        "dep": tiny_config(osp.join(ROOT, STL["depth"]), str(tmp_path / "dep.py"), data),
    }
    work = str(tmp_path / "work")
    cmd = [sys.executable, osp.join(TOOLS, "run_comparison.py"), "--work-root", work]
    cmd += ["--data-root", data, "--generate", "16", "4", "--size", "32", "48"]
    cmd += ["--workers", "1", "--no-amp", "--device", "cpu", "--speed-batch", "1", "2"]
    cmd += ["--speed-reps", "1", "--speed-warmup", "0", "--deadline-s", "1500"]
    cmd += ["--reserve-s", "300", "--probe-warmup", "1", "--probe-seconds", "3"]
    cmd += ["--probe-window", "1", "--iters-step", "1", "--max-iters", "3"]
    cmd += ["--runs", f"mg={cfgs['mg']}:1", f"sem={cfgs['sem']}", f"dep={cfgs['dep']}"]
    cmd += ["--pack", str(tmp_path / "out" / "results.tar.gz")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    plan = json.load(open(osp.join(work, "plan.json")))
    assert plan["rule"] == "probe" and plan["iters"] == 3
    assert set(plan["probe_seconds_per_iter"]) == {"mg", "sem", "dep"}
    status = json.load(open(osp.join(work, "status.json")))
    assert {n: r["state"] for n, r in status["runs"].items()} == dict.fromkeys(cfgs, "done")
    assert status["runs"]["mg"]["seed"] == 1 and status["runs"]["mg"]["routing"] == 0
    assert status["runs"]["mg"]["routing_init"] == 0
    init = json.load(open(osp.join(work, "mg", "routing_init.json")))
    assert init["checkpoint"] is None and init["init_seed"] == 1
    for name in cfgs:
        assert osp.isfile(osp.join(work, name, "iter_3.pth"))
        (metrics,) = glob.glob(osp.join(work, name, "test", "*", "*.json"))
        speed = json.load(open(osp.join(work, name, "inference_speed.json")))
        assert set(speed["ms_per_image"]) == {"1", "2"}
    cfg_mg = Config.fromfile(glob.glob(osp.join(work, "mg", "*.py"))[0])
    assert cfg_mg.randomness.seed == 1 and cfg_mg.train_cfg.max_iters == 3
    load = json.load(open(osp.join(work, "mg", "routing.json")))["load"]
    assert set(load) == {"semseg", "depth"} and len(load["semseg"]) == 2  # MoE blocks 1, 3
    assert all(abs(sum(row) - 2) < 1e-9 for rows in load.values() for row in rows)
    table = open(osp.join(work, "comparison.md")).read()
    assert "| M3ViT multi-gate, multi-task | 1 |" in table
    assert "| dense ViT, single-task depth | 0 |" in table
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "comparison.md" in names and "mg/routing.json" in names
    assert not [n for n in names if n.endswith(".pth")]

    # the same command again: every phase finds its output and skips
    mtime = os.path.getmtime(osp.join(work, "mg", "iter_3.pth"))
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "resuming the plan" in again.stdout
    assert os.path.getmtime(osp.join(work, "mg", "iter_3.pth")) == mtime
    assert len(glob.glob(osp.join(work, "mg", "test", "*", "*.json"))) == 1
