"""Multi-task performance delta (Δm) over per-task metrics.

mmengine's ``Evaluator`` runs its metrics independently and only merges their output
dicts, so a metric placed after the task metrics cannot read their results. Δm is
therefore ONE metric that owns the per-task metrics: it forwards every batch to each of
them, lets each evaluate itself (including its own cross-rank collection), returns all
their keys unchanged and adds the deltas. In a config it is the whole evaluator, a dict
that leaf configs can override entry by entry::

    val_evaluator = dict(
        type='MultiTaskDeltaMetric',
        dataset='nyud',
        tasks=tasks,
        task_metrics=dict(
            semseg=dict(type='MultiTaskIoUMetric'),
            depth=dict(type='DepthErrorMetric'),
        ),
    )

Keys: every task metric's keys (``semseg/mIoU``, ``depth/rmse``, ...) plus
``multitask/delta_m`` and ``multitask/delta_<task>`` for every task in the average, all in
percent. Use ``multitask/delta_m`` (rule ``greater``) for ``save_best``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from mmengine.evaluator import BaseMetric
from mmseg.registry import METRICS

from mmseg_m3vit.tasks import check_tasks, get_task, resolve_tasks

#: Single-task reference values used by the M3ViT paper (ResNet STL baselines), per data
#: set, in the units of each task's main metric (mIoU / maxIoU / odsF in percent, depth
#: RMSE in metres, normals mean angular error in degrees).
STL_REFERENCES: dict[str, dict[str, float]] = {
    "nyud": {"semseg": 43.9, "depth": 0.585, "normals": 19.76},
    "pascal": {"semseg": 66.2, "parts": 59.9, "sal": 66.3, "normals": 13.9, "edge": 68.8},
}


def delta_m(
    values: Mapping[str, float], references: Mapping[str, float]
) -> tuple[float, dict[str, float]]:
    """Multi-task delta in percent and its per-task terms.

    ``dm = 1/T sum_t (-1)^{l_t} (M_t - M_stl,t) / M_stl,t * 100`` with ``l_t = 1`` when the
    task's main metric (:attr:`TaskSpec.main_metric`) is lower-is-better.

    Args:
        values: main-metric value per task.
        references: single-task reference per task (same units); must cover ``values``.

    Returns:
        ``(dm, {task: signed relative change in percent})``.

    Raises:
        KeyError: a task has no reference. ValueError: a reference is 0 or ``values`` is
        empty.
    """
    if not values:
        raise ValueError("delta_m needs at least one task")
    terms = {}
    for task, value in values.items():
        if task not in references:
            raise KeyError(
                f"no single-task reference for task {task!r}; give one in stl_reference "
                f"(known: {dict(references)})"
            )
        ref = float(references[task])
        if ref == 0:
            raise ValueError(f"single-task reference of task {task!r} is 0")
        sign = -1.0 if get_task(task).lower_is_better else 1.0
        terms[task] = sign * (float(value) - ref) / ref * 100.0
    return sum(terms.values()) / len(terms), terms


def task_metric_configs(
    task_metrics: Mapping[str, Mapping],
    tasks: Sequence[str] | None = None,
    dataset: str | None = None,
) -> dict[str, dict]:
    """The metric config of every evaluated task, in task order, with ``task`` filled in.

    The task list is chosen as described by :func:`mmseg_m3vit.tasks.resolve_tasks`
    (``tasks``, else every task of ``dataset``, else every key of ``task_metrics``).

    Raises:
        ValueError: an unknown or missing task, or an entry whose ``task`` is another one.
    """
    out = {}
    for task in resolve_tasks(tasks, dataset, task_metrics, what="task_metrics"):
        cfg = copy.deepcopy(dict(task_metrics[task]))
        if cfg.setdefault("task", task) != task:
            raise ValueError(f"task_metrics[{task!r}] has task={cfg['task']!r}")
        out[task] = cfg
    return out


@METRICS.register_module()
class MultiTaskDeltaMetric(BaseMetric):
    """Runs one metric per task and adds Δm against single-task references.

    Args:
        task_metrics: per-task metric configs keyed by task name (each built from mmseg's
            METRICS with ``task`` set to its key); may hold more tasks than are evaluated.
        dataset: ``'nyud'`` or ``'pascal'``: the default task list and the references of
            :data:`STL_REFERENCES`; ``None`` to give the references in ``stl_reference``.
        tasks: the tasks evaluated; default every task of ``dataset`` (else of
            ``task_metrics``).
        stl_reference: references per task, overriding the data set's.
        delta_tasks: tasks averaged in Δm; default every evaluated task that has a
            reference.
        collect_device / prefix: as :class:`mmengine.evaluator.BaseMetric`; ``prefix``
            (default ``'multitask'``) names only the delta keys.
    """

    default_prefix = "multitask"

    def __init__(
        self,
        task_metrics: Mapping[str, dict],
        dataset: str | None = None,
        tasks: Sequence[str] | None = None,
        stl_reference: Mapping[str, float] | None = None,
        delta_tasks: Sequence[str] | None = None,
        collect_device: str = "cpu",
        prefix: str | None = None,
    ) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        if not task_metrics:
            raise ValueError("task_metrics is empty; give one metric config per task")
        if dataset is not None and dataset not in STL_REFERENCES:
            raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(STL_REFERENCES)}")
        self.task_metrics: dict[str, BaseMetric] = {
            task: METRICS.build(cfg)
            for task, cfg in task_metric_configs(task_metrics, tasks, dataset).items()
        }
        self.references = dict(STL_REFERENCES.get(dataset, {}) if dataset else {})
        self.references.update(stl_reference or {})
        if delta_tasks is None:
            delta_tasks = [t for t in self.task_metrics if t in self.references]
            if not delta_tasks:
                raise ValueError(
                    f"none of the tasks {list(self.task_metrics)} has a single-task "
                    f"reference (dataset={dataset!r}); give them in stl_reference"
                )
        self.delta_tasks = check_tasks(delta_tasks, list(self.task_metrics), "delta_tasks")
        no_ref = [t for t in self.delta_tasks if t not in self.references]
        if no_ref:
            raise ValueError(
                f"no single-task reference for {no_ref} (dataset={dataset!r}); "
                f"give them in stl_reference"
            )

    @BaseMetric.dataset_meta.setter
    def dataset_meta(self, dataset_meta: dict) -> None:
        """Pass the data set meta information on to every task metric."""
        self._dataset_meta = dataset_meta
        for metric in self.task_metrics.values():
            metric.dataset_meta = dataset_meta

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        """Forward the batch to every task metric."""
        for metric in self.task_metrics.values():
            metric.process(data_batch, data_samples)

    def compute_metrics(self, results: list) -> dict[str, float]:
        """Not used: :meth:`evaluate` lets each task metric compute its own results."""
        raise RuntimeError("MultiTaskDeltaMetric computes through evaluate()")

    def evaluate(self, size: int) -> dict[str, float]:
        """Evaluate every task metric, then add ``<prefix>/delta_m`` and per-task terms."""
        out: dict[str, float] = {}
        values = {}
        for task, metric in self.task_metrics.items():
            result = metric.evaluate(size)
            out.update(result)
            if task in self.delta_tasks:
                key = "/".join(filter(None, (metric.prefix, get_task(task).main_metric)))
                if key not in result:
                    raise KeyError(f"metric of task {task!r} returned no {key!r}: {list(result)}")
                values[task] = result[key]
        dm, terms = delta_m(values, self.references)
        out[f"{self.prefix}/delta_m"] = dm
        out.update({f"{self.prefix}/delta_{t}": v for t, v in terms.items()})
        return out
