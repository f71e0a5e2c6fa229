"""The synthetic NYUD-MT generator: layout, consistency of the tasks, determinism.

Every check recomputes what it expects from the written files (and the intrinsics in
meta.json) with its own numpy code, never with the generator's helpers.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from mmengine.dataset import pseudo_collate
from mmengine.registry import DefaultScope
from mmseg.registry import DATASETS, MODELS
from PIL import Image
from torch.utils.data import DataLoader

import mmseg_m3vit  # noqa: F401  (registers everything)
from mmseg_m3vit.datasets.synthetic_nyud import CLASS_IDS, generate

SIZE = (48, 64)
NUM_TRAIN, NUM_VAL = 3, 1
IDS = [f"{i:06d}" for i in range(NUM_TRAIN + NUM_VAL)]
FLOOR, WALL, CEILING, WINDOW = 2, 1, 22, 9


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "nyud"
    generate(str(root), NUM_TRAIN, NUM_VAL, SIZE, seed=3, workers=1, progress=False)
    return root


def load(root: Path, sid: str) -> dict[str, np.ndarray]:
    return dict(
        image=np.asarray(Image.open(root / "images" / f"{sid}.jpg")),
        seg=np.asarray(Image.open(root / "segmentation" / f"{sid}.png")),
        depth=np.load(root / "depth" / f"{sid}.npy"),
        normals=np.load(root / "normals" / f"{sid}.npy"),
        edge=np.load(root / "edge" / f"{sid}.npy"),
    )


def rays(root: Path) -> np.ndarray:
    """(H, W, 3) camera-frame ray directions (x right, y up, z towards the camera) with
    forward component 1, from the intrinsics the generator wrote."""
    k = json.loads((root / "meta.json").read_text())["intrinsics"]
    v, u = np.mgrid[0 : SIZE[0], 0 : SIZE[1]]
    x = (u + 0.5 - k["cx"]) / k["fx"]
    y = -(v + 0.5 - k["cy"]) / k["fy"]
    return np.stack([x, y, -np.ones_like(x)], axis=-1)


def test_layout(synth):
    assert (synth / "gt_sets" / "train.txt").read_text().split() == IDS[:NUM_TRAIN]
    assert (synth / "gt_sets" / "val.txt").read_text().split() == IDS[NUM_TRAIN:]
    for sid in IDS:
        s = load(synth, sid)
        assert s["image"].shape == (*SIZE, 3) and s["image"].dtype == np.uint8
        assert s["seg"].shape == SIZE and s["seg"].dtype == np.uint8
        assert s["depth"].shape == SIZE and s["depth"].dtype == np.float32
        assert s["normals"].shape == (*SIZE, 3) and s["normals"].dtype == np.float32
        assert s["edge"].shape == SIZE
    assert not [p for p in os.listdir(synth.parent) if "tmp" in p]  # temp folder renamed


@pytest.mark.parametrize("sid", IDS)
def test_maps_are_consistent(synth, sid):
    s = load(synth, sid)
    seg, depth, normals, edge = s["seg"], s["depth"], s["normals"], s["edge"]
    # labels: NYUv2-40 ids of the generator's classes
    assert set(np.unique(seg).tolist()) <= set(CLASS_IDS.values())
    assert seg.min() >= 1 and seg.max() <= 40
    # depth > 0 where valid; invalid only on window glass; normals zero exactly there
    valid = depth > 0
    assert valid.mean() > 0.5
    assert np.all(seg[~valid] == WINDOW)
    assert 0.05 < depth[valid].min() and depth[valid].max() < 15.0
    np.testing.assert_allclose(np.linalg.norm(normals[valid], axis=-1), 1.0, atol=1e-4)
    assert np.all(normals[~valid] == 0)
    # normals face the camera (camera frame: x right, y up, z towards the camera);
    # silhouette pixels may graze (cos ~ 1e-5)
    facing = np.einsum("hwc,hwc->hw", normals, rays(synth))
    assert np.all(facing[valid] < 1e-4)
    # room geometry: camera pitched down 5-25 deg, no roll
    assert np.all(normals[(seg == FLOOR) & valid][:, 1] > 0.85)
    assert np.all(normals[(seg == CEILING) & valid][:, 1] < -0.85)
    assert np.all(np.abs(normals[(seg == WALL) & valid][:, 1]) < 0.45)
    # edges: binary; every label boundary (pixel differs from its right / lower
    # neighbour) is an edge; every edge is a label boundary or a > 5 % depth jump
    assert set(np.unique(edge).tolist()) <= {0, 1}
    lab = np.zeros(SIZE, bool)
    lab[:, :-1] |= seg[:, :-1] != seg[:, 1:]
    lab[:-1, :] |= seg[:-1, :] != seg[1:, :]
    jump = np.zeros(SIZE, bool)
    for a, b, sl in (
        (depth[:, :-1], depth[:, 1:], np.s_[:, :-1]),
        (depth[:-1, :], depth[1:, :], np.s_[:-1, :]),
    ):
        both = (a > 0) & (b > 0)
        jump[sl] |= both & (np.abs(a - b) > 0.05 * np.minimum(a, b))
    assert np.all(edge[lab] == 1)
    assert np.all(lab | jump | (edge == 0))


def test_depth_and_normals_describe_the_same_floor(synth):
    """Back-project the floor with the depth and the intrinsics: the points lie on a
    plane whose normal is the floor's normal in the normal map."""
    best = max(IDS, key=lambda sid: (load(synth, sid)["seg"] == FLOOR).sum())
    s = load(synth, best)
    floor = (s["seg"] == FLOOR) & (s["depth"] > 0)
    assert floor.sum() > 100
    pts = rays(synth)[floor] * s["depth"][floor][:, None]
    centred = pts - pts.mean(0)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    plane_normal = vt[-1]
    assert sv[-1] / np.sqrt(len(pts)) < 2e-3  # RMS distance to the plane < 2 mm
    mean_normal = s["normals"][floor].mean(0)
    assert abs(plane_normal @ mean_normal) > 0.999


def test_same_seed_same_files_any_worker_count(synth, tmp_path):
    again = tmp_path / "again"
    generate(str(again), NUM_TRAIN, NUM_VAL, SIZE, seed=3, workers=2, progress=False)
    files = sorted(p.relative_to(synth) for p in synth.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (synth / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = tmp_path / "other"
    generate(str(other), 1, 0, SIZE, seed=4, workers=1, progress=False)
    assert not np.array_equal(load(other, IDS[0])["depth"], load(synth, IDS[0])["depth"])


def test_existing_output_is_refused(synth):
    with pytest.raises(FileExistsError, match=str(synth)):
        generate(str(synth), 1, 0, SIZE, seed=3, progress=False)


def test_overwrite_replaces_atomically(tmp_path):
    out = tmp_path / "over"
    generate(str(out), 1, 0, (16, 24), seed=1, workers=1, progress=False)
    first = np.load(out / "depth" / "000000.npy")
    generate(str(out), 2, 0, (16, 24), seed=2, workers=1, progress=False, overwrite=True)
    assert (out / "gt_sets" / "train.txt").read_text().split() == IDS[:2]
    assert not np.array_equal(np.load(out / "depth" / "000000.npy"), first)
    assert sorted(os.listdir(tmp_path)) == ["over"]  # no temp or old folders left


def test_cli_writes_the_layout(tmp_path):
    path = Path(__file__).parents[1] / "tools" / "dataset_converters" / "make_synthetic_nyud.py"
    spec = importlib.util.spec_from_file_location("make_synthetic_nyud_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--num-train", "1", "--num-val", "1", "--size", "16", "24"]
    assert cli.main(argv + ["--seed", "1", "--workers", "1", "--quiet"]) == 0
    assert np.load(out / "depth" / "000001.npy").shape == (16, 24)
    assert (out / "gt_sets" / "val.txt").read_text().split() == ["000001"]


def test_generated_data_through_the_full_pipeline(synth):
    pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadMultiTaskAnnotations"),
        dict(type="RandomChoiceResize", scales=[(64, 48), (77, 58), (96, 72)], keep_ratio=True),
        dict(type="RandomCrop", crop_size=SIZE),
        dict(type="MultiTaskRandomFlip", prob=0.5),
        dict(type="PackMultiTaskInputs"),
    ]
    with DefaultScope.overwrite_default_scope("mmseg"):
        ds = DATASETS.build(dict(type="NYUDMTDataset", data_root=str(synth), pipeline=pipeline))
    pre = MODELS.build(dict(type="MultiTaskDataPreprocessor", size_divisor=16, bgr_to_rgb=True))
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=pseudo_collate)))
    out = pre(batch, training=True)
    assert out["inputs"].shape == (3, 3, 48, 64)
    for s in out["data_samples"]:
        seg = s.gt_sem_seg.data[0]
        assert seg.max() <= 39 and (seg >= 0).all()  # file ids 1..40 -> 0..39
        n = s.gt_normal_map.data
        valid = s.gt_depth_map.data[0] > 0
        norms = n.norm(dim=0)[valid]
        assert (norms - 1).abs().max() < 1e-4
