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

from ..tasks import TASK_SPECS, check_tasks

#: Config keys whose value is a list of task names.
TASK_LIST_KEYS = ("tasks", "infer_tasks")
#: Config keys whose value is a dict keyed by task name.
TASK_DICT_KEYS = ("decode_heads", "loss_weights")
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
    """Validate every task name in the config against the task table.

    Looks at keys ``tasks`` / ``infer_tasks`` (lists), ``decode_heads`` / ``loss_weights``
    (dicts keyed by task) and ``task`` (one name) anywhere in ``model``, the dataloaders
    and the evaluators.

    Raises:
        ValueError: naming the config key, the unknown task(s) and the valid tasks.
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


def config_tasks(cfg: Config) -> list[str]:
    """The tasks the config's model predicts (``model.tasks``, else the head keys)."""
    model = cfg.get("model", {})
    tasks = model.get("tasks")
    if tasks:
        return list(tasks)
    heads = model.get("decode_heads") or model.get("heads")
    if isinstance(heads, dict):
        return list(heads)
    raise KeyError(
        "cannot tell the config's tasks: expected model.tasks (a list) or model.decode_heads "
        "(a dict keyed by task)"
    )


def metric_tasks_of(metric_cfg: dict) -> tuple[str | None, list[str] | None]:
    """``(task, tasks)`` of an evaluator entry: the one task it scores, or the task list
    of a multi-task metric (Δm). Read from the config, else from the built metric's
    ``task`` / ``tasks`` attributes (per-task metrics with a fixed task, e.g. depth, do
    not take a ``task`` argument)."""
    if metric_cfg.get("task"):
        return metric_cfg["task"], None
    if isinstance(metric_cfg.get("metrics"), dict):  # MultiTaskDeltaMetric
        return None, [t for t in metric_cfg["metrics"] if t != "_delete_"]
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
    ``MultiTaskDeltaMetric``'s per-task ``metrics`` and ``delta_tasks`` to the chosen
    tasks (Δm is then averaged over the chosen tasks that have a reference), and narrows
    the test/val data sets' ``tasks`` so unused annotations are not loaded.

    Raises:
        ValueError: a task the config's model does not have, listing the valid ones.
    """
    available = config_tasks(cfg)
    tasks = check_tasks(tasks, available, what="--task")
    cfg = copy.deepcopy(cfg)
    cfg.model.infer_tasks = list(tasks)
    for key in ("val_evaluator", "test_evaluator"):
        if key not in cfg:
            continue
        evaluators = cfg[key]
        as_list = evaluators if isinstance(evaluators, list) else [evaluators]
        kept = []
        for metric in as_list:
            metric_task, metric_tasks = metric_tasks_of(metric)
            if metric_task is not None:
                if metric_task not in tasks:
                    continue
            elif metric_tasks:
                if isinstance(metric.get("metrics"), dict):  # MultiTaskDeltaMetric
                    metric["metrics"] = {
                        t: metric["metrics"][t] for t in metric_tasks if t in tasks
                    }
                    delta = metric.get("delta_tasks") or metric_tasks
                    metric["delta_tasks"] = [t for t in delta if t in tasks]
                    if not metric["delta_tasks"]:
                        # no chosen task has a single-task reference: plain task metrics
                        kept.extend(metric["metrics"].values())
                        continue
                else:
                    metric["tasks"] = [t for t in metric_tasks if t in tasks]
            kept.append(metric)
        cfg[key] = kept if isinstance(evaluators, list) or len(kept) != 1 else kept[0]
    for key in ("val_dataloader", "test_dataloader"):
        if key not in cfg:
            continue
        for _, ds in iter_datasets(cfg[key].get("dataset"), key):
            if ds.get("tasks"):
                ds["tasks"] = [t for t in ds["tasks"] if t in tasks]
    return cfg


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
