"""Metric tests against hand-computed values, run through mmengine's Evaluator."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from mmengine.evaluator import Evaluator
from mmengine.registry import DefaultScope
from mmengine.structures import PixelData
from mmseg.structures import SegDataSample
from scipy.ndimage import gaussian_filter, label
from scipy.optimize import linear_sum_assignment

from mmseg_m3vit.evaluation.metrics import (
    STL_REFERENCES,
    DepthErrorMetric,
    EdgeODSMetric,
    MultiTaskDeltaMetric,
    MultiTaskIoUMetric,
    NormalsAngleMetric,
    SaliencyMetric,
    delta_m,
)
from mmseg_m3vit.evaluation.metrics.edge_metric import match_edges, thin
from mmseg_m3vit.tasks import get_task


def sample(**maps: tuple[np.ndarray, np.ndarray]) -> dict:
    """A data sample dict as mmengine hands it to metrics: task -> (pred, gt) maps."""
    out = {}
    for task, (pred, gt) in maps.items():
        spec = get_task(task)
        for field, arr in ((spec.pred_field, pred), (spec.gt_field, gt)):
            arr = torch.as_tensor(np.asarray(arr))
            out[field] = {"data": arr if arr.ndim == 3 else arr[None]}
    return out


def evaluate(metric, samples: list[dict]) -> dict:
    evaluator = Evaluator(metric)
    evaluator.process(samples)
    return evaluator.evaluate(len(samples))


# ---------------------------------------------------------------- semseg / parts


SEG_GT = np.array([[0, 0, 1], [1, 2, 255]])
SEG_PRED = np.array([[0, 1, 1], [1, 2, 0]])


def test_iou_hand_computed_with_ignore():
    # class 0: inter 1, union 2; class 1: inter 2, union 3; class 2: inter 1, union 1.
    # The prediction under the 255 pixel is not counted.
    res = evaluate(
        MultiTaskIoUMetric(task="semseg", num_classes=3), [sample(semseg=(SEG_PRED, SEG_GT))]
    )
    assert res["semseg/mIoU"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3 * 100)
    assert res["semseg/aAcc"] == pytest.approx(4 / 5 * 100)
    assert res["semseg/mAcc"] == pytest.approx((1 / 2 + 1 + 1) / 3 * 100)


def test_iou_sums_over_data_set_and_skips_absent_classes():
    # Second image: 4 pixels of class 0, all right. Class 0 becomes 5 / 6 (summed counts,
    # not the mean of per-image IoUs); class 3 never occurs and is skipped.
    second = (np.zeros((2, 2), int), np.zeros((2, 2), int))
    res = evaluate(
        MultiTaskIoUMetric(task="parts", num_classes=4),
        [sample(parts=(SEG_PRED, SEG_GT)), sample(parts=second)],
    )
    assert res["parts/mIoU"] == pytest.approx((5 / 6 + 2 / 3 + 1) / 3 * 100)
    assert res["parts/aAcc"] == pytest.approx(8 / 9 * 100)


def test_iou_perfect_prediction_and_class_names():
    gt = np.array([[0, 1], [2, 255]])
    metric = MultiTaskIoUMetric(task="semseg", num_classes=3, class_names=["a", "b", "c"])
    res = evaluate(metric, [sample(semseg=(np.where(gt == 255, 0, gt), gt))])
    assert res == {"semseg/mIoU": 100.0, "semseg/aAcc": 100.0, "semseg/mAcc": 100.0}


def test_iou_rejects_bad_labels_and_sizes():
    metric = MultiTaskIoUMetric(task="semseg", num_classes=2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        metric.process(None, [sample(semseg=(SEG_PRED, SEG_GT))])
    with pytest.raises(ValueError, match="ground truth size"):
        metric.process(None, [sample(semseg=(np.zeros((2, 2), int), np.zeros((3, 2), int)))])
    with pytest.raises(ValueError, match="'depth'"):
        MultiTaskIoUMetric(task="depth", num_classes=2)


def test_iou_reads_seg_data_samples():
    ds = SegDataSample()
    ds.gt_sem_seg = PixelData(data=torch.as_tensor(SEG_GT)[None])
    ds.pred_sem_seg = PixelData(data=torch.as_tensor(SEG_PRED)[None])
    evaluator = Evaluator(MultiTaskIoUMetric(task="semseg", num_classes=3))
    evaluator.process([ds])
    assert evaluator.evaluate(1)["semseg/mIoU"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3 * 100)


# ---------------------------------------------------------------- depth


def test_depth_hand_computed_pixelwise_over_data_set():
    img1 = (np.array([[2.0, 2.0], [5.0, 2.0]]), np.array([[1.0, 2.0], [0.0, 4.0]]))
    img2 = (np.array([[0.0]]), np.array([[3.0]]))  # prediction 0: clamped to 1 mm for logs
    res = evaluate(DepthErrorMetric(), [sample(depth=img1), sample(depth=img2)])
    # Valid pixels: errors 1, 0, -2 (image 1; gt 0 skipped) and -3 (image 2).
    assert res["depth/rmse"] == pytest.approx(math.sqrt((1 + 0 + 4 + 9) / 4))
    ln2 = math.log(2)
    assert res["depth/log_rmse"] == pytest.approx(
        math.sqrt((ln2**2 + 0 + ln2**2 + math.log(1e-3 / 3) ** 2) / 4)
    )
    assert res["depth/abs_rel"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert res["depth/delta1"] == pytest.approx(25.0)  # only the exact pixel


def test_depth_perfect_and_no_valid_pixel():
    gt = np.array([[1.5, 0.0], [3.0, 7.0]])
    res = evaluate(DepthErrorMetric(), [sample(depth=(gt, gt))])
    assert res["depth/rmse"] == 0 and res["depth/abs_rel"] == 0
    assert res["depth/delta1"] == 100.0
    res = evaluate(DepthErrorMetric(), [sample(depth=(gt, np.zeros_like(gt)))])
    assert math.isnan(res["depth/rmse"])


# ---------------------------------------------------------------- normals


def _normals_case() -> tuple[np.ndarray, np.ndarray]:
    """Errors 0, 10, 20, 45, 90 degrees and one invalid pixel; (3, 1, 6) maps."""
    z = np.array([0.0, 0.0, 1.0])
    gt = [z, z, z, z, np.array([1.0, 0, 0]), np.zeros(3)]
    pred = [
        2 * z,  # same direction, not unit length
        np.array([0, math.sin(math.radians(10)), math.cos(math.radians(10))]),
        np.array([0, math.sin(math.radians(20)), math.cos(math.radians(20))]),
        np.array([0.0, 1.0, 1.0]),
        np.array([0.0, 1.0, 0.0]),
        np.array([0.3, 0.1, 0.9]),  # GT invalid: ignored
    ]
    return np.stack(pred, 1)[:, None], np.stack(gt, 1)[:, None]


def test_normals_hand_computed():
    pred, gt = _normals_case()
    res = evaluate(NormalsAngleMetric(), [sample(normals=(pred, gt))])
    errs = [0, 10, 20, 45, 90]
    assert res["normals/mean"] == pytest.approx(33.0)
    assert res["normals/rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errs) / 5))
    assert res["normals/median"] == pytest.approx(20.0, abs=0.051)  # half a bin
    assert res["normals/pct_11.25"] == pytest.approx(40.0)
    assert res["normals/pct_22.5"] == pytest.approx(60.0)
    assert res["normals/pct_30"] == pytest.approx(60.0)
    fine = evaluate(NormalsAngleMetric(bin_deg=0.01), [sample(normals=(pred, gt))])
    assert fine["normals/median"] == pytest.approx(20.0, abs=0.0051)


def test_normals_median_pools_pixels_of_all_images():
    rng = np.random.default_rng(0)
    samples, errors = [], []
    for _ in range(3):
        gt = rng.normal(size=(3, 4, 5))
        pred = gt + rng.normal(scale=0.5, size=gt.shape)
        cos = np.sum(gt * pred, 0) / np.linalg.norm(gt, axis=0) / np.linalg.norm(pred, axis=0)
        errors.append(np.degrees(np.arccos(np.clip(cos, -1, 1))).ravel())
        samples.append(sample(normals=(pred, gt)))
    res = evaluate(NormalsAngleMetric(), samples)
    errors = np.concatenate(errors)
    assert res["normals/mean"] == pytest.approx(errors.mean())
    assert res["normals/median"] == pytest.approx(np.median(errors), abs=0.051)


def test_normals_rejects_non_finite_prediction():
    pred, gt = _normals_case()
    pred[0, 0, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        NormalsAngleMetric().process(None, [sample(normals=(pred, gt))])
    pred, gt = _normals_case()
    pred[0, 0, 5] = np.nan  # at the invalid pixel: ignored
    NormalsAngleMetric().process(None, [sample(normals=(pred, gt))])


def test_normals_perfect():
    _, gt = _normals_case()
    res = evaluate(NormalsAngleMetric(), [sample(normals=(gt, gt))])
    assert res["normals/mean"] == pytest.approx(0.0, abs=1e-5)
    assert res["normals/median"] == pytest.approx(0.05)  # centre of the first bin
    assert res["normals/pct_11.25"] == 100.0


# ---------------------------------------------------------------- saliency


def test_saliency_hand_computed():
    img1 = (np.array([[0.9, 0.4, 0.6, 0.1, 0.9]]), np.array([[1, 1, 0, 0, 255]]))
    img2 = (np.full((1, 3), 0.1), np.zeros((1, 3), int))  # both empty: IoU 1
    metric = SaliencyMetric(iou_thresholds=[0.3, 0.5], f_thresholds=[0.25, 0.5, 0.75])
    res = evaluate(metric, [sample(sal=img1), sample(sal=img2)])
    # IoU at 0.3: image 1 2/3, image 2 1 -> 5/6; at 0.5: 1/3 and 1 -> 2/3.
    assert res["sal/maxIoU"] == pytest.approx(5 / 6 * 100)
    # F(beta2=0.3) from summed counts: t=.25 P 2/3 R 1; t=.5 P .5 R .5; t=.75 P 1 R .5.
    f = [1.3 * p * r / (0.3 * p + r) for p, r in ((2 / 3, 1), (0.5, 0.5), (1, 0.5))]
    assert res["sal/maxF"] == pytest.approx(max(f) * 100) == pytest.approx(81.25)


def test_saliency_perfect_and_bad_gt():
    gt = np.array([[1, 0], [0, 1]])
    res = evaluate(SaliencyMetric(), [sample(sal=(gt.astype(float), gt))])
    assert res == {"sal/maxIoU": 100.0, "sal/maxF": 100.0}
    with pytest.raises(ValueError, match="0, 1 or 255"):
        SaliencyMetric().process(None, [sample(sal=(gt.astype(float), gt * 2))])


# ---------------------------------------------------------------- edge


def _line(shape=(100, 100), col=50, rows=(10, 90)) -> np.ndarray:
    m = np.zeros(shape, np.float32)
    m[rows[0] : rows[1], col] = 1
    return m


def edge_scores(pairs, **kwargs) -> dict:
    return evaluate(EdgeODSMetric(**kwargs), [sample(edge=p) for p in pairs])


def test_edge_exact_shift_and_empty():
    # 100 x 100 image: tolerance 0.0075 * 141.4 = 1.06 px.
    gt = _line().astype(np.uint8)
    assert edge_scores([(_line(), gt)])["edge/odsF"] == pytest.approx(100.0)
    assert edge_scores([(_line(col=51), gt)])["edge/odsF"] == pytest.approx(100.0)
    assert edge_scores([(_line(col=52), gt)])["edge/odsF"] == 0.0
    assert edge_scores([(np.zeros_like(gt, np.float32), gt)])["edge/odsF"] == 0.0


def test_edge_partial_one_to_one_and_ignore():
    gt = _line().astype(np.uint8)
    # Half the line: P = 1, R = 1/2.
    half = edge_scores([(_line(rows=(10, 50)), gt)])
    assert half["edge/odsF"] == pytest.approx(2 / 3 * 100)
    # Two lines both within tolerance: each GT pixel matches once, so P = 1/2, R = 1.
    double = np.maximum(_line(col=49), _line(col=51))
    assert edge_scores([(double, gt)])["edge/odsF"] == pytest.approx(2 / 3 * 100)
    # A false line inside a 255 region is not counted.
    gt_ignore = gt.copy()
    gt_ignore[:, 15:26] = 255
    pred = np.maximum(_line(), _line(col=20))
    assert edge_scores([(pred, gt_ignore)])["edge/odsF"] == pytest.approx(100.0)
    assert edge_scores([(pred, gt)])["edge/odsF"] == pytest.approx(2 / 3 * 100)


def test_edge_thick_prediction_is_thinned():
    # A 3-px band around the GT line thins to about one line (unthinned: P = 1/3, F = 50).
    gt = _line().astype(np.uint8)
    band = np.maximum.reduce([_line(col=49), _line(col=50), _line(col=51)])
    assert edge_scores([(band, gt)])["edge/odsF"] > 97.0


def test_edge_ods_vs_ois():
    gt = _line().astype(np.uint8)
    a = 0.8 * _line() + 0.3 * _line(col=20)  # best alone at t = 0.5
    b = 0.3 * _line()  # best alone at t = 0.25
    res = edge_scores([(a, gt), (b, gt)], num_thresholds=3)  # t = 0.25, 0.5, 0.75
    # t=.25: matched 160 / pred 240 / GT 160 -> F 0.8; t=.5, .75: P 1, R 1/2 -> F 2/3.
    assert res["edge/odsF"] == pytest.approx(80.0)
    assert res["edge/oisF"] == pytest.approx(100.0)


def _naive_thin(mask: np.ndarray) -> np.ndarray:
    """Guo-Hall A1 written pixel by pixel from the conditions (independent reference)."""
    img = np.pad(mask.astype(int), 1)

    def nbrs(r, c):  # x1..x8: E, NE, N, NW, W, SW, S, SE
        return [
            img[r, c + 1], img[r - 1, c + 1], img[r - 1, c], img[r - 1, c - 1],
            img[r, c - 1], img[r + 1, c - 1], img[r + 1, c], img[r + 1, c + 1],
        ]  # fmt: skip

    changed = True
    while changed:
        changed = False
        for sub in (0, 1):
            delete = []
            for r, c in zip(*np.nonzero(img)):
                x = nbrs(r, c)
                xx = x + x[:1]
                x_h = sum(1 for i in range(4) if not xx[2 * i] and (xx[2 * i + 1] or xx[2 * i + 2]))
                n1 = sum(1 for k in range(4) if xx[2 * k] or xx[2 * k + 1])
                n2 = sum(1 for k in range(4) if xx[2 * k + 1] or xx[2 * k + 2])
                if sub == 0:
                    g3 = not ((x[1] or x[2] or not x[7]) and x[0])
                else:
                    g3 = not ((x[5] or x[6] or not x[3]) and x[4])
                if x_h == 1 and 2 <= min(n1, n2) <= 3 and g3:
                    delete.append((r, c))
            for r, c in delete:
                img[r, c] = 0
            changed |= bool(delete)
    return img[1:-1, 1:-1].astype(bool)


def test_thin_matches_naive_reference():
    bar = np.zeros((7, 12), bool)
    bar[2:5, 1:11] = True
    expected = np.zeros_like(bar)
    expected[3, 2:10] = True  # the middle row, one pixel shorter at each end
    assert np.array_equal(thin(bar), expected)
    assert np.array_equal(_naive_thin(bar), expected)
    rng = np.random.default_rng(1)
    eight = np.ones((3, 3))
    for _ in range(3):
        blob = gaussian_filter(rng.random((24, 24)), 1.5) > 0.5
        thinned = thin(blob)
        assert np.array_equal(thinned, _naive_thin(blob))
        # Thinning keeps every 8-connected object and leaves no 2 x 2 block.
        assert label(thinned, eight)[1] == label(blob, eight)[1]
        blocks = thinned[:-1, :-1] & thinned[1:, :-1] & thinned[:-1, 1:] & thinned[1:, 1:]
        assert not blocks.any()


def test_match_edges_against_assignment():
    rng = np.random.default_rng(2)
    for _ in range(5):
        pred = rng.integers(0, 12, (15, 2))
        gt = rng.integers(0, 12, (12, 2))
        dist = np.hypot(*(pred[:, None] - gt[None]).transpose(2, 0, 1))
        cost = (dist > 2.0).astype(float)  # 0 inside the tolerance
        rows, cols = linear_sum_assignment(cost)
        assert match_edges(pred, gt, 2.0) == int(np.sum(cost[rows, cols] == 0))


def test_edge_speed_480x640():
    from scipy.ndimage import distance_transform_edt

    rng = np.random.default_rng(0)
    gt = np.zeros((480, 640), np.uint8)
    gt[rng.integers(0, 480, 15), :] = 1
    gt[:, rng.integers(0, 640, 15)] = 1
    prob = np.exp(-(distance_transform_edt(gt == 0) ** 2) / 8)
    prob = np.clip(prob + 0.2 * gaussian_filter(rng.random(gt.shape), 3), 0, 1)
    start = time.perf_counter()
    res = edge_scores([(prob.astype(np.float32), gt)])
    assert time.perf_counter() - start < 15.0  # about 2.5 s alone on one core
    assert res["edge/odsF"] > 90.0


# ---------------------------------------------------------------- delta_m


def test_delta_m_reproduces_published_numbers():
    # M3ViT paper, NYUD 2 tasks: 45.6 mIoU / 0.589 RMSE -> +1.59 (RMSE is lower-better).
    dm, terms = delta_m({"semseg": 45.6, "depth": 0.589}, STL_REFERENCES["nyud"])
    assert terms["semseg"] == pytest.approx((45.6 - 43.9) / 43.9 * 100)
    assert terms["depth"] == pytest.approx(-(0.589 - 0.585) / 0.585 * 100)
    assert dm == pytest.approx(1.59, abs=0.005)
    # PASCAL 5 tasks: 72.8 / 14.5 / 62.1 / 66.3 / 71.7 -> +2.71.
    values = {"semseg": 72.8, "normals": 14.5, "parts": 62.1, "sal": 66.3, "edge": 71.7}
    assert delta_m(values, STL_REFERENCES["pascal"])[0] == pytest.approx(2.71, abs=0.005)
    with pytest.raises(KeyError, match="'edge'"):
        delta_m({"edge": 70.0}, STL_REFERENCES["nyud"])


def test_delta_metric_through_evaluator():
    depth = (np.array([[2.0, 2.0]]), np.array([[1.0, 2.0]]))  # RMSE sqrt(1/2)
    metric = MultiTaskDeltaMetric(
        task_metrics=dict(
            semseg=dict(type="MultiTaskIoUMetric", num_classes=3),
            depth=dict(type="DepthErrorMetric"),
        ),
        dataset="nyud",
        stl_reference=dict(semseg=50.0),
    )
    evaluator = Evaluator(metric)
    evaluator.dataset_meta = dict(classes=("a", "b", "c"))
    evaluator.process([sample(semseg=(SEG_PRED, SEG_GT), depth=depth)])
    res = evaluator.evaluate(1)
    miou = (1 / 2 + 2 / 3 + 1) / 3 * 100
    rmse = math.sqrt(0.5)
    assert res["semseg/mIoU"] == pytest.approx(miou)
    assert res["depth/rmse"] == pytest.approx(rmse)
    assert res["multitask/delta_semseg"] == pytest.approx((miou - 50) / 50 * 100)
    assert res["multitask/delta_depth"] == pytest.approx(-(rmse - 0.585) / 0.585 * 100)
    assert res["multitask/delta_m"] == pytest.approx(
        (res["multitask/delta_semseg"] + res["multitask/delta_depth"]) / 2
    )
    assert metric.task_metrics["semseg"].dataset_meta == dict(classes=("a", "b", "c"))


def test_delta_metric_built_by_name_in_mmseg_scope():
    cfg = dict(
        type="MultiTaskDeltaMetric",
        dataset="pascal",
        task_metrics=dict(sal=dict(type="SaliencyMetric", iou_thresholds=[0.5])),
    )
    with DefaultScope.overwrite_default_scope("mmseg"):
        evaluator = Evaluator(cfg)
    gt = np.array([[1, 0], [0, 1]])
    evaluator.process([sample(sal=(gt * 0.9, gt))])
    res = evaluator.evaluate(1)
    assert res["sal/maxIoU"] == 100.0
    assert res["multitask/delta_m"] == pytest.approx((100 - 66.3) / 66.3 * 100)


def test_delta_metric_config_errors():
    edge = dict(edge=dict(type="EdgeODSMetric"))
    with pytest.raises(ValueError, match=r"none of the tasks \['edge'\] has a single-task"):
        MultiTaskDeltaMetric(task_metrics=edge, dataset="nyud")
    with pytest.raises(ValueError, match=r"no single-task reference for \['edge'\]"):
        MultiTaskDeltaMetric(task_metrics=edge, dataset="nyud", delta_tasks=["edge"])
    assert MultiTaskDeltaMetric(task_metrics=edge, dataset="nyud", stl_reference={"edge": 70.0})
    with pytest.raises(ValueError, match=r"EdgeODSMetric evaluates tasks \['edge'\]"):
        MultiTaskDeltaMetric(task_metrics=dict(depth=dict(type="EdgeODSMetric")), dataset="nyud")
    with pytest.raises(ValueError, match=r"none of the tasks of dataset 'pascal'"):
        MultiTaskDeltaMetric(
            task_metrics=dict(depth=dict(type="DepthErrorMetric")), dataset="pascal"
        )
    with pytest.raises(ValueError, match=r"task_metrics\['depth'\] has task='edge'"):
        MultiTaskDeltaMetric(task_metrics=dict(depth=dict(type="EdgeODSMetric", task="edge")))
    with pytest.raises(ValueError, match="unknown dataset"):
        MultiTaskDeltaMetric(task_metrics=edge, dataset="cityscapes")
    with pytest.raises(ValueError, match=r"tasks \['normals'\] have no entry in task_metrics"):
        MultiTaskDeltaMetric(task_metrics=edge, dataset="nyud", tasks=["normals"])


def test_delta_metric_task_list_selects_entries():
    """``tasks`` picks entries of a larger table; the default delta tasks are those with a
    reference; class counts come from the data set's task channels."""
    table = dict(
        semseg=dict(type="MultiTaskIoUMetric"),
        depth=dict(type="DepthErrorMetric"),
        edge=dict(type="EdgeODSMetric"),
    )
    metric = MultiTaskDeltaMetric(task_metrics=table, dataset="nyud", tasks=["edge", "semseg"])
    assert list(metric.task_metrics) == ["edge", "semseg"]
    assert metric.delta_tasks == ["semseg"]  # no NYUD edge reference
    with pytest.raises(ValueError, match="num_classes is not set"):
        metric.task_metrics["semseg"].num_classes  # noqa: B018
    metric.dataset_meta = dict(task_channels={"semseg": 40, "edge": 1})
    assert metric.task_metrics["semseg"].num_classes == 40
    # no dataset: every entry, in table order
    bare = MultiTaskDeltaMetric(task_metrics=table, stl_reference=dict(depth=1.0))
    assert list(bare.task_metrics) == ["semseg", "depth", "edge"]
    assert bare.delta_tasks == ["depth"]
