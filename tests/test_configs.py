"""Every config in configs/ loads, passes the pre-flight task checks and builds its model.

Models are built on the ``meta`` device (shapes and arguments are checked, no memory is
allocated and no weights are initialised), so all configs build in seconds.
"""

from __future__ import annotations

import copy
import glob
import os.path as osp
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmseg.registry import DATASETS, METRICS, MODELS

import mmseg_m3vit  # noqa: F401  (registers the plugin)
from mmseg_m3vit.engine import check_config_tasks, config_tasks, restrict_to_tasks
from mmseg_m3vit.engine.preflight import metric_tasks_of
from mmseg_m3vit.tasks import DATASET_TASKS, TASK_SPECS

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = sorted(
    p
    for p in glob.glob(osp.join(ROOT, "configs", "**", "*.py"), recursive=True)
    if "_base_" not in p.split(osp.sep)
)
NAMES = [osp.relpath(p, osp.join(ROOT, "configs")) for p in CONFIGS]

init_default_scope("mmseg")


def test_configs_found() -> None:
    for name in ("m3vit_nyud.py", "m3vit_pascal.py", "m3vit_synthetic.py"):
        assert name in NAMES
    assert any(name.startswith("fpga" + osp.sep) for name in NAMES)
    assert len(CONFIGS) >= 13


@pytest.fixture(scope="module", params=CONFIGS, ids=NAMES)
def cfg(request: pytest.FixtureRequest) -> Config:
    return Config.fromfile(request.param)


def test_runtime_and_plugin_settings(cfg: Config) -> None:
    assert cfg.default_scope == "mmseg"
    assert "mmseg_m3vit" in cfg.custom_imports["imports"]
    assert cfg.custom_imports["allow_failed_imports"] is False
    assert any(h["type"] == "NonFiniteLossHook" for h in cfg.custom_hooks)
    # mmseg.apis.inference_model needs a top-level test_pipeline
    assert cfg.test_pipeline == cfg.test_dataloader.dataset.pipeline
    ckpt = cfg.default_hooks.checkpoint
    assert (ckpt.save_best, ckpt.rule) == ("multitask/delta_m", "greater")


def test_builds_model_with_matching_tasks(cfg: Config) -> None:
    check_config_tasks(cfg)
    tasks = config_tasks(cfg)
    with torch.device("meta"):
        model = MODELS.build(cfg.model)
    assert list(model.heads) == tasks
    assert model.backbone.tasks == tasks
    dataset = "pascal" if "Pascal" in cfg.train_dataloader.dataset.type else "nyud"
    assert cfg.model.dataset == dataset
    for task, head in model.heads.items():
        assert head.num_classes == DATASET_TASKS[dataset][task], task
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        assert cfg[key].dataset.tasks == tasks, key
    # one metric that leaf configs override entry by entry (a dict, not a list)
    evaluator = cfg.test_evaluator
    assert evaluator.type == "MultiTaskDeltaMetric" and cfg.val_evaluator == evaluator
    metric = METRICS.build(evaluator)
    metric.dataset_meta = dict(task_channels=DATASET_TASKS[dataset])
    assert list(metric.task_metrics) == tasks
    for task, task_metric in metric.task_metrics.items():
        assert task_metric.task == task
        if task in ("semseg", "parts"):
            assert task_metric.num_classes == DATASET_TASKS[dataset][task]
    # delta_m averages the tasks with a published single-task reference
    assert metric.delta_tasks == [t for t in tasks if t in metric.references]
    assert metric.delta_tasks and set(metric.delta_tasks) >= {"semseg"}


def test_tasks_that_disagree_fail_before_anything_is_built() -> None:
    cfg = Config.fromfile(osp.join(ROOT, "configs", "m3vit_nyud.py"))
    forgot_data = copy.deepcopy(cfg)
    forgot_data.model.tasks = ["semseg", "depth"]
    with pytest.raises(ValueError, match=r"train_dataloader\.dataset\.tasks.*predicts"):
        check_config_tasks(forgot_data)
    forgot_model = copy.deepcopy(cfg)
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        forgot_model[key].dataset.tasks = ["semseg", "depth"]
    forgot_model.val_evaluator.tasks = ["semseg", "depth"]
    with pytest.raises(ValueError, match=r"loads \['semseg', 'depth'\]"):
        check_config_tasks(forgot_model)
    too_many = copy.deepcopy(cfg)
    too_many.model.tasks = ["semseg", "depth"]
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        too_many[key].dataset.tasks = ["semseg", "depth"]
    with pytest.raises(ValueError, match=r"val_evaluator.*\['normals', 'edge'\]"):
        check_config_tasks(too_many)


def test_leaf_overrides_one_metric_entry() -> None:
    """The synthetic data config changes only the edge metric of the NYUD evaluator."""
    nyud = Config.fromfile(osp.join(ROOT, "configs", "m3vit_nyud.py")).val_evaluator
    synthetic = Config.fromfile(osp.join(ROOT, "configs", "m3vit_synthetic.py")).val_evaluator
    assert synthetic.task_metrics.edge == dict(nyud.task_metrics.edge, num_thresholds=19)
    assert {k: v for k, v in synthetic.items() if k != "task_metrics"} == {
        k: v for k, v in nyud.items() if k != "task_metrics"
    }
    for task in ("semseg", "depth", "normals"):
        assert synthetic.task_metrics[task] == nyud.task_metrics[task]


def test_model_selection_never_uses_the_test_split(cfg: Config) -> None:
    val, test = cfg.val_dataloader.dataset, cfg.test_dataloader.dataset
    assert test.split == "val" and test.get("holdout") is None
    assert val.split == "train" and val.holdout["part"] == "holdout"
    train = cfg.train_dataloader.dataset
    assert train.holdout["part"] == "train"
    assert {k: v for k, v in train.holdout.items() if k != "part"} == {
        k: v for k, v in val.holdout.items() if k != "part"
    }


def test_restrict_to_tasks_drops_other_metrics(cfg: Config) -> None:
    tasks = config_tasks(cfg)
    one = tasks[-1]
    sub = restrict_to_tasks(cfg, [one])
    assert sub.model.infer_tasks == [one]
    evaluators = (
        sub.test_evaluator if isinstance(sub.test_evaluator, list) else [sub.test_evaluator]
    )
    for metric in evaluators:
        task, multi = metric_tasks_of(metric)
        assert task == one or multi == [one]
        METRICS.build(metric)
    two = restrict_to_tasks(cfg, tasks[:2])
    delta = METRICS.build(two.test_evaluator)
    assert list(delta.task_metrics) == tasks[:2]
    assert sub.test_dataloader.dataset.tasks == [one]
    assert config_tasks(cfg) == tasks  # the original is untouched
    with pytest.raises(ValueError, match="valid tasks"):
        restrict_to_tasks(cfg, ["nonexistent"])


@pytest.mark.parametrize(
    "name,tasks,router,moe",
    [
        ("m3vit_nyud.py", ["semseg", "depth", "normals", "edge"], "multi_gate", True),
        ("m3vit_pascal.py", ["semseg", "parts", "sal", "normals", "edge"], "multi_gate", True),
        ("m3vit/m3vit_vit-s16-moe16-top4-mg_2xb8-5k_nyud2task-480x640.py",
         ["semseg", "depth"], "multi_gate", True),
        ("m3vit/m3vit_vit-s16-moe16-top4-tc_2xb8-5k_nyud2task-480x640.py",
         ["semseg", "depth"], "task_conditioned", True),
        ("m3vit/m3vit_vit-s16-moe16-top4-shared_2xb8-5k_nyud2task-480x640.py",
         ["semseg", "depth"], "shared", True),
        ("m3vit/vit-s16-dense_2xb8-5k_nyud2task-480x640.py", ["semseg", "depth"], "shared",
         False),
    ],
)  # fmt: skip
def test_paper_settings(name: str, tasks: list[str], router: str, moe: bool) -> None:
    cfg = Config.fromfile(osp.join(ROOT, "configs", name))
    assert config_tasks(cfg) == tasks
    bb = cfg.model.backbone
    assert bb.router == router
    assert (bb.embed_dims, bb.num_layers, bb.patch_size) == (384, 12, 16)
    assert (bb.num_experts, bb.top_k, bb.expert_hidden_dims) == (16, 4, 384)
    assert (bb.get("moe_layers") is None) == moe
    expected_size = (512, 512) if "pascal" in name else (480, 640)
    assert tuple(bb.img_size) == expected_size
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.momentum, opt.weight_decay) == ("SGD", 2e-3, 0.9, 1e-4)
    (poly,) = cfg.param_scheduler
    assert (poly.type, poly.power, poly.eta_min, poly.end) == (
        "PolyLR",
        0.9,
        0.0,
        cfg.train_cfg.max_iters,
    )
    assert cfg.train_dataloader.batch_size == 8  # x 2 GPUs = 16
    assert cfg.model.moe_balance_weight == 0.01
    with torch.device("meta"):
        model = MODELS.build(cfg.model)
    assert (len(model.backbone.moe_layers) == 6) == moe
    # the paper's loss weights (M3ViT s. 3), the same for a task on both data sets
    weights = dict(semseg=1.0, depth=1.0, normals=10.0, edge=50.0, parts=2.0, sal=5.0)
    assert model.loss_weights == {t: weights[t] for t in tasks}


#: backbone part of a config name -> (embed_dims, num_layers); "-<L>blk" sets the depth
BACKBONE_NAMES = {"vit-s16": (384, 12), "vit-t16": (192, 12)}
ROUTER_NAMES = {"mg": "multi_gate", "tc": "task_conditioned", "shared": "shared"}
NAME = re.compile(
    r"(?:m3vit_)?(?P<vit>vit-(?:s16|t16|d(?P<dims>\d+)))(?:-(?P<blocks>\d+)blk)?"
    r"(?:-moe(?P<experts>\d+)-top(?P<k>\d+)-(?P<router>mg|tc|shared)|-(?P<dense>dense))"
    r"_.*-(?P<h>\d+)x(?P<w>\d+)\.py$"
)


@pytest.mark.parametrize(
    "name", [n for n in NAMES if osp.dirname(n)], ids=[n for n in NAMES if osp.dirname(n)]
)
def test_config_names_say_the_model(name: str) -> None:
    """``vit-s16`` / ``vit-t16`` / ``vit-d<D>`` with ``-<L>blk``, ``moe<E>-top<k>-<router>``
    and the ``<H>x<W>`` input size in a config's name are what it builds."""
    match = NAME.fullmatch(osp.basename(name))
    assert match, f"{name} does not follow the naming scheme"
    bb = Config.fromfile(osp.join(ROOT, "configs", name)).model.backbone
    dims, blocks = BACKBONE_NAMES.get(match["vit"], (None, None))
    if match["dims"]:
        dims = int(match["dims"])
        assert match["blocks"], "a vit-d<D> name gives its depth as -<L>blk"
    blocks = int(match["blocks"] or blocks)
    assert (bb.embed_dims, bb.num_layers) == (dims, blocks)
    assert tuple(bb.img_size) == (int(match["h"]), int(match["w"]))
    if match["dense"]:
        assert bb.moe_layers == []
    else:
        assert bb.get("moe_layers") is None  # the default: every other block
        assert (bb.num_experts, bb.top_k) == (int(match["experts"]), int(match["k"]))
        assert bb.router == ROUTER_NAMES[match["router"]]


def test_synthetic_config_builds_its_dataset(tmp_path) -> None:
    from mmseg_m3vit.datasets.synthetic_nyud import generate

    root = str(tmp_path / "syn")
    generate(root, 6, 2, size=(96, 128), workers=1, progress=False)
    cfg = Config.fromfile(osp.join(ROOT, "configs", "m3vit_synthetic.py"))
    for key, n in (("train_dataloader", 5), ("val_dataloader", 1), ("test_dataloader", 2)):
        ds_cfg = cfg[key].dataset.copy()
        ds_cfg.data_root = root
        dataset = DATASETS.build(ds_cfg)
        assert len(dataset) == n, key
        sample = dataset[0]
        assert tuple(sample["inputs"].shape) == (3, 96, 128)
        for task in config_tasks(cfg):
            assert TASK_SPECS[task].gt_field in sample["data_samples"], (key, task)
