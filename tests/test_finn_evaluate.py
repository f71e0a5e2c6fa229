"""finn_flow/evaluate.py: the task metric of the float / quantized FPGA pathway on val data.

Every test writes a tiny NYUD-MT data root (3 val images of 12x20, padded to 16x32 by the
data preprocessor) and derives the expected numbers from the arrays it wrote:

- perfect logits built from the ground truth give the perfect metric for every task;
- a constant normal vector gives the mean / RMSE / shares of angles that numpy computes
  in float64 from the written normal maps (a resize to a different FPGA size and the
  padding crop cannot change a constant map);
- with a tiny float ``MultiTaskSegmentor`` as the logits function, the numbers equal
  those of ``MultiTaskSegmentor.predict`` + the config's ``val_evaluator`` run through
  mmengine's ``Evaluator`` (the segmentor's own post-processing and resizing);
- a missing data root / metric raises :class:`ValDataError` naming the config key.

No Brevitas or FINN is needed: the models are passed in as callables.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from PIL import Image

from finn_flow.evaluate import ValDataError, evaluate_val_metric

REPO = Path(__file__).resolve().parents[1]
FPGA_CONFIG = REPO / "configs" / "fpga" / "m3vit_vit-t16-6blk-moe16-top2-mg_fpga_synthnyud-64x80.py"
H, W = 12, 20  # image size; the data preprocessor pads to 16 x 32 (size_divisor 16)
PAD = (16, 32)
TRAIN, VAL = ["t0"], ["v0", "v1", "v2"]
NUM_CLASSES = 40

TINY = """
_base_ = [{base!r}]
model = dict(
    backbone=dict(
        img_size=(16, 32), patch_size=4, embed_dims=16, num_layers=1, num_heads=1,
        moe_layers=[0], num_experts=4, top_k=2, expert_hidden_dims=8,
    ),
    decode_heads=dict(
        semseg=dict(channels=8, num_up=0),
        depth=dict(channels=8, num_up=0),
        normals=dict(channels=8, num_up=0),
        edge=dict(channels=8, num_up=0),
    ),
)
val_dataloader = dict(dataset=dict(data_root={root!r}, split="val", holdout=None))
fpga = dict(input_size=(16, 32))
"""


def gt_maps(k: int) -> dict[str, np.ndarray]:
    """Ground truth of sample k as written to disk (seg file values: 0 void, 1..6)."""
    rng = np.random.default_rng(100 + k)
    seg = rng.integers(1, 7, size=(H, W)).astype(np.uint8)
    seg[0, :3] = 0  # void
    depth = rng.uniform(0.5, 5.0, size=(H, W)).astype(np.float32)
    depth[1, 1] = 0.0  # invalid
    normals = rng.normal(size=(H, W, 3))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    normals = normals.astype(np.float32)
    normals[2, :4] = 0.0  # invalid
    edge = np.zeros((H, W), np.float32)  # one-pixel-wide lines: unchanged by thinning
    edge[:, 3 + k] = 1.0
    edge[8, 10 : 14 + k] = 1.0
    return {"seg": seg, "depth": depth, "normals": normals, "edge": edge}


def write_nyud(root: Path) -> None:
    for sub in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        os.makedirs(root / sub, exist_ok=True)
    for k, sid in enumerate(TRAIN + VAL):
        m = gt_maps(k)
        img = np.random.default_rng(k).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "images" / f"{sid}.jpg")
        Image.fromarray(m["seg"]).save(root / "segmentation" / f"{sid}.png")
        np.save(root / "depth" / f"{sid}.npy", m["depth"])
        np.save(root / "normals" / f"{sid}.npy", m["normals"])
        np.save(root / "edge" / f"{sid}.npy", m["edge"])
    (root / "gt_sets" / "train.txt").write_text("\n".join(TRAIN) + "\n")
    (root / "gt_sets" / "val.txt").write_text("\n".join(VAL) + "\n")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    tmp = tmp_path_factory.mktemp("eval")
    write_nyud(tmp / "nyud")
    path = tmp / "tiny_eval.py"
    path.write_text(TINY.format(base=str(FPGA_CONFIG), root=str(tmp / "nyud")))
    return Config.fromfile(str(path))


def val_gt(k: int) -> dict[str, np.ndarray]:
    return gt_maps(len(TRAIN) + k)


def perfect_logits(task: str, k: int) -> torch.Tensor:
    """(1, C, 16, 32) logits whose prediction is the ground truth of val sample k."""
    m = val_gt(k)
    if task == "semseg":
        lab = m["seg"].astype(np.int64) - 1  # void -> -1: any class (ignored)
        x = np.zeros((NUM_CLASSES, H, W), np.float32)
        for c in range(NUM_CLASSES):
            x[c] = lab == c
    elif task == "depth":
        x = m["depth"][None]
    elif task == "normals":
        x = m["normals"].transpose(2, 0, 1)
    else:
        x = 20.0 * (2.0 * m["edge"][None] - 1.0)
    x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return torch.nn.functional.pad(x, (0, PAD[1] - W, 0, PAD[0] - H))[None]


def sequence_fn(make):
    """A logits callable returning make(k) on its k-th call (one call per val image)."""
    calls = iter(range(len(VAL)))
    return lambda img: make(next(calls))


PERFECT = {
    "semseg": ("semseg/mIoU", 100.0),
    "depth": ("depth/rmse", 0.0),
    "normals": ("normals/mean", 0.0),
    "edge": ("edge/odsF", 100.0),
}


@pytest.mark.parametrize("task", list(PERFECT))
def test_perfect_logits_give_the_perfect_metric(cfg: Config, task: str) -> None:
    f = sequence_fn(lambda k: perfect_logits(task, k))
    q = sequence_fn(lambda k: perfect_logits(task, k))
    res = evaluate_val_metric(cfg, task, f, q, PAD)
    key, best = PERFECT[task]
    assert res["primary"] == key and res["images"] == len(VAL)
    # normals: float32 unit vectors -> arccos near 1 is ill-conditioned (~0.03 deg)
    tol = 0.05 if task == "normals" else 1e-4
    assert res["float_primary"] == pytest.approx(best, abs=tol)
    assert res["quant_primary"] == pytest.approx(best, abs=tol)
    if task == "normals":
        assert res["float"]["normals/pct_11.25"] == 100.0


def _angles(c: np.ndarray) -> np.ndarray:
    """float64 angles (degrees) between the constant vector c and every valid GT pixel."""
    c = np.asarray(c, np.float64) / np.linalg.norm(c)
    out = []
    for k in range(len(VAL)):
        g = val_gt(k)["normals"].reshape(-1, 3).astype(np.float64)
        norm = np.linalg.norm(g, axis=1)
        g = g[norm > 0] / norm[norm > 0, None]
        out.append(np.degrees(np.arccos(np.clip(g @ c, -1.0, 1.0))))
    return np.concatenate(out)


def test_constant_normals_match_numpy(cfg: Config) -> None:
    c_float, c_quant = np.array([0.3, -0.2, 0.9]), np.array([-0.5, 0.7, 0.1])

    def const(c):  # at a size other than the padded input: resized by the evaluation
        return lambda img: (
            torch.tensor(c, dtype=torch.float32)
            .view(1, 3, 1, 1)
            .expand(1, 3, img.shape[-2] // 2, img.shape[-1] // 2)
        )

    res = evaluate_val_metric(cfg, "normals", const(c_float), const(c_quant), (8, 12))
    assert res["metric"] == "NormalsAngleMetric" and res["images"] == len(VAL)
    for kind, c in (("float", c_float), ("quantized", c_quant)):
        a = _angles(c)
        assert a.size == len(VAL) * (H * W - 4)  # the invalid pixels are left out
        got = res[kind]
        assert got["normals/mean"] == pytest.approx(a.mean(), abs=1e-3)
        assert got["normals/rmse"] == pytest.approx(np.sqrt(np.mean(a**2)), abs=1e-3)
        assert got["normals/median"] == pytest.approx(np.median(a), abs=0.1)
        for t in ("11.25", "22.5", "30"):
            assert got[f"normals/pct_{t}"] == pytest.approx(100 * np.mean(a < float(t)))
    assert res["delta"] == pytest.approx(_angles(c_quant).mean() - _angles(c_float).mean(), 1e-4)
    assert res["lower_is_better"] is True


def test_num_images_takes_the_first_samples(cfg: Config) -> None:
    c = np.array([0.0, 0.0, 1.0])
    fn = lambda img: torch.tensor(c, dtype=torch.float32).view(1, 3, 1, 1)  # noqa: E731
    res = evaluate_val_metric(cfg, "normals", fn, fn, PAD, num_images=1)
    g = val_gt(0)["normals"].reshape(-1, 3).astype(np.float64)
    g = g[np.linalg.norm(g, axis=1) > 0]
    ref = np.degrees(np.arccos(np.clip(g @ c / np.linalg.norm(g, axis=1), -1, 1))).mean()
    assert res["images"] == 1
    assert res["float_primary"] == pytest.approx(ref, abs=1e-3)


def test_equals_segmentor_predict_and_val_evaluator(cfg: Config) -> None:
    """A float MultiTaskSegmentor as the logits function at the padded input size gives
    exactly the numbers of its own predict() scored by the config's val_evaluator."""
    from mmengine.dataset import pseudo_collate
    from mmengine.evaluator import Evaluator
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS, MODELS

    init_default_scope("mmseg")
    torch.manual_seed(0)
    seg = MODELS.build(cfg.model).eval()
    for m in seg.modules():  # non-trivial BN statistics so that predictions vary
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
    dataset = DATASETS.build(dict(cfg.val_dataloader.dataset))
    evaluator = Evaluator(cfg.val_evaluator)
    evaluator.dataset_meta = dataset.metainfo
    with torch.no_grad():
        for i in range(len(dataset)):
            batch = seg.data_preprocessor(pseudo_collate([dataset[i]]), False)
            preds = seg.predict(batch["inputs"], batch["data_samples"])
            evaluator.process(data_samples=preds, data_batch=batch)
    ref = evaluator.evaluate(len(dataset))
    for task in PERFECT:

        def fn(img, task=task):
            return seg._forward(img, tasks=task)[task]

        res = evaluate_val_metric(cfg, task, fn, fn, PAD, head=seg.heads[task])
        for key, value in res["float"].items():
            assert value == pytest.approx(ref[key], rel=1e-6, abs=1e-6, nan_ok=True), key
        assert res["quantized"] == res["float"]
        assert res["delta"] == 0.0


def test_missing_data_root_is_named(cfg: Config, tmp_path: Path) -> None:
    bad = cfg.copy()
    bad.val_dataloader.dataset.data_root = str(tmp_path / "no_such_root")
    fn = lambda img: torch.zeros(1, 3, 16, 32)  # noqa: E731
    with pytest.raises(ValDataError, match=r"val_dataloader\.dataset\.data_root.*no_such_root"):
        evaluate_val_metric(bad, "normals", fn, fn, PAD)


def test_missing_metric_is_named(cfg: Config) -> None:
    bad = cfg.copy()
    bad.val_evaluator = [dict(type="NormalsAngleMetric")]
    fn = lambda img: torch.zeros(1, 1, 16, 32)  # noqa: E731
    with pytest.raises(ValDataError, match=r"val_evaluator.*'depth'"):
        evaluate_val_metric(bad, "depth", fn, fn, PAD)


def test_summary_shows_the_val_metric(tmp_path: Path) -> None:
    from finn_flow.report import write_summary

    val = {
        "metric": "NormalsAngleMetric",
        "images": 3,
        "data": "tiny",
        "input_size": [16, 32],
        "primary": "normals/mean",
        "lower_is_better": True,
        "float_primary": 12.5,
        "quant_primary": 13.25,
        "delta": 0.75,
    }
    summary = {
        "task": "normals",
        "board": "ZCU104",
        "status": "complete",
        "config": "c.py",
        "checkpoint": None,
        "random_weights": True,
        "finn": {"finn_version": "-", "vivado_present": False},
        "quantization": "-",
        "calibration": "-",
        "pathway": {"description": "-", "moe_form": "-", "not_on_fpga": "-"},
        "float_vs_quant": {
            "relative_l2_error_of_tokens": 0.01,
            "relative_l2_error_of_head_output": 0.02,
            "images": "cal",
            "val_metric": val,
        },
    }
    write_summary(tmp_path, summary)
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "float **12.5**, quantized **13.25** (delta +0.75)" in text
    summary["float_vs_quant"]["val_metric"] = "not computed: no data"
    write_summary(tmp_path, summary)
    assert "- val metric: not computed: no data" in (tmp_path / "SUMMARY.md").read_text()
