"""Loading images and every dense task map of NYUD-MT and PASCAL-MT, with checks.

The data sets put into each ``data_info``:

- ``img_path``: the RGB image;
- ``ann_paths``: ``{task: path}`` for the chosen tasks (PASCAL ``parts`` may be ``None``:
  the image has no human-parts annotation);
- ``dataset``: ``'nyud'`` or ``'pascal'``, which selects how each file is decoded.

:class:`LoadMultiTaskAnnotations` reads those files, decodes them into the maps of the
task table (:mod:`mmseg_m3vit.tasks`) and registers each under ``TaskSpec.results_key``
in ``results['seg_fields']`` so that mmseg's geometric transforms move every map. Maps
whose values cannot be right fail naming the file, what was found and what is expected
(normals outside [-1, 1] or far from unit length, negative depths, labels out of range).

:class:`LoadImageFromFile` is mmcv's image loader, registered under the same name in
mmseg's registry (so every config of the plugin uses it), plus: an empty or undecodable
file fails naming the file, and a decoder warning (libjpeg's "Corrupt JPEG data ...",
printed to the C-level stderr while the image still decodes, to garbage) fails naming
the file too, or with ``on_decoder_warning='warn'`` is logged with the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import scipy.io
from mmcv.transforms import BaseTransform
from mmcv.transforms import LoadImageFromFile as MMCVLoadImageFromFile
from mmengine.logging import print_log
from mmseg.registry import TRANSFORMS
from PIL import Image

from mmseg_m3vit.datasets.edge_utils import seg2bmap
from mmseg_m3vit.tasks import DATASET_TASKS, check_tasks, get_task

#: PASCAL VOC class index of 'person' in the PASCAL-Part ``anno.objects.class_ind`` field.
PASCAL_PERSON_CLASS = 15

#: PASCAL-Part person part names -> the 7-class human-parts labels of the MTL literature
#: (0 background, 1 head, 2 torso, 3 upper arm, 4 lower arm / hand, 5 upper leg,
#: 6 lower leg / foot).
PASCAL_PART_TO_ID: dict[str, int] = {
    "hair": 1, "head": 1, "lear": 1, "lebrow": 1, "leye": 1, "mouth": 1, "nose": 1,
    "rear": 1, "rebrow": 1, "reye": 1,
    "neck": 2, "torso": 2,
    "luarm": 3, "ruarm": 3,
    "llarm": 4, "rlarm": 4, "lhand": 4, "rhand": 4,
    "luleg": 5, "ruleg": 5,
    "llleg": 6, "rlleg": 6, "lfoot": 6, "rfoot": 6,
}  # fmt: skip

IGNORE = 255
#: Normals: values may exceed [-1, 1] by this much (float rounding) ...
NORMALS_RANGE_SLACK = 1e-3
#: ... and a valid (non-zero) vector counts as unit length within this distance of 1;
NORMALS_UNIT_TOLERANCE = 0.1
#: a map fails when more than this fraction of its valid vectors are not unit length.
NORMALS_MAX_NON_UNIT_FRACTION = 0.01


@contextlib.contextmanager
def _capture_c_stderr() -> Iterator[list[str]]:
    """Collect what C libraries (libjpeg, libpng via OpenCV) print to file descriptor 2
    inside the block; the text is in the yielded list afterwards."""
    captured: list[str] = []
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError):
        pass
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", errors="replace").strip()
            if text:
                captured.append(text)


@TRANSFORMS.register_module(name="LoadImageFromFile")
class LoadImageFromFile(MMCVLoadImageFromFile):
    """mmcv's ``LoadImageFromFile`` with errors that name the file.

    Same arguments and results as mmcv's (``img``, ``img_shape``, ``ori_shape``), plus:

    Args:
        on_decoder_warning: what to do when the decoder prints a warning while still
            returning an image (libjpeg: "Corrupt JPEG data: ... extraneous bytes",
            "Premature end of JPEG file"): ``'error'`` (default) raises ``OSError``
            naming the file and the decoder's message; ``'warn'`` logs a warning with
            both and keeps the image.

    Raises (at call time):
        FileNotFoundError: the file does not exist. OSError: it is empty, cannot be
        decoded, or (``'error'``) decoded with a warning; each names the file.
    """

    def __init__(self, *args, on_decoder_warning: str = "error", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if on_decoder_warning not in ("error", "warn"):
            raise ValueError(
                f"on_decoder_warning must be 'error' or 'warn', got {on_decoder_warning!r}"
            )
        self.on_decoder_warning = on_decoder_warning

    def transform(self, results: dict) -> dict | None:
        path = results["img_path"]
        local = self.file_client_args is None and not self.backend_args
        if local:
            if not os.path.isfile(path):
                if self.ignore_empty:
                    return None
                raise FileNotFoundError(f"image file {path!r} does not exist")
            if os.path.getsize(path) == 0:
                if self.ignore_empty:
                    return None
                raise OSError(f"image file {path!r} is empty (0 bytes)")
        try:
            with _capture_c_stderr() as messages:
                out = super().transform(results)
        except Exception as exc:
            raise OSError(
                f"cannot decode image file {path!r}: {type(exc).__name__}: {exc}"
            ) from exc
        if messages:
            text = " | ".join(" ".join(m.split()) for m in messages)
            if self.on_decoder_warning == "error":
                raise OSError(
                    f"image file {path!r} is damaged: the decoder reported {text!r} and "
                    "would return partly invalid pixels. Replace the file, or pass "
                    "on_decoder_warning='warn' to LoadImageFromFile to use it anyway"
                )
            print_log(
                f"image file {path!r}: decoder warning {text!r}",
                logger="current",
                level=logging.WARNING,
            )
        return out

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", on_decoder_warning={self.on_decoder_warning!r})"


def _open(path: str, reader: Callable[[str], object], what: str) -> object:
    """Run ``reader(path)``, turning a missing/unreadable file into an error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path!r} does not exist")
    try:
        return reader(path)
    except Exception as exc:  # any decoder failure: say which file
        raise OSError(f"cannot read {what} file {path!r}: {type(exc).__name__}: {exc}") from exc


def _read_png(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _read_mat(path: str) -> dict:
    return scipy.io.loadmat(path)


def _expect_2d(arr: np.ndarray, path: str, what: str) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2:
        raise ValueError(f"{what} file {path!r}: expected an (H, W) map, got shape {arr.shape}")
    return arr


def _check_range(arr: np.ndarray, lo: int, hi: int, path: str, what: str, void: str) -> None:
    bad = (arr != IGNORE) & ((arr < lo) | (arr > hi))
    if bad.any():
        raise ValueError(
            f"{what} file {path!r}: values {sorted(np.unique(arr[bad]).tolist())[:10]} are "
            f"outside the expected {void}{lo}..{hi} (and {IGNORE} = ignore)"
        )


# ----------------------------------------------------------------------------- NYUD-MT
def _nyud_semseg(path: str) -> np.ndarray:
    """png, 0 = void, 1..40 classes -> uint8 0..39, void -> 255."""
    raw = _expect_2d(_open(path, _read_png, "NYUD semseg"), path, "NYUD semseg").astype(np.int64)
    _check_range(raw, 0, 40, path, "NYUD semseg", "0 (void) or ")
    out = raw - 1
    out[(raw == 0) | (raw == IGNORE)] = IGNORE
    return out.astype(np.uint8)


def _nyud_depth(path: str) -> np.ndarray:
    """npy in metres, 0 = invalid -> float32 (H, W)."""
    depth = _expect_2d(np.asarray(_open(path, np.load, "NYUD depth")), path, "NYUD depth")
    depth = depth.astype(np.float32)
    finite = np.isfinite(depth)
    if not finite.all() or (depth[finite] < 0).any():
        raise ValueError(
            f"NYUD depth file {path!r}: expected finite depths >= 0 metres (0 = invalid); "
            f"found {int((~finite).sum())} non-finite and {int((depth[finite] < 0).sum())} "
            f"negative values (min {float(depth[finite].min()) if finite.any() else 'n/a'})"
        )
    return depth


def _nyud_normals(path: str) -> np.ndarray:
    """npy (H, W, 3) unit vectors in [-1, 1], all-zero = invalid -> float32."""
    normals = np.asarray(_open(path, np.load, "NYUD normals"))
    if normals.ndim != 3 or normals.shape[2] != 3:
        raise ValueError(f"NYUD normals file {path!r}: expected (H, W, 3), got {normals.shape}")
    normals = normals.astype(np.float32)
    if not np.isfinite(normals).all():
        raise ValueError(f"NYUD normals file {path!r} contains non-finite values")
    check_normals(normals, path, "NYUD normals")
    return normals


def check_normals(normals: np.ndarray, path: str, what: str) -> None:
    """Fail unless ``normals`` (H, W, 3) are in [-1, 1] and the valid (non-zero) ones
    unit length (within :data:`NORMALS_UNIT_TOLERANCE`, allowing
    :data:`NORMALS_MAX_NON_UNIT_FRACTION` of them to deviate).

    Raises:
        ValueError: naming the file, the range or the fraction of non-unit vectors
            found, and what is expected (maps stored as 0..255 or 0..1 fail here).
    """
    lo, hi = float(normals.min(initial=0.0)), float(normals.max(initial=0.0))
    if lo < -1 - NORMALS_RANGE_SLACK or hi > 1 + NORMALS_RANGE_SLACK:
        raise ValueError(
            f"{what} file {path!r}: values range over [{lo:.4g}, {hi:.4g}]; expected unit "
            "vectors with components in [-1, 1] (all-zero = invalid). Maps stored as "
            "0..255 colours must be converted: n = 2 * v / 255 - 1"
        )
    norm = np.linalg.norm(normals.reshape(-1, 3).astype(np.float64), axis=1)
    norm = norm[norm > 0]
    if norm.size == 0:
        return
    off = np.abs(norm - 1.0) > NORMALS_UNIT_TOLERANCE
    if off.mean() > NORMALS_MAX_NON_UNIT_FRACTION:
        raise ValueError(
            f"{what} file {path!r}: {100 * off.mean():.1f}% of the valid vectors are not "
            f"unit length (lengths {norm.min():.3g}..{norm.max():.3g}, median "
            f"{np.median(norm):.3g}); expected unit vectors (|n| = 1 +- "
            f"{NORMALS_UNIT_TOLERANCE}), all-zero where invalid"
        )


def _nyud_edge(path: str) -> np.ndarray:
    """npy binary edge map -> uint8 {0, 1}."""
    edge = _expect_2d(np.asarray(_open(path, np.load, "NYUD edge")), path, "NYUD edge")
    return (edge > 0).astype(np.uint8)


# ----------------------------------------------------------------------------- PASCAL-MT
def _pascal_semseg(path: str) -> np.ndarray:
    """png with the 21-class VOC ids (0 = background), 255 = ignore -> uint8."""
    raw = _expect_2d(_open(path, _read_png, "PASCAL semseg"), path, "PASCAL semseg")
    _check_range(raw.astype(np.int64), 0, 20, path, "PASCAL semseg", "")
    return raw.astype(np.uint8)


def pascal_parts_from_mat(mat: dict, path: str = "<mat>") -> np.ndarray | None:
    """Decode a PASCAL-Part annotation into the 7-class human-parts map.

    Every object of class ``person`` (``class_ind`` 15) that has part masks paints its
    parts with :data:`PASCAL_PART_TO_ID`; other pixels are background 0.

    Returns:
        uint8 (H, W) map, or ``None`` when the file holds no person with parts.
    """
    try:
        objects = mat["anno"][0, 0]["objects"].ravel()
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"PASCAL parts file {path!r}: no 'anno.objects' struct") from exc
    target = None
    for obj in objects:
        if int(np.asarray(obj["class_ind"]).ravel()[0]) != PASCAL_PERSON_CLASS:
            continue
        parts = np.asarray(obj["parts"]).ravel()
        if parts.size == 0:
            continue
        if target is None:
            target = np.zeros(np.asarray(obj["mask"]).shape, dtype=np.uint8)
        for part in parts:
            name = str(np.asarray(part["part_name"]).ravel()[0])
            if name not in PASCAL_PART_TO_ID:
                raise ValueError(f"PASCAL parts file {path!r}: unknown person part {name!r}")
            target[np.asarray(part["mask"]).astype(bool)] = PASCAL_PART_TO_ID[name]
    return target


def _pascal_parts(path: str) -> np.ndarray | None:
    return pascal_parts_from_mat(_open(path, _read_mat, "PASCAL parts"), path)


def _pascal_sal(path: str) -> np.ndarray:
    """grey png in [0, 255], binarised at 0.5 -> uint8 {0, 1}."""
    raw = _open(path, _read_png, "PASCAL saliency")
    if raw.ndim == 3:  # RGB(A) saliency: use the first channel (they are equal)
        raw = raw[:, :, 0]
    return (raw.astype(np.float32) / 255.0 > 0.5).astype(np.uint8)


def _pascal_normals(path: str) -> np.ndarray:
    """RGB png in [0, 255] -> float32 (H, W, 3) in [-1, 1] (2 * v / 255 - 1)."""
    raw = _open(path, _read_png, "PASCAL normals")
    if raw.ndim != 3 or raw.shape[2] < 3:
        raise ValueError(f"PASCAL normals file {path!r}: expected an RGB png, got {raw.shape}")
    return (2.0 * raw[:, :, :3].astype(np.float32) / 255.0 - 1.0).astype(np.float32)


def _pascal_edge(path: str) -> np.ndarray:
    """pascal-context ``LabelMap`` .mat -> uint8 {0, 1} boundary map of the label map
    (SEISM's ``seg2bmap``, :func:`~mmseg_m3vit.datasets.edge_utils.seg2bmap`)."""
    mat = _open(path, _read_mat, "PASCAL edge")
    if "LabelMap" not in mat:
        raise ValueError(f"PASCAL edge file {path!r}: no 'LabelMap' variable")
    labels = _expect_2d(np.asarray(mat["LabelMap"]), path, "PASCAL edge")
    return seg2bmap(labels).astype(np.uint8)


#: (data set, task) -> decoder(path) -> map in the task table's convention.
DECODERS: dict[tuple[str, str], Callable[[str], np.ndarray | None]] = {
    ("nyud", "semseg"): _nyud_semseg,
    ("nyud", "depth"): _nyud_depth,
    ("nyud", "normals"): _nyud_normals,
    ("nyud", "edge"): _nyud_edge,
    ("pascal", "semseg"): _pascal_semseg,
    ("pascal", "parts"): _pascal_parts,
    ("pascal", "sal"): _pascal_sal,
    ("pascal", "normals"): _pascal_normals,
    ("pascal", "edge"): _pascal_edge,
}


@TRANSFORMS.register_module()
class LoadMultiTaskAnnotations(BaseTransform):
    """Load the ground-truth map of every chosen task.

    Required keys: ``img`` (put ``LoadImageFromFile`` first), ``ann_paths``, ``dataset``.
    Added keys: ``TaskSpec.results_key`` of each task (see :mod:`mmseg_m3vit.tasks` for
    dtypes and shapes), each appended to ``seg_fields``.

    PASCAL human parts: an image without a parts annotation (``ann_paths['parts']`` is
    ``None``) or whose file holds no person with parts gets an all-255 (ignore) map, so
    it adds nothing to the parts loss or metric.

    Args:
        tasks: tasks to load; ``None`` loads every task in ``ann_paths``.

    Raises (at call time):
        FileNotFoundError / OSError: a map file is missing or unreadable (names the file).
        ValueError: a map's size differs from its image's (names both files), or its
            contents are out of range.
    """

    def __init__(self, tasks: Sequence[str] | None = None) -> None:
        super().__init__()
        if tasks is not None:
            tasks = check_tasks(tasks, sorted({t for d in DATASET_TASKS.values() for t in d}))
        self.tasks = tasks

    def transform(self, results: dict) -> dict:
        for key in ("img", "ann_paths", "dataset"):
            if key not in results:
                raise KeyError(
                    f"LoadMultiTaskAnnotations needs results[{key!r}] (sample "
                    f"{results.get('img_path')!r}); use a multi-task data set and put "
                    "LoadImageFromFile before it"
                )
        dataset = results["dataset"]
        ann_paths: dict = results["ann_paths"]
        tasks = list(ann_paths) if self.tasks is None else self.tasks
        missing = [t for t in tasks if t not in ann_paths]
        if missing:
            raise KeyError(
                f"tasks {missing} were asked for but the data set did not list their files "
                f"for {results.get('img_path')!r} (it has {list(ann_paths)})"
            )
        img_hw = tuple(results["img"].shape[:2])
        seg_fields = results.setdefault("seg_fields", [])
        for task in tasks:
            spec = get_task(task)
            decoder = DECODERS.get((dataset, task))
            if decoder is None:
                raise KeyError(f"no decoder for task {task!r} of data set {dataset!r}")
            path = ann_paths[task]
            gt = None if path is None else decoder(path)
            if gt is None:  # PASCAL parts: no person parts in this image
                gt = np.full(img_hw, IGNORE, dtype=np.uint8)
            if tuple(gt.shape[:2]) != img_hw:
                raise ValueError(
                    f"{task} map {path!r} has size {tuple(gt.shape[:2])} but its image "
                    f"{results.get('img_path')!r} has size {img_hw} (H, W)"
                )
            results[spec.results_key] = gt
            if spec.results_key not in seg_fields:
                seg_fields.append(spec.results_key)
        return results

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(tasks={self.tasks})"
