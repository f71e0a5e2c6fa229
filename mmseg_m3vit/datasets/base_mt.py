"""Shared machinery of the multi-task data sets (NYUD-MT, PASCAL-MT).

A data set is a list of sample ids (a split list file) and, per task, a folder and a
file suffix. Each ``data_info`` holds::

    img_path    path of the RGB image
    ann_paths   {task: path} for the chosen tasks only (None: no annotation, see subclass)
    dataset     'nyud' | 'pascal' (selects the decoders of LoadMultiTaskAnnotations)
    sample_id   the id from the list file
    seg_fields  [] (filled by LoadMultiTaskAnnotations)

Hold-out: ``holdout=dict(fraction=0.1, seed=0, part='train')`` splits the ids of the
chosen list deterministically (a seeded permutation picks ``round(fraction * n)`` ids,
at least one) and keeps ``part='train'`` (the rest) or ``part='holdout'`` (the picked
ids), in list-file order. Two data sets with the same split, fraction and seed and the
two parts are disjoint and cover the list: a training config can validate on part of
train and keep the official val split untouched until the end.
"""

from __future__ import annotations

import os
import os.path as osp
from collections.abc import Sequence

import numpy as np
from mmengine.dataset import BaseDataset

from mmseg_m3vit.tasks import DATASET_TASKS, check_tasks


class BaseMultiTaskDataset(BaseDataset):
    """Base class; subclasses set the layout attributes below and ``METAINFO``.

    Args:
        data_root: folder of the data set; must exist.
        split: ``'train'`` / ``'val'`` (the standard list files) or the path of a list
            file with one id per line (relative paths are taken under ``data_root``).
        tasks: tasks to load (default: all tasks of the data set); validated against
            ``DATASET_TASKS[DATASET]``. Only these tasks' files are checked and read.
        holdout: optional ``dict(fraction, seed=0, part='train' | 'holdout')``, see the
            module docstring.
        pipeline, test_mode, lazy_init, indices, serialize_data, max_refetch: as in
            mmengine's ``BaseDataset``.

    Raises:
        FileNotFoundError: ``data_root``, the list file, a task folder or a required
            file is missing (all named).
        ValueError: unknown tasks or split, empty list file, bad ``holdout``.
    """

    DATASET: str = ""
    IMG_DIR: str = ""
    IMG_SUFFIX: str = ".jpg"
    #: task -> (folder relative to data_root, file suffix)
    TASK_FILES: dict[str, tuple[str, str]] = {}
    #: split name -> list file relative to data_root
    SPLIT_FILES: dict[str, str] = {}
    #: tasks whose file may be absent for some ids (ann_paths[task] = None then)
    OPTIONAL_TASKS: frozenset[str] = frozenset()

    def __init__(
        self,
        data_root: str,
        split: str = "train",
        tasks: Sequence[str] | None = None,
        holdout: dict | None = None,
        pipeline: Sequence = (),
        test_mode: bool = False,
        lazy_init: bool = False,
        indices: int | Sequence[int] | None = None,
        serialize_data: bool = True,
        max_refetch: int = 1000,
        metainfo: dict | None = None,
    ) -> None:
        if not data_root or not osp.isdir(data_root):
            raise FileNotFoundError(
                f"{type(self).__name__}: data_root {data_root!r} does not exist or is not a folder"
            )
        valid = list(DATASET_TASKS[self.DATASET])
        self.tasks = check_tasks(valid if tasks is None else tasks, valid, what="tasks")
        self.split = split
        self.holdout = self._check_holdout(holdout)
        meta = dict(
            tasks=list(self.tasks),
            task_channels={t: DATASET_TASKS[self.DATASET][t] for t in self.tasks},
        )
        meta.update(metainfo or {})
        super().__init__(
            ann_file=self._split_file(data_root, split),
            metainfo=meta,
            data_root=data_root,
            data_prefix=dict(img_path=""),
            indices=indices,
            serialize_data=serialize_data,
            pipeline=list(pipeline),
            test_mode=test_mode,
            lazy_init=lazy_init,
            max_refetch=max_refetch,
        )

    # ------------------------------------------------------------------ argument checks
    def _split_file(self, data_root: str, split: str) -> str:
        if split in self.SPLIT_FILES:
            path = osp.join(data_root, self.SPLIT_FILES[split])
        elif split.endswith(".txt") or os.sep in split:
            path = split if osp.isabs(split) else osp.join(data_root, split)
        else:
            raise ValueError(
                f"{type(self).__name__}: split {split!r} is neither one of "
                f"{list(self.SPLIT_FILES)} nor a list file (*.txt)"
            )
        if not osp.isfile(path):
            raise FileNotFoundError(f"{type(self).__name__}: split list file {path!r} not found")
        return osp.abspath(path)

    @staticmethod
    def _check_holdout(holdout: dict | None) -> dict | None:
        if holdout is None:
            return None
        holdout = dict(holdout)
        unknown = set(holdout) - {"fraction", "seed", "part"}
        if unknown or "fraction" not in holdout:
            raise ValueError(
                f"holdout {holdout} must be dict(fraction, seed=0, part='train'|'holdout')"
            )
        fraction = float(holdout["fraction"])
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"holdout fraction {fraction} must be in (0, 1)")
        part = holdout.get("part", "train")
        if part not in ("train", "holdout"):
            raise ValueError(f"holdout part {part!r} must be 'train' or 'holdout'")
        return dict(fraction=fraction, seed=int(holdout.get("seed", 0)), part=part)

    # ------------------------------------------------------------------ loading
    def _read_ids(self) -> list[str]:
        with open(self.ann_file) as f:
            ids = [line.strip() for line in f if line.strip()]
        if not ids:
            raise ValueError(f"{type(self).__name__}: split list file {self.ann_file!r} is empty")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{type(self).__name__}: {self.ann_file!r} repeats ids")
        if self.holdout is not None:
            n = len(ids)
            n_hold = max(1, round(self.holdout["fraction"] * n))
            if n_hold >= n:
                raise ValueError(
                    f"holdout fraction {self.holdout['fraction']} of {n} ids leaves no "
                    f"training ids in {self.ann_file!r}"
                )
            perm = np.random.default_rng(self.holdout["seed"]).permutation(n)
            picked = set(perm[:n_hold].tolist())
            want = self.holdout["part"] == "holdout"
            ids = [i for k, i in enumerate(ids) if (k in picked) == want]
        return ids

    def _listing(self, folder: str) -> set[str]:
        path = osp.join(self.data_root, folder)
        if not osp.isdir(path):
            raise FileNotFoundError(f"{type(self).__name__}: folder {path!r} not found")
        return set(os.listdir(path))

    def load_data_list(self) -> list[dict]:
        """Build one ``data_info`` per id; check every required file exists."""
        ids = self._read_ids()
        folders = {"img": (self.IMG_DIR, self.IMG_SUFFIX)}
        folders.update({t: self.TASK_FILES[t] for t in self.tasks})
        missing: list[str] = []
        data_list = []
        listings = {name: self._listing(folder) for name, (folder, _) in folders.items()}
        for sample_id in ids:
            paths: dict[str, str | None] = {}
            for name, (folder, suffix) in folders.items():
                fname = sample_id + suffix
                path = osp.join(self.data_root, folder, fname)
                if fname in listings[name]:
                    paths[name] = path
                elif name in self.OPTIONAL_TASKS:
                    paths[name] = None
                else:
                    missing.append(path)
            img_path = paths.pop("img", None)
            data_list.append(
                dict(
                    img_path=img_path,
                    ann_paths=paths,
                    dataset=self.DATASET,
                    sample_id=sample_id,
                    seg_fields=[],
                )
            )
        if missing:
            raise FileNotFoundError(
                f"{type(self).__name__}: {len(missing)} files listed by {self.ann_file!r} are "
                f"missing, e.g. {missing[:5]}"
            )
        return data_list
