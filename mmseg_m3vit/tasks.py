"""The task table: the one place that says what each dense-prediction task is.

Everything task-specific (the pipeline key of its ground truth, the ``SegDataSample``
field it is packed into, the field its prediction is written to, the value used to pad
it, whether its main metric is lower-is-better) is looked up here, never hard-coded.
Output channels depend on the data set (NYUD semseg has 40 classes, PASCAL 21), so
they live in :data:`DATASET_TASKS` rather than in :class:`TaskSpec`.

Conventions for maps (H, W in pixels):

========  ==================  ================  ===============  ====  ================
task      pipeline key        gt field          dtype / shape    pad   pred field
========  ==================  ================  ===============  ====  ================
semseg    gt_seg_map          gt_sem_seg        uint8 HxW        255   pred_sem_seg
parts     gt_parts_map        gt_parts_seg      uint8 HxW        255   pred_parts_seg
depth     gt_depth_map        gt_depth_map      float32 HxW (m)  0     pred_depth_map
normals   gt_normal_map       gt_normal_map     float32 HxWx3    0     pred_normal_map
edge      gt_edge_map         gt_edge_map       uint8 HxW {0,1}  255   pred_edge_map
sal       gt_sal_map          gt_sal_map        uint8 HxW {0,1}  255   pred_sal_map
========  ==================  ================  ===============  ====  ================

Packed ground truth is a ``PixelData`` with ``data`` of shape (C, H, W): C = 3 for
normals, 1 otherwise (long for label maps, float for depth/normals). Invalid pixels:
label 255 (ignore), depth 0, normals all-zero vector.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one dense-prediction task.

    Attributes:
        name: task name used in configs (``'semseg'``, ``'depth'``, ...).
        results_key: key of the ground-truth map in the mmcv pipeline ``results`` dict
            (also listed in ``results['seg_fields']`` so geometric transforms move it).
        gt_field: ``SegDataSample`` attribute holding the packed ground truth.
        pred_field: ``SegDataSample`` attribute the segmentor writes the prediction to.
        map_channels: channels of the ground-truth map (3 for normals, else 1).
        pad_value: value used when padding/cropping the ground truth (invalid marker).
        is_label: the map holds integer class ids (nearest resampling, 255 ignore).
        lower_is_better: direction of the task's main metric (for Δm and ``save_best``).
        main_metric: name of the task's main metric key (without prefix).
    """

    name: str
    results_key: str
    gt_field: str
    pred_field: str
    map_channels: int
    pad_value: float
    is_label: bool
    lower_is_better: bool
    main_metric: str


TASK_SPECS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("semseg", "gt_seg_map", "gt_sem_seg", "pred_sem_seg", 1, 255, True, False, "mIoU"),
        TaskSpec(
            "parts", "gt_parts_map", "gt_parts_seg", "pred_parts_seg", 1, 255, True, False, "mIoU"
        ),
        TaskSpec(
            "depth", "gt_depth_map", "gt_depth_map", "pred_depth_map", 1, 0, False, True, "rmse"
        ),
        TaskSpec(
            "normals",
            "gt_normal_map",
            "gt_normal_map",
            "pred_normal_map",
            3,
            0,
            False,
            True,
            "mean",
        ),
        TaskSpec(
            "edge", "gt_edge_map", "gt_edge_map", "pred_edge_map", 1, 255, True, False, "odsF"
        ),
        TaskSpec("sal", "gt_sal_map", "gt_sal_map", "pred_sal_map", 1, 255, True, False, "maxIoU"),
    )
}

#: Output channels of each task's head, per data set.
DATASET_TASKS: dict[str, dict[str, int]] = {
    "nyud": {"semseg": 40, "depth": 1, "normals": 3, "edge": 1},
    "pascal": {"semseg": 21, "parts": 7, "sal": 1, "normals": 3, "edge": 1},
}


def dataset_tasks(dataset: str) -> dict[str, int]:
    """Output channels per task of ``dataset`` (its tasks in the order of the table).

    Raises:
        KeyError: an unknown data set, listing the known ones.
    """
    try:
        return DATASET_TASKS[dataset]
    except KeyError:
        raise KeyError(
            f"unknown dataset {dataset!r}; the task table knows {sorted(DATASET_TASKS)}"
        ) from None


def resolve_tasks(
    tasks: Sequence[str] | None,
    dataset: str | None,
    per_task: Mapping[str, object],
    what: str = "per-task entries",
) -> list[str]:
    """The task list of a component configured by a per-task table ``per_task``.

    ``tasks`` when given; else the tasks of ``per_task`` (in the order of ``dataset``'s
    tasks in the task table, when given, leaving out the tasks ``dataset`` lacks). The
    table may hold more tasks than are chosen (one table for several data sets); its
    keys must be task names and every chosen task must have an entry.

    Raises:
        ValueError: an unknown, repeated or missing task, or one ``dataset`` lacks
            (naming it and the valid ones).
    """
    entries = list(per_task)
    check_tasks(entries, sorted(TASK_SPECS), what=what)
    valid = entries
    if dataset is not None:
        valid = [t for t in dataset_tasks(dataset) if t in entries]
    if tasks is None:
        if not valid:
            raise ValueError(
                f"none of the tasks of dataset {dataset!r} {list(dataset_tasks(dataset))} "
                f"has an entry in {what} {entries}"
            )
        return valid
    tasks = check_tasks(tasks, sorted(TASK_SPECS))
    if dataset is not None:
        foreign = [t for t in tasks if t not in dataset_tasks(dataset)]
        if foreign:
            raise ValueError(
                f"tasks {foreign} are not tasks of dataset {dataset!r}; its tasks are "
                f"{list(dataset_tasks(dataset))}"
            )
    missing = [t for t in tasks if t not in entries]
    if missing:
        raise ValueError(f"tasks {missing} have no entry in {what} (it has {entries})")
    return tasks


def get_task(name: str) -> TaskSpec:
    """Return the :class:`TaskSpec` of ``name``; unknown names list the valid ones."""
    try:
        return TASK_SPECS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; valid tasks are {sorted(TASK_SPECS)}") from None


def check_tasks(
    tasks: Iterable[str], valid: Sequence[str], what: str = "tasks", allow_empty: bool = False
) -> list[str]:
    """Validate ``tasks`` against ``valid`` and return them as a list.

    Raises:
        ValueError: naming every unknown task and listing the valid ones; also when
            ``tasks`` repeats a name, or is empty (unless ``allow_empty``).
    """
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in valid]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; valid tasks are {list(valid)}")
    if not tasks and not allow_empty:
        raise ValueError(f"{what} is empty; choose from {list(valid)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"{what} {tasks} repeats a task")
    return tasks
