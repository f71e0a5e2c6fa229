"""NYUD-MT and PASCAL-MT data sets on tiny data roots that the tests write themselves.

Each test data root follows the published layouts (docs/model.md s. 5). Expected
values come from the arrays the test wrote, transformed by hand.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.io
import torch
from mmengine.dataset import pseudo_collate
from mmengine.registry import DefaultScope
from mmseg.registry import DATASETS, MODELS
from PIL import Image
from torch.utils.data import DataLoader

import mmseg_m3vit  # noqa: F401  (registers everything)

H, W = 6, 8
NYUD_TRAIN = ["a", "b", "c", "d"]
NYUD_VAL = ["e"]


def build_dataset(cfg: dict):
    with DefaultScope.overwrite_default_scope("mmseg"):
        return DATASETS.build(cfg)


def nyud_blocks(k: int) -> np.ndarray:
    """Block-id map (H, W) in 0..5 of sample k; asymmetric left/right."""
    blocks = np.zeros((H, W), np.int64)
    blocks[:, : 2 + k % 3] = 1 + k % 5
    blocks[3:, 5:] = 2
    return blocks


def write_nyud(root) -> None:
    """NYUD-MT layout; every map of sample k is a function of ``nyud_blocks(k)``:
    semseg file = block + 1 (except pixel (0, 0) = 0 void), depth = block + 1 metres,
    normals = (sin(0.3 b), 0, cos(0.3 b)), edge = columns where the block id changes."""
    for sub in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        os.makedirs(root / sub, exist_ok=True)
    for k, sid in enumerate(NYUD_TRAIN + NYUD_VAL):
        b = nyud_blocks(k)
        Image.fromarray(np.full((H, W, 3), 30 * k, np.uint8)).save(root / "images" / f"{sid}.jpg")
        seg = (b + 1).astype(np.uint8)
        seg[0, 0] = 0
        Image.fromarray(seg).save(root / "segmentation" / f"{sid}.png")
        np.save(root / "depth" / f"{sid}.npy", (b + 1).astype(np.float32))
        a = 0.3 * b
        normals = np.stack([np.sin(a), np.zeros_like(a), np.cos(a)], -1).astype(np.float32)
        np.save(root / "normals" / f"{sid}.npy", normals)
        edge = np.zeros((H, W), np.float32)
        edge[:, :-1] = b[:, :-1] != b[:, 1:]
        np.save(root / "edge" / f"{sid}.npy", edge)
    (root / "gt_sets" / "train.txt").write_text("\n".join(NYUD_TRAIN) + "\n")
    (root / "gt_sets" / "val.txt").write_text("\n".join(NYUD_VAL) + "\n")


@pytest.fixture()
def nyud_root(tmp_path):
    root = tmp_path / "nyud"
    write_nyud(root)
    return root


# ----------------------------------------------------------------------------- NYUD
def test_nyud_data_infos(nyud_root):
    ds = build_dataset(dict(type="NYUDMTDataset", data_root=str(nyud_root), split="train"))
    assert len(ds) == 4
    info = ds.get_data_info(1)
    assert info["img_path"] == str(nyud_root / "images" / "b.jpg")
    assert info["ann_paths"] == {
        "semseg": str(nyud_root / "segmentation" / "b.png"),
        "depth": str(nyud_root / "depth" / "b.npy"),
        "normals": str(nyud_root / "normals" / "b.npy"),
        "edge": str(nyud_root / "edge" / "b.npy"),
    }
    assert info["dataset"] == "nyud" and info["sample_id"] == "b"
    assert ds.metainfo["tasks"] == ["semseg", "depth", "normals", "edge"]
    assert len(ds.metainfo["classes"]) == 40 and ds.metainfo["classes"][21] == "ceiling"
    val = build_dataset(dict(type="NYUDMTDataset", data_root=str(nyud_root), split="val"))
    assert [val.get_data_info(i)["sample_id"] for i in range(len(val))] == ["e"]


def test_nyud_only_chosen_tasks_are_needed(nyud_root):
    import shutil

    for sub in ("depth", "normals", "edge"):
        shutil.rmtree(nyud_root / sub)
    ds = build_dataset(
        dict(type="NYUDMTDataset", data_root=str(nyud_root), split="train", tasks=["semseg"])
    )
    assert list(ds.get_data_info(0)["ann_paths"]) == ["semseg"]
    assert ds.metainfo["task_channels"] == {"semseg": 40}


def test_nyud_split_list_file_and_holdout(nyud_root):
    (nyud_root / "mine.txt").write_text("c\na\n")
    ds = build_dataset(dict(type="NYUDMTDataset", data_root=str(nyud_root), split="mine.txt"))
    assert [ds.get_data_info(i)["sample_id"] for i in range(len(ds))] == ["c", "a"]

    def ids(part, seed=0):
        ds = build_dataset(
            dict(
                type="NYUDMTDataset",
                data_root=str(nyud_root),
                split="train",
                holdout=dict(fraction=0.25, seed=seed, part=part),
            )
        )
        return [ds.get_data_info(i)["sample_id"] for i in range(len(ds))]

    train, hold = ids("train"), ids("holdout")
    assert len(hold) == 1 and len(train) == 3  # round(0.25 * 4) = 1
    assert sorted(train + hold) == NYUD_TRAIN  # disjoint, covering
    assert train == [i for i in NYUD_TRAIN if i not in hold]  # list-file order kept
    assert ids("holdout") == hold  # deterministic
    assert {tuple(ids("holdout", s)) for s in range(8)} != {tuple(hold)}  # seed matters


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(tasks=["semseg", "parts"]), ValueError, "parts"),
        (dict(split="test"), ValueError, "test"),
        (dict(holdout=dict(fraction=1.5)), ValueError, "fraction"),
        (dict(holdout=dict(fraction=0.2, part="val")), ValueError, "part"),
        (dict(split="nope.txt"), FileNotFoundError, "nope.txt"),
    ],
)
def test_nyud_bad_arguments(nyud_root, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        build_dataset(dict(type="NYUDMTDataset", data_root=str(nyud_root), **kwargs))


def test_nonexistent_data_root_is_named(tmp_path):
    missing = tmp_path / "no_such_root"
    for typ in ("NYUDMTDataset", "PascalMTDataset"):
        with pytest.raises(FileNotFoundError, match="no_such_root"):
            build_dataset(dict(type=typ, data_root=str(missing)))


def test_missing_file_is_named_at_construction(nyud_root):
    (nyud_root / "depth" / "c.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"depth/c\.npy"):
        build_dataset(dict(type="NYUDMTDataset", data_root=str(nyud_root)))


def test_missing_and_mismatched_files_are_named_at_load(nyud_root):
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadMultiTaskAnnotations")]
    ds = build_dataset(dict(type="NYUDMTDataset", data_root=str(nyud_root), pipeline=pipeline))
    (nyud_root / "normals" / "a.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"normals/a\.npy"):
        ds[0]
    np.save(nyud_root / "depth" / "b.npy", np.ones((H + 1, W), np.float32))
    with pytest.raises(ValueError, match=r"depth/b\.npy.*images/b\.jpg"):
        ds[1]


def _nyud_loading(root):
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadMultiTaskAnnotations")]
    return build_dataset(dict(type="NYUDMTDataset", data_root=str(root), pipeline=pipeline))


def _damaged_jpeg(path) -> bytes:
    """A JPEG of the sample whose scan data has 40 zero bytes in its middle: libjpeg
    warns ("Corrupt JPEG data") and returns partly wrong pixels."""
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(path, quality=90)
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 40] = bytes(40)
    path.write_bytes(bytes(data))
    return bytes(data)


def test_damaged_images_fail_naming_the_file(nyud_root):
    ds = _nyud_loading(nyud_root)
    (nyud_root / "images" / "a.jpg").write_bytes(b"")
    with pytest.raises(OSError, match=r"images/a\.jpg.*empty"):
        ds[0]
    (nyud_root / "images" / "b.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(OSError, match=r"images/b\.jpg"):
        ds[1]
    _damaged_jpeg(nyud_root / "images" / "c.jpg")
    for t in ("segmentation", "depth", "normals", "edge"):  # maps of the new size
        src = next((nyud_root / t).glob("c.*"))
        if src.suffix == ".png":
            Image.fromarray(np.ones((48, 64), np.uint8)).save(src)
        elif t == "normals":
            np.save(src, np.tile(np.float32([0, 0, 1]), (48, 64, 1)))
        else:
            np.save(src, np.ones((48, 64), np.float32))
    with pytest.raises(OSError, match=r"images/c\.jpg.*Corrupt JPEG data"):
        ds[2]


def test_decoder_warning_can_be_logged_instead(tmp_path, monkeypatch):
    import cv2
    from mmcv.transforms import LoadImageFromFile as MMCVLoad
    from mmseg.registry import TRANSFORMS

    from mmseg_m3vit.datasets.transforms import loading

    logged = []
    monkeypatch.setattr(loading, "print_log", lambda msg, **kw: logged.append(msg))

    path = tmp_path / "damaged.jpg"
    data = _damaged_jpeg(path)
    with DefaultScope.overwrite_default_scope("mmseg"):
        load = TRANSFORMS.build(dict(type="LoadImageFromFile", on_decoder_warning="warn"))
    assert isinstance(load, MMCVLoad) and type(load) is not MMCVLoad
    out = load(dict(img_path=str(path)))
    expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(out["img"], expected)
    assert len(logged) == 1 and "damaged.jpg" in logged[0] and "Corrupt JPEG" in logged[0]


def test_normals_and_depth_values_are_checked(nyud_root):
    ds = _nyud_loading(nyud_root)
    a = 0.3 * nyud_blocks(0)
    unit = np.stack([np.sin(a), np.zeros_like(a), np.cos(a)], -1).astype(np.float32)
    # stored as 0..255 colours instead of [-1, 1]
    np.save(nyud_root / "normals" / "a.npy", np.round((unit + 1) * 127.5).astype(np.float32))
    with pytest.raises(ValueError, match=r"normals/a\.npy.*\[0, 255\].*\[-1, 1\]"):
        ds[0]
    # stored as (n + 1) / 2 in [0, 1]: in range but not unit length
    np.save(nyud_root / "normals" / "a.npy", ((unit + 1) / 2).astype(np.float32))
    with pytest.raises(ValueError, match=r"normals/a\.npy.*% of the valid vectors are not unit"):
        ds[0]
    # unit vectors with invalid (all-zero) pixels and float16-like rounding pass
    ok = np.round(unit, 3)
    ok[0, 0] = 0
    np.save(nyud_root / "normals" / "a.npy", ok)
    np.testing.assert_array_equal(ds[0]["gt_normal_map"], ok)
    depth = (nyud_blocks(1) + 1).astype(np.float32)
    depth[2, 3] = -0.5
    np.save(nyud_root / "depth" / "b.npy", depth)
    with pytest.raises(ValueError, match=r"depth/b\.npy.*1 negative values \(min -0\.5\)"):
        ds[1]


def test_nyud_full_pipeline_hand_checked(nyud_root):
    """Resize x2 (nearest for maps) then a certain horizontal flip: every map equals the
    block map upsampled and mirrored, normals' x negated."""
    pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadMultiTaskAnnotations"),
        dict(type="Resize", scale=(2 * W, 2 * H), keep_ratio=False),
        dict(type="MultiTaskRandomFlip", prob=1.0, direction="horizontal"),
        dict(type="PackMultiTaskInputs"),
    ]
    ds = build_dataset(
        dict(type="NYUDMTDataset", data_root=str(nyud_root), split="val", pipeline=pipeline)
    )
    out = ds[0]
    b = np.kron(nyud_blocks(4), np.ones((2, 2), np.int64))[:, ::-1]  # sample 'e' is k = 4
    seg = b.copy()
    seg[0:2, -2:] = 255  # the void pixel (0, 0), upsampled and mirrored
    sample = out["data_samples"]
    assert out["inputs"].shape == (3, 2 * H, 2 * W)
    np.testing.assert_array_equal(sample.gt_sem_seg.data[0].numpy(), seg)
    np.testing.assert_array_equal(sample.gt_depth_map.data[0].numpy(), b + 1.0)
    n = sample.gt_normal_map.data.numpy()
    np.testing.assert_allclose(n[0], -np.sin(0.3 * b), atol=1e-6)
    np.testing.assert_allclose(n[2], np.cos(0.3 * b), atol=1e-6)
    assert sample.metainfo["flip"] is True and sample.metainfo["sample_id"] == "e"
    assert sample.metainfo["ori_shape"] == (H, W)


def test_nyud_dataloader_with_preprocessor(nyud_root):
    pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadMultiTaskAnnotations"),
        dict(type="RandomChoiceResize", scales=[(W, H), (12, 9), (16, 12)], keep_ratio=False),
        dict(type="RandomCrop", crop_size=(H, W)),
        dict(type="MultiTaskRandomFlip", prob=0.5),
        dict(type="PackMultiTaskInputs"),
    ]
    ds = build_dataset(dict(type="NYUDMTDataset", data_root=str(nyud_root), pipeline=pipeline))
    loader = DataLoader(ds, batch_size=2, collate_fn=pseudo_collate, shuffle=False)
    pre = MODELS.build(
        dict(
            type="MultiTaskDataPreprocessor",
            mean=[123.675, 116.28, 103.53],
            std=[58.395, 57.12, 57.375],
            bgr_to_rgb=True,
            size=(8, 8),
        )
    )
    n_batches = 0
    for batch in loader:
        out = pre(batch, training=True)
        assert out["inputs"].shape == (2, 3, 8, 8)
        for s in out["data_samples"]:
            seg = s.gt_sem_seg.data[0]
            depth = s.gt_depth_map.data[0]
            normals = s.gt_normal_map.data
            assert seg.shape == (8, 8) and normals.shape == (3, 8, 8)
            assert (seg[H:] == 255).all() and (depth[H:] == 0).all() and (normals[:, H:] == 0).all()
            assert (s.gt_edge_map.data[0, H:] == 255).all()
            valid = seg[:H] != 255
            # relations written into the files survive resize / crop / flip / pad
            b = seg[:H][valid].double()
            torch.testing.assert_close(depth[:H][valid].double(), b + 1)
            sign = -1.0 if s.metainfo["flip"] else 1.0
            torch.testing.assert_close(
                normals[0, :H][valid].double(), sign * torch.sin(0.3 * b), atol=1e-6, rtol=0
            )
            assert s.metainfo["pad_shape"] == (8, 8)
        n_batches += 1
    assert n_batches == 2


# ----------------------------------------------------------------------------- PASCAL
PASCAL_IDS = ["p1", "p2"]

#: LabelMap of the edge .mat and its one-pixel boundaries written out by hand.
LABEL_MAP = np.ones((H, W), np.uint16)
LABEL_MAP[:, 4:] = 2
LABEL_MAP[5, :] = 3
EXPECTED_EDGE = np.zeros((H, W), np.uint8)
EXPECTED_EDGE[0:5, 3] = 1  # differs from the right neighbour
EXPECTED_EDGE[4, :] = 1  # differs from the lower neighbour (row 5 is label 3)


def _parts_mat(path) -> None:
    """p1: a person with head (0, 0:2) and left upper arm (1, 0) and right lower leg
    (2, 1), plus a dog (no parts)."""
    head, luarm, rlleg = (np.zeros((H, W), np.uint8) for _ in range(3))
    head[0, 0:2] = 1
    luarm[1, 0] = 1
    rlleg[2, 1] = 1
    parts = np.zeros((1, 3), dtype=[("part_name", object), ("mask", object)])
    for j, (name, m) in enumerate((("head", head), ("luarm", luarm), ("rlleg", rlleg))):
        parts["part_name"][0, j] = name
        parts["mask"][0, j] = m
    fields = ("class", "class_ind", "mask", "parts")
    objs = np.zeros((1, 2), dtype=[(f, object) for f in fields])
    objs["class"][0, 0], objs["class_ind"][0, 0] = "person", 15
    objs["mask"][0, 0], objs["parts"][0, 0] = head | luarm | rlleg, parts
    objs["class"][0, 1], objs["class_ind"][0, 1] = "dog", 12
    objs["mask"][0, 1], objs["parts"][0, 1] = np.ones((H, W), np.uint8), np.zeros((0, 0))
    scipy.io.savemat(path, {"anno": {"imname": "p1", "objects": objs}})


def write_pascal(root) -> None:
    for sub in (
        "JPEGImages",
        "ImageSets/Context",
        "semseg/pascal-context",
        "human_parts",
        "normals_distill",
        "sal_distill",
        "pascal-context/trainval",
    ):
        os.makedirs(root / sub, exist_ok=True)
    for sid in PASCAL_IDS:
        Image.fromarray(np.full((H, W, 3), 100, np.uint8)).save(root / "JPEGImages" / f"{sid}.jpg")
        seg = np.full((H, W), 15, np.uint8)
        seg[:, 0] = 0
        seg[0, 7] = 255
        Image.fromarray(seg).save(root / "semseg/pascal-context" / f"{sid}.png")
        nrm = np.zeros((H, W, 3), np.uint8)
        nrm[:, :, 2] = 255
        nrm[0, 0] = [255, 0, 255]
        Image.fromarray(nrm).save(root / "normals_distill" / f"{sid}.png")
        sal = np.full((H, W), 127, np.uint8)
        sal[:, 4:] = 128
        Image.fromarray(sal).save(root / "sal_distill" / f"{sid}.png")
        scipy.io.savemat(root / "pascal-context/trainval" / f"{sid}.mat", {"LabelMap": LABEL_MAP})
    _parts_mat(root / "human_parts" / "p1.mat")  # p2 has no parts annotation
    (root / "ImageSets/Context/train.txt").write_text("p1\np2\n")
    (root / "ImageSets/Context/val.txt").write_text("p2\n")


@pytest.fixture()
def pascal_root(tmp_path):
    root = tmp_path / "pascal"
    write_pascal(root)
    return root


def test_pascal_maps_hand_checked(pascal_root):
    pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadMultiTaskAnnotations"),
        dict(type="PackMultiTaskInputs"),
    ]
    ds = build_dataset(dict(type="PascalMTDataset", data_root=str(pascal_root), pipeline=pipeline))
    assert len(ds) == 2 and ds.metainfo["tasks"] == ["semseg", "parts", "sal", "normals", "edge"]
    assert ds.get_data_info(1)["ann_paths"]["parts"] is None
    s1, s2 = ds[0]["data_samples"], ds[1]["data_samples"]

    seg = s1.gt_sem_seg.data[0].numpy()
    assert seg[0, 0] == 0 and seg[1, 3] == 15 and seg[0, 7] == 255

    parts = np.zeros((H, W), np.int64)
    parts[0, 0:2] = 1  # head
    parts[1, 0] = 3  # upper arm
    parts[2, 1] = 6  # lower leg
    np.testing.assert_array_equal(s1.gt_parts_seg.data[0].numpy(), parts)
    assert (s2.gt_parts_seg.data == 255).all()  # no parts file: ignored everywhere

    sal = np.zeros((H, W), np.int64)
    sal[:, 4:] = 1  # 128 / 255 > 0.5 >= 127 / 255
    np.testing.assert_array_equal(s1.gt_sal_map.data[0].numpy(), sal)

    n = s1.gt_normal_map.data.numpy()
    np.testing.assert_allclose(n[:, 0, 0], [1.0, -1.0, 1.0])
    np.testing.assert_allclose(n[:, 3, 3], [-1.0, -1.0, 1.0])

    np.testing.assert_array_equal(s1.gt_edge_map.data[0].numpy(), EXPECTED_EDGE)


def test_pascal_missing_optional_and_required_files(pascal_root):
    # parts are optional per image, saliency is not
    (pascal_root / "sal_distill" / "p2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"sal_distill/p2\.png"):
        build_dataset(dict(type="PascalMTDataset", data_root=str(pascal_root)))
    ds = build_dataset(
        dict(type="PascalMTDataset", data_root=str(pascal_root), tasks=["semseg", "parts"])
    )
    assert len(ds) == 2


def test_pascal_edges_are_seism_seg2bmap(tmp_path):
    """Hand-derived BSDS/SEISM seg2bmap: a pixel is a boundary when its label differs
    from its east, south or south-east neighbour (last row: east only, last column:
    south only, bottom-right never)."""
    from mmseg_m3vit.datasets.transforms.loading import DECODERS

    labels = np.array([[0, 0, 2, 2], [0, 1, 2, 2], [3, 3, 3, 2]])
    scipy.io.savemat(tmp_path / "l.mat", {"LabelMap": labels})
    expected = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 0]], np.uint8)
    # (0, 0) is a boundary only through its south-east neighbour (label 1)
    np.testing.assert_array_equal(DECODERS[("pascal", "edge")](str(tmp_path / "l.mat")), expected)


def test_pascal_size_mismatch_is_named(pascal_root):
    scipy.io.savemat(
        pascal_root / "pascal-context/trainval" / "p2.mat", {"LabelMap": np.ones((H, W + 2))}
    )
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadMultiTaskAnnotations")]
    ds = build_dataset(
        dict(type="PascalMTDataset", data_root=str(pascal_root), split="val", pipeline=pipeline)
    )
    with pytest.raises(ValueError, match=r"trainval/p2\.mat.*\(6, 10\).*p2\.jpg.*\(6, 8\)"):
        ds[0]


def test_pascal_dataloader_with_preprocessor(pascal_root):
    pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadMultiTaskAnnotations"),
        dict(type="RandomResize", scale=(W, H), ratio_range=(1.0, 1.5), keep_ratio=True),
        dict(type="RandomCrop", crop_size=(H, W)),
        dict(type="MultiTaskRandomFlip", prob=1.0),
        dict(type="PackMultiTaskInputs"),
    ]
    ds = build_dataset(dict(type="PascalMTDataset", data_root=str(pascal_root), pipeline=pipeline))
    loader = DataLoader(ds, batch_size=2, collate_fn=pseudo_collate)
    pre = MODELS.build(dict(type="MultiTaskDataPreprocessor", size_divisor=4))
    (batch,) = list(loader)
    out = pre(batch, training=True)
    assert out["inputs"].shape == (2, 3, 8, 8)
    s1, s2 = out["data_samples"]
    assert (s2.gt_parts_seg.data == 255).all()
    for s in (s1, s2):
        assert (s.gt_sal_map.data[0, H:] == 255).all()
        assert (s.gt_normal_map.data[:, H:] == 0).all()
        assert set(torch.unique(s.gt_sal_map.data[0, :H]).tolist()) <= {0, 1}
        # flipped: distilled normals had x = -1 except pixel (0, 0); now x = +1 mostly
        assert (s.gt_normal_map.data[0, :H] > 0).float().mean() > 0.9
