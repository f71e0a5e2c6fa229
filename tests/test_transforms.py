"""Multi-task loading, flip, mmseg geometric transforms, packing and the data preprocessor.

Expected values are written out by hand (or built independently with numpy), never
taken from the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mmengine.registry import DefaultScope
from mmengine.structures import PixelData
from mmseg.registry import MODELS, TRANSFORMS
from mmseg.structures import SegDataSample
from PIL import Image

import mmseg_m3vit  # noqa: F401  (registers everything)
from mmseg_m3vit.tasks import TASK_SPECS


def build(cfg: dict):
    """Build a transform the way a config with default_scope='mmseg' does."""
    from mmengine.dataset import Compose

    with DefaultScope.overwrite_default_scope("mmseg"):
        return Compose([cfg])


# ----------------------------------------------------------------------------- flip
def _normals_2x3() -> np.ndarray:
    """A hand-built 2x3 normal map; pixel (r, c) has a distinct vector."""
    n = np.array(
        [
            [[0.6, 0.0, 0.8], [0.0, 0.6, 0.8], [0.0, 0.0, 1.0]],
            [[-0.6, 0.0, 0.8], [0.0, -0.6, 0.8], [0.0, 0.0, 0.0]],
        ],
        dtype=np.float32,
    )
    return n


def _flip_results() -> dict:
    return dict(
        img=np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3),
        gt_normal_map=_normals_2x3(),
        gt_depth_map=np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]], np.float32),
        gt_seg_map=np.array([[0, 1, 2], [3, 4, 255]], np.uint8),
        seg_fields=["gt_normal_map", "gt_depth_map", "gt_seg_map"],
    )


def test_horizontal_flip_mirrors_positions_and_negates_normal_x():
    flip = build(dict(type="MultiTaskRandomFlip", prob=1.0, direction="horizontal"))
    out = flip(_flip_results())
    expected_normals = np.array(
        [
            [[-0.0, 0.0, 1.0], [-0.0, 0.6, 0.8], [-0.6, 0.0, 0.8]],
            [[0.0, 0.0, 0.0], [-0.0, -0.6, 0.8], [0.6, 0.0, 0.8]],
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(out["gt_normal_map"], expected_normals)
    np.testing.assert_array_equal(
        out["gt_depth_map"], np.array([[3.0, 2.0, 1.0], [0.0, 5.0, 4.0]], np.float32)
    )
    np.testing.assert_array_equal(out["gt_seg_map"], np.array([[2, 1, 0], [255, 4, 3]]))
    np.testing.assert_array_equal(out["img"], _flip_results()["img"][:, ::-1])
    assert out["flip"] is True and out["flip_direction"] == "horizontal"


def test_vertical_flip_negates_normal_y():
    flip = build(dict(type="MultiTaskRandomFlip", prob=1.0, direction="vertical"))
    out = flip(_flip_results())
    # row 0 <- row 1, y component negated
    np.testing.assert_allclose(out["gt_normal_map"][0, 1], [0.0, 0.6, 0.8])
    np.testing.assert_allclose(out["gt_normal_map"][1, 1], [0.0, -0.6, 0.8])
    np.testing.assert_allclose(out["gt_normal_map"][0, 0], [-0.6, 0.0, 0.8])


def test_flip_prob_zero_leaves_everything():
    flip = build(dict(type="MultiTaskRandomFlip", prob=0.0))
    out = flip(_flip_results())
    np.testing.assert_array_equal(out["gt_normal_map"], _normals_2x3())


def test_flip_refuses_swap_seg_labels():
    with pytest.raises(ValueError, match="swap_seg_labels"):
        TRANSFORMS.build(dict(type="MultiTaskRandomFlip", prob=1.0, swap_seg_labels=[(1, 2)]))


# ----------------------------------------------------------------------------- mmseg resize/crop
def test_mmseg_resize_and_crop_keep_all_maps_aligned_and_normals_unit():
    """Every map encodes the same block id; after Resize + RandomCrop they must agree."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 6, size=(4, 5))
    seg = np.kron(blocks, np.ones((3, 3), dtype=np.int64)).astype(np.uint8)  # 12 x 15
    angles = seg.astype(np.float32) * 0.5
    normals = np.stack([np.sin(angles), np.zeros_like(angles), np.cos(angles)], axis=-1)
    results = dict(
        img=np.repeat(seg[:, :, None], 3, axis=2),
        gt_seg_map=seg,
        gt_depth_map=seg.astype(np.float32) + 1.0,
        gt_normal_map=normals.astype(np.float32),
        seg_fields=["gt_seg_map", "gt_depth_map", "gt_normal_map"],
    )
    with DefaultScope.overwrite_default_scope("mmseg"):
        from mmengine.dataset import Compose

        pipeline = Compose(
            [
                dict(type="RandomChoiceResize", scales=[(22, 18)], keep_ratio=False),
                dict(type="RandomCrop", crop_size=(10, 13)),
            ]
        )
    out = pipeline(results)
    assert out["gt_seg_map"].shape == (10, 13)
    assert out["gt_depth_map"].shape == (10, 13)
    assert out["gt_normal_map"].shape == (10, 13, 3)
    s = out["gt_seg_map"].astype(np.float32)
    np.testing.assert_array_equal(out["gt_depth_map"], s + 1.0)
    np.testing.assert_allclose(out["gt_normal_map"][..., 0], np.sin(s * 0.5), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out["gt_normal_map"], axis=-1), 1.0, atol=1e-6)


# ----------------------------------------------------------------------------- loading
def _write_nyud_sample(tmp_path, h=4, w=5):
    (tmp_path / "img.jpg").write_bytes(b"")  # path only; the loader reads results['img']
    seg = np.zeros((h, w), np.uint8)
    seg[0, :3] = [0, 1, 40]
    Image.fromarray(seg).save(tmp_path / "seg.png")
    depth = np.full((h, w), 2.5, np.float32)
    depth[1, 1] = 0.0
    np.save(tmp_path / "depth.npy", depth)
    normals = np.zeros((h, w, 3), np.float32)
    normals[..., 2] = 1.0
    np.save(tmp_path / "normals.npy", normals)
    edge = np.zeros((h, w), np.float32)
    edge[2, :] = 1.0
    np.save(tmp_path / "edge.npy", edge)
    return dict(
        img=np.zeros((h, w, 3), np.uint8),
        img_path=str(tmp_path / "img.jpg"),
        dataset="nyud",
        ann_paths=dict(
            semseg=str(tmp_path / "seg.png"),
            depth=str(tmp_path / "depth.npy"),
            normals=str(tmp_path / "normals.npy"),
            edge=str(tmp_path / "edge.npy"),
        ),
        seg_fields=[],
    )


def test_load_nyud_maps_decoded_as_documented(tmp_path):
    load = build(dict(type="LoadMultiTaskAnnotations"))
    out = load(_write_nyud_sample(tmp_path))
    seg = out["gt_seg_map"]
    assert seg.dtype == np.uint8
    np.testing.assert_array_equal(seg[0, :3], [255, 0, 39])  # void -> 255, 1 -> 0, 40 -> 39
    assert (seg[1:] == 255).all()
    assert out["gt_depth_map"].dtype == np.float32 and out["gt_depth_map"][1, 1] == 0.0
    assert out["gt_depth_map"][0, 0] == pytest.approx(2.5)
    assert out["gt_normal_map"].shape == (4, 5, 3)
    assert out["gt_edge_map"].dtype == np.uint8
    np.testing.assert_array_equal(out["gt_edge_map"][2], [1] * 5)
    assert out["gt_edge_map"].sum() == 5
    assert sorted(out["seg_fields"]) == sorted(
        TASK_SPECS[t].results_key for t in ("semseg", "depth", "normals", "edge")
    )


def test_load_only_the_requested_tasks(tmp_path):
    results = _write_nyud_sample(tmp_path)
    (tmp_path / "normals.npy").unlink()  # not requested: must not be read
    out = build(dict(type="LoadMultiTaskAnnotations", tasks=["semseg", "depth"]))(results)
    assert "gt_normal_map" not in out and "gt_edge_map" not in out
    assert out["seg_fields"] == ["gt_seg_map", "gt_depth_map"]


def test_load_missing_file_names_it(tmp_path):
    results = _write_nyud_sample(tmp_path)
    (tmp_path / "depth.npy").unlink()
    with pytest.raises(FileNotFoundError, match="depth.npy"):
        build(dict(type="LoadMultiTaskAnnotations"))(results)


def test_load_unreadable_file_names_it(tmp_path):
    results = _write_nyud_sample(tmp_path)
    (tmp_path / "seg.png").write_bytes(b"not a png")
    with pytest.raises(OSError, match="seg.png"):
        build(dict(type="LoadMultiTaskAnnotations"))(results)


def test_load_size_mismatch_names_map_and_image(tmp_path):
    results = _write_nyud_sample(tmp_path)
    np.save(tmp_path / "depth.npy", np.ones((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"depth.npy.*\(3, 5\).*img.jpg.*\(4, 5\)"):
        build(dict(type="LoadMultiTaskAnnotations"))(results)


def test_load_rejects_out_of_range_labels(tmp_path):
    results = _write_nyud_sample(tmp_path)
    Image.fromarray(np.full((4, 5), 41, np.uint8)).save(tmp_path / "seg.png")
    with pytest.raises(ValueError, match=r"seg.png.*\[41\]"):
        build(dict(type="LoadMultiTaskAnnotations"))(results)


# ----------------------------------------------------------------------------- packing
def test_pack_one_pixeldata_per_task(tmp_path):
    results = build(dict(type="LoadMultiTaskAnnotations"))(_write_nyud_sample(tmp_path))
    results.update(ori_shape=(4, 5), img_shape=(4, 5), flip=False, sample_id="x")
    packed = build(dict(type="PackMultiTaskInputs"))(results)
    assert packed["inputs"].shape == (3, 4, 5) and packed["inputs"].dtype == torch.uint8
    sample = packed["data_samples"]
    assert sample.gt_sem_seg.data.shape == (1, 4, 5)
    assert sample.gt_sem_seg.data.dtype == torch.int64
    assert sample.gt_sem_seg.data[0, 0, 2].item() == 39
    assert sample.gt_depth_map.data.dtype == torch.float32
    assert sample.gt_depth_map.data.shape == (1, 4, 5)
    assert sample.gt_normal_map.data.shape == (3, 4, 5)
    assert sample.gt_normal_map.data[:, 0, 0].tolist() == [0.0, 0.0, 1.0]
    assert sample.gt_edge_map.data.dtype == torch.int64
    assert sample.metainfo["tasks"] == ["semseg", "depth", "normals", "edge"]
    assert sample.metainfo["img_shape"] == (4, 5) and sample.metainfo["flip"] is False


# ----------------------------------------------------------------------------- preprocessor
def _sample(h: int, w: int, tasks=("semseg", "parts", "depth", "normals", "edge", "sal")):
    s = SegDataSample()
    for t in tasks:
        spec = TASK_SPECS[t]
        c = spec.map_channels
        if spec.is_label:
            data = torch.ones(c, h, w, dtype=torch.int64)
        else:
            data = torch.full((c, h, w), 7.0)
        s.set_field(PixelData(data=data), spec.gt_field)
    s.set_metainfo(dict(img_path=f"img_{h}x{w}.jpg"))
    return s


def test_preprocessor_pads_each_task_with_its_value():
    pre = MODELS.build(
        dict(
            type="MultiTaskDataPreprocessor",
            mean=[10.0, 20.0, 30.0],
            std=[2.0, 4.0, 5.0],
            bgr_to_rgb=True,
            size_divisor=4,
        )
    )
    img_a = torch.zeros(3, 3, 4, dtype=torch.uint8)
    img_a[0] = 50  # B channel of a BGR image
    img_b = torch.zeros(3, 4, 5, dtype=torch.uint8)
    data = dict(inputs=[img_a, img_b], data_samples=[_sample(3, 4), _sample(4, 5)])
    out = pre(data, training=True)
    x = out["inputs"]
    assert x.shape == (2, 3, 4, 8)  # max (4, 5) rounded up to multiples of 4
    # BGR -> RGB: the B value 50 lands in channel 2: (50 - 30) / 5 = 4
    assert x[0, 2, 0, 0].item() == pytest.approx(4.0)
    assert x[0, 0, 0, 0].item() == pytest.approx((0 - 10) / 2)
    assert (x[0, :, 3:, :] == 0).all() and (x[0, :, :, 4:] == 0).all()  # pad_val 0
    s = out["data_samples"][0]
    expected_pad = {"semseg": 255, "parts": 255, "edge": 255, "sal": 255, "depth": 0, "normals": 0}
    for task, pad in expected_pad.items():
        gt = s.get(TASK_SPECS[task].gt_field).data
        assert gt.shape[-2:] == (4, 8), task
        inside = 1 if TASK_SPECS[task].is_label else 7.0
        assert (gt[:, :3, :4] == inside).all(), task
        assert (gt[:, 3:, :] == pad).all() and (gt[:, :, 4:] == pad).all(), task
    assert s.metainfo["img_shape"] == (3, 4)
    assert s.metainfo["pad_shape"] == (4, 8)
    assert s.metainfo["padding_size"] == (0, 4, 0, 1)
    assert out["data_samples"][1].metainfo["padding_size"] == (0, 3, 0, 0)


def test_preprocessor_pads_to_fixed_size():
    pre = MODELS.build(dict(type="MultiTaskDataPreprocessor", size=(6, 7)))
    out = pre(
        dict(inputs=[torch.zeros(3, 4, 5, dtype=torch.uint8)], data_samples=[_sample(4, 5)]),
        training=True,
    )
    assert out["inputs"].shape == (1, 3, 6, 7)
    assert out["data_samples"][0].gt_depth_map.data.shape == (1, 6, 7)
    assert (out["data_samples"][0].gt_depth_map.data[:, 4:] == 0).all()


def test_preprocessor_test_mode_pads_inputs_not_ground_truth():
    pre = MODELS.build(dict(type="MultiTaskDataPreprocessor", test_cfg=dict(size_divisor=8)))
    out = pre(
        dict(inputs=[torch.zeros(3, 4, 5, dtype=torch.uint8)], data_samples=[_sample(4, 5)]),
        training=False,
    )
    assert out["inputs"].shape == (1, 3, 8, 8)
    s = out["data_samples"][0]
    assert s.gt_sem_seg.data.shape == (1, 4, 5)  # metrics compare at the original size
    assert s.metainfo["pad_shape"] == (8, 8) and s.metainfo["img_shape"] == (4, 5)


def test_preprocessor_argument_errors():
    with pytest.raises(ValueError, match="only one of"):
        MODELS.build(dict(type="MultiTaskDataPreprocessor", size=(4, 4), size_divisor=4))
    with pytest.raises(ValueError, match="mean and std"):
        MODELS.build(dict(type="MultiTaskDataPreprocessor", mean=[0, 0, 0]))
    pre = MODELS.build(dict(type="MultiTaskDataPreprocessor"))
    data = dict(inputs=[torch.zeros(3, 4, 5, dtype=torch.uint8)], data_samples=[_sample(4, 5)])
    with pytest.raises(ValueError, match="size=.*size_divisor"):
        pre(data, training=True)
    pre = MODELS.build(dict(type="MultiTaskDataPreprocessor", size_divisor=4))
    bad = dict(inputs=[torch.zeros(3, 4, 5, dtype=torch.uint8)], data_samples=[_sample(3, 5)])
    with pytest.raises(ValueError, match=r"img_4x5|img_3x5"):
        pre(bad, training=True)


# ----------------------------------------------------------------------------- rotate
def test_rotate_90_moves_pixels_and_rotates_normal_vectors():
    normals = np.zeros((3, 3, 3), np.float32)
    normals[..., 2] = 1.0
    normals[1, 2] = [1.0, 0.0, 0.0]  # right-middle pixel, pointing right
    seg = np.zeros((3, 3), np.uint8)
    seg[1, 2] = 7
    results = dict(
        img=np.zeros((3, 3, 3), np.uint8),
        gt_seg_map=seg,
        gt_normal_map=normals,
        seg_fields=["gt_seg_map", "gt_normal_map"],
    )
    out = build(dict(type="MultiTaskRandomRotate", prob=1.0, degree=(90, 90)))(results)
    # clockwise on screen: right-middle -> bottom-middle, "right" -> "down" (y up frame)
    expected_seg = np.zeros((3, 3), np.uint8)
    expected_seg[2, 1] = 7
    np.testing.assert_array_equal(out["gt_seg_map"], expected_seg)
    np.testing.assert_allclose(out["gt_normal_map"][2, 1], [0.0, -1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(out["gt_normal_map"][1, 1], [0.0, 0.0, 1.0], atol=1e-6)


def test_rotate_pads_each_task_with_its_value():
    h = w = 9
    results = dict(
        img=np.full((h, w, 3), 9, np.uint8),
        gt_seg_map=np.ones((h, w), np.uint8),
        gt_edge_map=np.ones((h, w), np.uint8),
        gt_depth_map=np.full((h, w), 3.0, np.float32),
        gt_normal_map=np.tile(np.array([0.6, 0.0, 0.8], np.float32), (h, w, 1)),
        seg_fields=["gt_seg_map", "gt_edge_map", "gt_depth_map", "gt_normal_map"],
    )
    out = build(dict(type="MultiTaskRandomRotate", prob=1.0, degree=(45, 45), pad_val=0))(results)
    assert out["gt_seg_map"][0, 0] == 255 and out["gt_edge_map"][0, 0] == 255
    assert out["gt_depth_map"][0, 0] == 0.0 and (out["gt_normal_map"][0, 0] == 0).all()
    assert (out["img"][0, 0] == 0).all()
    assert out["gt_seg_map"][4, 4] == 1 and out["gt_depth_map"][4, 4] == 3.0
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    np.testing.assert_allclose(out["gt_normal_map"][4, 4], [0.6 * c, -0.6 * s, 0.8], atol=1e-6)


def test_rotate_refuses_maps_outside_the_task_table():
    results = dict(img=np.zeros((4, 4, 3), np.uint8), foo=np.zeros((4, 4)), seg_fields=["foo"])
    with pytest.raises(KeyError, match="foo"):
        build(dict(type="MultiTaskRandomRotate", prob=1.0, degree=10))(results)
