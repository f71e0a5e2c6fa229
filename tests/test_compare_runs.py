"""tools/analysis_tools/compare_runs.py on hand-made work directories with known answers.

The work directories hold what tools/train.py, tools/test.py, routing.py --json and
inference_speed.py write (a config dump, a test metrics JSON, routing.json,
inference_speed.json), with metric values chosen so that every mean, spread, Δm and
divergence can be worked out by hand; the configs are the study's own
(configs/comparison/) with a tiny backbone so that building and counting is quick.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import os.path as osp
import sys
from types import ModuleType

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS

import mmseg_m3vit  # noqa: F401  (registers the plugin)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOLS = osp.join(ROOT, "tools", "analysis_tools")


def load_tool(name: str) -> ModuleType:
    """Import a script of tools/analysis_tools by path (it imports its neighbours)."""
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    spec = importlib.util.spec_from_file_location(f"m3vit_{name}", osp.join(TOOLS, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


compare = load_tool("compare_runs")
flops_tool = load_tool("flops")


def comparison_config(kind: str) -> str:
    """The study's config whose file name contains ``kind`` (exactly one)."""
    (path,) = [
        p
        for p in glob.glob(osp.join(ROOT, "configs", "comparison", "*.py"))
        if kind in osp.basename(p)
    ]
    return path


def tiny(base: str, path: str) -> str:
    """A config inheriting ``base`` with a tiny backbone and heads; returns its path.

    The MoE keeps the real configs' proportions: top-2 of experts with hidden 64 is the
    active size of the dense MLP (32 x ratio 4 = 128), and four experts hold twice its
    parameters."""
    with open(path, "w") as f:
        f.write(
            f"_base_ = [{base!r}]\n"
            "model = dict(backbone=dict(img_size=(32, 48), embed_dims=32, num_layers=4,\n"
            "    num_heads=2, num_experts=4, top_k=2, expert_hidden_dims=64),\n"
            "    head_template=dict(channels=8))\n"
        )
    return path


def make_run(
    root: str,
    name: str,
    config: str,
    seed: int,
    metrics: dict | None,
    routing: dict | None = None,
    speed: dict | None = None,
) -> str:
    """A work directory as the tools leave it (config dump, test JSON, extras)."""
    wd = osp.join(root, name)
    os.makedirs(wd)
    cfg = Config.fromfile(config)
    cfg.randomness = dict(seed=seed)
    cfg.dump(osp.join(wd, osp.basename(config)))
    if metrics is not None:
        stamp = "20261130_120000"
        os.makedirs(osp.join(wd, "test", stamp))
        with open(osp.join(wd, "test", stamp, stamp + ".json"), "w") as f:
            json.dump({**metrics, "time": 0.1, "data_time": 0.01}, f)
    if routing is not None:
        with open(osp.join(wd, "routing.json"), "w") as f:
            json.dump({"load": routing}, f)
        with open(osp.join(wd, "routing_init.json"), "w") as f:  # identical tasks
            json.dump({"load": {t: routing["semseg"] for t in routing}}, f)
    if speed is not None:
        with open(osp.join(wd, "inference_speed.json"), "w") as f:
            json.dump({"device": "test device", "ms_per_image": speed}, f)
    return wd


# expert loads (L=2 layers, E=4 experts, k=2): layer 0 disjoint, layer 1 identical
ROUTING = {
    "semseg": [[1.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]],
    "depth": [[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]],
}
SPEED = {"1": {"semseg": 2.0, "depth": 4.0, "all": 5.0}, "16": {"semseg": 0.5, "depth": 0.7}}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Six work directories: M3ViT multi-gate (2 seeds), dense MTL, two STL, one untested."""
    init_default_scope("mmseg")
    tmp = tmp_path_factory.mktemp("study")
    cfgs = {
        kind: tiny(comparison_config(kind), str(tmp / f"{kind}.py"))
        for kind in ("-mg_", "dense_1xb16-1250it_synthnyud2task", "semseg", "synthnyud-depth")
    }
    root = str(tmp / "runs")
    os.makedirs(root)
    mg, dense = cfgs["-mg_"], cfgs["dense_1xb16-1250it_synthnyud2task"]
    make_run(root, "mg_s0", mg, 0, {"semseg/mIoU": 40.0, "depth/rmse": 0.50}, ROUTING, SPEED)
    make_run(root, "mg_s1", mg, 1, {"semseg/mIoU": 44.0, "depth/rmse": 0.60})
    make_run(root, "dense_s0", dense, 0, {"semseg/mIoU": 38.0, "depth/rmse": 0.55})
    make_run(root, "dense_s1", dense, 1, None)  # trained, never tested
    make_run(root, "stl_sem", cfgs["semseg"], 0, {"semseg/mIoU": 40.0, "semseg/aAcc": 90.0})
    make_run(root, "stl_dep", cfgs["synthnyud-depth"], 0, {"depth/rmse": 0.5})
    return {"root": root, "tmp": tmp, "cfgs": cfgs}


def test_table_numbers_by_hand(study: dict) -> None:
    out = str(study["tmp"] / "table.md")
    js = str(study["tmp"] / "table.json")
    figs = str(study["tmp"] / "figs")
    args = ["--root", study["root"], "--out", out, "--json", js, "--figure-dir", figs]
    text = compare.main([*args, "--no-flops"])
    assert open(out).read().strip() == text.strip()
    payload = json.load(open(js))
    rows = {r["label"]: r for r in payload["rows"]}
    assert payload["references"] == {"semseg": 40.0, "depth": 0.5}

    mg = rows["M3ViT multi-gate, multi-task"]
    assert mg["seeds"] == [0, 1]
    assert mg["metric"]["semseg"] == pytest.approx([42.0, 2.0])
    assert mg["metric"]["depth"] == pytest.approx([0.55, 0.05])
    # seed 0: (40-40)/40 and -(0.5-0.5)/0.5 -> 0; seed 1: +10 % and -20 % -> -5
    assert mg["delta_m_per_seed"] == pytest.approx([0.0, -5.0])
    assert mg["delta_m"] == pytest.approx([-2.5, 2.5])
    # speed: mean of the single-task pathways, per batch size
    assert mg["speed"] == pytest.approx({"1": 3.0, "16": 0.6})
    # routing: TV distance 1 in layer 0 (disjoint experts), 0 in layer 1 (identical)
    assert mg["routing"]["divergence"]["per_layer"] == pytest.approx([1.0, 0.0])
    assert mg["routing"]["divergence"]["mean"] == pytest.approx(0.5)
    assert mg["routing"]["top_k"] == pytest.approx(2.0)
    assert mg["routing"]["divergence_init"]["per_layer"] == pytest.approx([0.0, 0.0])
    assert mg["routing"]["experts_used"] == pytest.approx({"semseg": 3.0, "depth": 3.0})

    dense = rows["dense ViT, multi-task"]
    assert dense["seeds"] == [0] and dense["untested"] == ["dense_s1"]
    assert dense["delta_m_per_seed"] == pytest.approx([(-5.0 - 10.0) / 2])
    assert "delta_m" not in rows["dense ViT, single-task semseg"]

    # rendered: mean ± half range, signed Δm, the STL rows marked as reference
    line = next(x for x in text.splitlines() if x.startswith("| M3ViT multi-gate"))
    assert "| 0, 1 | 42.00 ± 2.00 | 0.550 ± 0.050 | -2.50 ± 2.50 |" in line
    assert "| 3.000 | 0.600 |" in line
    assert "| dense ViT, single-task depth | 0 |  | 0.500 | reference |" in text
    assert "Not tested (no test metrics): dense_s1" in text
    assert "| 0.500 (1.00, 0.00) | 0.000 (0.00, 0.00) | semseg 3.0, depth 3.0 |" in text
    assert osp.getsize(osp.join(figs, "routing_m3vit-multi-gate-multi-task.png")) > 0


@pytest.mark.slow
def test_params_and_macs_match_flops_tool(study: dict) -> None:
    """Parameters counted on a separately built model; MACs as flops.py reports them."""
    js = str(study["tmp"] / "macs.json")
    compare.main(["--root", study["root"], "--json", js])
    rows = {r["label"]: r for r in json.load(open(js))["rows"]}
    for label, kind in (
        ("M3ViT multi-gate, multi-task", "-mg_"),
        ("dense ViT, single-task depth", "synthnyud-depth"),
    ):
        cfg = Config.fromfile(study["cfgs"][kind])
        cfg.model.backbone.pretrained = None
        model = MODELS.build(cfg.model)
        assert rows[label]["params"] == sum(p.numel() for p in model.parameters())
        counts = flops_tool.main([study["cfgs"][kind]])["rows"]
        tasks = list(cfg.model.tasks)
        single = sum(counts[t]["total"] for t in tasks) / len(tasks)
        assert rows[label]["macs_single"] == pytest.approx(single)
        all_row = counts["all"] if len(tasks) > 1 else counts[tasks[0]]
        assert rows[label]["macs_all"] == all_row["total"]
    # MoE at equal active FLOPs: one task costs what the dense one does, plus routers
    mg = rows["M3ViT multi-gate, multi-task"]
    dense = rows["dense ViT, multi-task"]
    assert mg["params"] > dense["params"]
    assert mg["macs_single"] == pytest.approx(dense["macs_single"], rel=0.01)


def test_two_references_for_one_task_is_an_error(study: dict, tmp_path) -> None:
    other = tiny(comparison_config("semseg"), str(tmp_path / "other.py"))
    with open(other, "a") as f:
        f.write("optim_wrapper = dict(optimizer=dict(lr=0.02))\n")
    dirs = [osp.join(study["root"], d) for d in ("mg_s0", "stl_sem")]
    dirs.append(make_run(str(tmp_path), "stl_sem_lr", other, 0, {"semseg/mIoU": 30.0}))
    with pytest.raises(ValueError, match="two single-task rows for 'semseg'"):
        compare.main([*dirs, "--no-flops"])


def test_bad_inputs_are_named(study: dict, tmp_path) -> None:
    mg = study["cfgs"]["-mg_"]
    wd = make_run(str(tmp_path), "no_depth", mg, 0, {"semseg/mIoU": 1.0})
    with pytest.raises(KeyError, match="'depth/rmse'"):
        compare.main([wd, "--no-flops"])
    wd = make_run(str(tmp_path), "broken", mg, 0, None)
    os.makedirs(osp.join(wd, "test", "1"))
    with open(osp.join(wd, "test", "1", "1.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="1.json: not valid JSON"):
        compare.main([wd, "--no-flops"])
    wd = make_run(str(tmp_path), "two_cfgs", mg, 0, None)
    open(osp.join(wd, "extra.py"), "w").close()
    with pytest.raises(ValueError, match="several configs"):
        compare.main([wd, "--no-flops"])
    zero = str(tmp_path / "zero")
    make_run(zero, "mg", mg, 0, {"semseg/mIoU": 1.0, "depth/rmse": 0.5})
    make_run(zero, "sem", study["cfgs"]["semseg"], 0, {"semseg/mIoU": 0.0})
    text = compare.main(["--root", zero, "--no-flops"])
    assert "| n/a |" in text and "reference of ['semseg'] is 0" in text
    a = make_run(str(tmp_path), "a", mg, 3, None)
    b = make_run(str(tmp_path), "b", mg, 3, None)
    with pytest.raises(ValueError, match="same config and seed"):
        compare.main([a, b, "--no-flops"])
    with pytest.raises(FileNotFoundError, match="no config dump"):
        compare.main([str(tmp_path), "--no-flops"])


def test_divergence_of_three_tasks_averages_pairs() -> None:
    load = {
        "a": [[2.0, 0.0, 0.0]],
        "b": [[0.0, 2.0, 0.0]],
        "c": [[1.0, 1.0, 0.0]],
    }
    # pairs: a-b 1.0, a-c 0.5, b-c 0.5 -> 2/3
    assert compare.task_divergence(load)["mean"] == pytest.approx(2 / 3)
    assert compare.task_divergence({"a": [[1.0, 1.0]]})["mean"] is None
    torch.testing.assert_close(
        torch.tensor(compare.experts_used([[1.0, 0.01, 0.99]], 2)), torch.tensor(2.0)
    )
