"""Checks run by the tools on a loaded config before any model or data set is built.

Building the model (and, for the real configs, loading pretrained weights) takes time;
a wrong data root or a misspelt task name should fail at once, with the config key, the
value and what was expected.
"""

from __future__ import annotations

import copy
import os
import os.path as osp
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mmengine.config import Config

from ..evaluation.metrics import STL_REFERENCES, task_metric_configs
from ..models.segmentors import model_head_configs
from ..tasks import DATASET_TASKS, TASK_SPECS, check_tasks

#: Config keys whose value is a list of task names.
TASK_LIST_KEYS = ("tasks", "infer_tasks")
#: Config keys whose value is a dict keyed by task name.
TASK_DICT_KEYS = ("decode_heads", "loss_weights", "task_metrics")
#: Config keys whose value is one task name.
TASK_NAME_KEYS = ("task",)
DATALOADER_KEYS = ("train_dataloader", "val_dataloader", "test_dataloader")
#: The checkout the package lives in: the configs name data roots relative to it.
REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_data_root(root: str | os.PathLike[str]) -> Path:
    """Where a config's ``data_root`` points, as an absolute path (which may not exist).

    The path as given when it exists (absolute, or relative to the working directory);
    else, for a relative path, the same path under the repository root when that exists
    (the configs' convention: ``data/<set>`` from the checkout, whatever the working
    directory); else the path as given, made absolute (for the caller's error message).
    The one resolver the tools, the FPGA flow's calibration and its evaluation share.
    """
    path = Path(root).expanduser()
    if path.exists() or path.is_absolute():
        return path.resolve()
    if (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    return path.resolve()


def iter_datasets(cfg: Any, path: str) -> Iterator[tuple[str, dict]]:
    """Yield ``(key path, dataset cfg)`` for a dataset config and the ones it wraps.

    Follows mmengine's wrappers (``ConcatDataset.datasets``, ``RepeatDataset.dataset``,
    ``ClassBalancedDataset.dataset``).
    """
    if not isinstance(cfg, dict):
        return
    if "data_root" in cfg or "ann_file" in cfg:
        yield path, cfg
    if isinstance(cfg.get("dataset"), dict):
        yield from iter_datasets(cfg["dataset"], f"{path}.dataset")
    for i, sub in enumerate(cfg.get("datasets") or []):
        yield from iter_datasets(sub, f"{path}.datasets[{i}]")


def check_data_roots(cfg: Config, which: Sequence[str] = DATALOADER_KEYS) -> None:
    """Resolve every data set's ``data_root`` used by ``which`` dataloaders in place
    (:func:`resolve_data_root`: absolute paths afterwards) and fail unless it exists.

    Raises:
        FileNotFoundError: naming the config key, the missing path and how to fix it.
    """
    for key in which:
        loader = cfg.get(key)
        if not loader:
            continue
        for path, ds in iter_datasets(loader.get("dataset"), f"{key}.dataset"):
            root = ds.get("data_root")
            if root is None or root == "":
                continue
            resolved = resolve_data_root(root)
            if not resolved.is_dir():
                raise FileNotFoundError(
                    f"{path}.data_root = {root!r} does not exist (working directory "
                    f"{osp.abspath('.')!r}, repository {str(REPO_ROOT)!r}); download/convert "
                    "the data set there, or point the config at it, e.g. --cfg-options "
                    f"{path}.data_root=/path/to/data"
                )
            ds["data_root"] = str(resolved)


def _walk(obj: Any, path: str) -> Iterator[tuple[str, str, Any]]:
    """Yield ``(path, key, value)`` for every key of every nested dict/list in ``obj``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            sub = f"{path}.{k}" if path else str(k)
            yield sub, str(k), v
            yield from _walk(v, sub)
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")


def check_config_tasks(cfg: Config) -> None:
    """Validate every task name in the config against the task table, and check that the
    model, the data sets and the evaluators agree on the tasks.

    Looks at keys ``tasks`` / ``infer_tasks`` (lists), ``decode_heads`` / ``loss_weights``
    / ``task_metrics`` (dicts keyed by task) and ``task`` (one name) anywhere in
    ``model``, the dataloaders and the evaluators. Then every data set must load exactly
    the model's tasks and every evaluator entry must score only tasks of the model.

    Raises:
        ValueError: naming the config key, the unknown or disagreeing task(s) and the
            valid tasks.
    """
    valid = sorted(TASK_SPECS)
    for top in ("model", *DATALOADER_KEYS, "val_evaluator", "test_evaluator"):
        if top not in cfg:
            continue
        for path, key, value in _walk(cfg[top], top):
            if key in TASK_LIST_KEYS and value is not None:
                if isinstance(value, str):
                    value = [value]
                try:
                    check_tasks(value, valid, what=f"tasks in {path}")
                except ValueError as err:
                    raise ValueError(f"config key {path}: {err}") from None
            elif key in TASK_DICT_KEYS and isinstance(value, dict):
                names = [k for k in value if k != "_delete_"]
                try:
                    check_tasks(names, valid, what=f"tasks in {path}")
                except ValueError as err:
                    raise ValueError(f"config key {path}: {err}") from None
            elif key in TASK_NAME_KEYS and isinstance(value, str) and value not in TASK_SPECS:
                raise ValueError(
                    f"config key {path}: unknown task {value!r}; valid tasks are {valid}"
                )
    _check_tasks_agree(cfg)


def _check_tasks_agree(cfg: Config) -> None:
    """The data sets load the model's tasks; the evaluators score only those."""
    try:
        tasks = config_tasks(cfg)
    except (KeyError, ValueError) as err:
        raise ValueError(f"config key model: {err}") from None
    hint = "set them from one `tasks` list (model.tasks, dataloaders, evaluator)"
    for key in DATALOADER_KEYS:
        loader = cfg.get(key)
        if not loader:
            continue
        for path, ds in iter_datasets(loader.get("dataset"), f"{key}.dataset"):
            loaded = dataset_tasks_of(ds)
            if loaded is not None and set(loaded) != set(tasks):
                raise ValueError(
                    f"config key {path}.tasks: the data set loads {loaded}, the model "
                    f"predicts {tasks}; {hint}"
                )
    for key in ("val_evaluator", "test_evaluator"):
        evaluators = cfg.get(key)
        if not evaluators:
            continue
        entries = evaluators if isinstance(evaluators, list | tuple) else [evaluators]
        for i, metric in enumerate(entries):
            task, multi = metric_tasks_of(metric)
            scored = [task] if task is not None else multi or []
            extra = [t for t in scored if t not in tasks]
            if extra:
                raise ValueError(
                    f"config key {key}: entry {i} scores tasks {extra} the model does not "
                    f"predict ({tasks}); {hint}"
                )


def dataset_tasks_of(dataset_cfg: dict) -> list[str] | None:
    """The tasks a multi-task data set config loads (its ``tasks``, else all tasks of its
    data set); None for a data set type without a task table entry."""
    if dataset_cfg.get("tasks") is not None:
        return list(dataset_cfg["tasks"])
    from mmseg.registry import DATASETS

    cls = DATASETS.get(dataset_cfg.get("type", ""))
    name = getattr(cls, "DATASET", None)
    return list(DATASET_TASKS[name]) if name in DATASET_TASKS else None


def config_tasks(cfg: Config) -> list[str]:
    """The tasks the config's model predicts, chosen as the segmentor chooses them
    (``model.tasks``, else the tasks of ``model.dataset`` with a head, else the head keys).

    Raises:
        KeyError: the model has no ``decode_heads``. ValueError: as
            :func:`mmseg_m3vit.tasks.resolve_tasks`.
    """
    return list(model_head_configs(cfg.get("model", {})))


def metric_tasks_of(metric_cfg: dict) -> tuple[str | None, list[str] | None]:
    """``(task, tasks)`` of an evaluator entry: the one task it scores, or the task list
    of a multi-task metric (Δm). Read from the config, else from the built metric's
    ``task`` / ``tasks`` attributes."""
    if metric_cfg.get("task"):
        return metric_cfg["task"], None
    if isinstance(metric_cfg.get("task_metrics"), dict):  # MultiTaskDeltaMetric
        configs = task_metric_configs(
            metric_cfg["task_metrics"], metric_cfg.get("tasks"), metric_cfg.get("dataset")
        )
        return None, list(configs)
    if metric_cfg.get("tasks"):
        return None, list(metric_cfg["tasks"])
    from mmseg.registry import METRICS

    metric = METRICS.build(copy.deepcopy(metric_cfg))
    tasks = getattr(metric, "tasks", None)
    return getattr(metric, "task", None), list(tasks) if tasks else None


def restrict_to_tasks(cfg: Config, tasks: Sequence[str]) -> Config:
    """Return a copy of ``cfg`` that predicts and evaluates only ``tasks``.

    Sets ``model.infer_tasks`` (the segmentor then runs the single-task pathway for each
    chosen task), keeps only the evaluator entries whose task is chosen, narrows the
    ``MultiTaskDeltaMetric``'s ``tasks`` (and ``delta_tasks`` when set) to the chosen
    tasks (Δm is then averaged over the chosen tasks that have a reference; with none,
    the Δm metric gives way to the chosen tasks' own metrics), and narrows the test/val
    data sets' ``tasks`` so unused annotations are not loaded.

    Raises:
        ValueError: a task the config's model does not have, listing the valid ones.
    """
    available = config_tasks(cfg)
    tasks = check_tasks(tasks, available, what="--task")
    cfg = copy.deepcopy(cfg)
    cfg.model.infer_tasks = list(tasks)
    for key in ("val_evaluator", "test_evaluator"):
        if key not in cfg or cfg[key] is None:
            continue
        evaluators = cfg[key]
        as_list = evaluators if isinstance(evaluators, list) else [evaluators]
        kept = []
        for metric in as_list:
            metric_task, metric_tasks = metric_tasks_of(metric)
            if metric_task is not None:
                if metric_task in tasks:
                    kept.append(metric)
            elif isinstance(metric.get("task_metrics"), dict):  # MultiTaskDeltaMetric
                kept.extend(_restrict_delta_metric(metric, metric_tasks, tasks))
            elif metric_tasks:
                metric["tasks"] = [t for t in metric_tasks if t in tasks]
                kept.append(metric)
            else:
                kept.append(metric)
        cfg[key] = kept if isinstance(evaluators, list) or len(kept) != 1 else kept[0]
    for key in ("val_dataloader", "test_dataloader"):
        if key not in cfg or cfg[key] is None:
            continue
        for _, ds in iter_datasets(cfg[key].get("dataset"), key):
            loaded = dataset_tasks_of(ds)
            if loaded is not None:
                ds["tasks"] = [t for t in loaded if t in tasks]
    return cfg


def _restrict_delta_metric(metric: dict, metric_tasks: list[str], tasks: Sequence[str]) -> list:
    """A Δm metric config narrowed to ``tasks``, or the chosen tasks' own metric configs
    when none of them has a single-task reference."""
    chosen = [t for t in metric_tasks if t in tasks]
    if metric.get("delta_tasks") is not None:
        delta = [t for t in metric["delta_tasks"] if t in chosen]
    else:
        references = dict(STL_REFERENCES.get(metric.get("dataset"), {}))
        references.update(metric.get("stl_reference") or {})
        delta = [t for t in chosen if t in references]
    if not delta:
        configs = task_metric_configs(metric["task_metrics"], chosen)
        return list(configs.values())
    metric["tasks"] = chosen
    if metric.get("delta_tasks") is not None:
        metric["delta_tasks"] = delta
    return [metric]


def check_pretrained(cfg: Config) -> None:
    """Fail unless ``model.backbone.pretrained`` (when set) is an existing local file.

    Raises:
        FileNotFoundError: naming the key and the path, with the DeiT-S download hint.
    """
    backbone = cfg.get("model", {}).get("backbone", {})
    path = backbone.get("pretrained")
    if path and not osp.isfile(path):
        raise FileNotFoundError(
            f"model.backbone.pretrained = {path!r} does not exist. Download the DeiT-S "
            "ImageNet weights there (https://dl.fbaipublicfiles.com/deit/"
            "deit_small_patch16_224-cd65a155.pth), point the key at your copy, or train "
            "from scratch with --cfg-options model.backbone.pretrained=None"
        )
