"""The val split as the FPGA flow sees it: input frames, and the task metric of the float
and the quantized pathway.

:func:`val_frames` yields the configured val images as FPGA input frames (calibration
and verification use them through :func:`input_frames`, which falls back to synthetic
frames when the data set is missing, and says so).
:func:`evaluate_val_metric` runs both models on the same val images, turns their
logits into predictions exactly as :class:`MultiTaskSegmentor` does (the task head's
:meth:`PUPHead.predict_by_feat`) and scores them with the task's metric from the
config's ``val_evaluator``. The models come in as two callables, so this module needs
neither Brevitas nor FINN (``finn_flow/build.py`` passes the float backbone + head and
the Brevitas model; the config's ``fpga.val_images`` caps the number of images, default
all of the val split).

Per image (batch 1)::

    val_dataloader.dataset[i]  -> uint8 image (3, Hi, Wi), ground truth at (Hi, Wi)
    model.data_preprocessor    -> normalised (1, 3, Hp, Wp) (padded to its divisor),
                                  data sample gets img_shape (Hi, Wi), pad_shape (Hp, Wp)
    bilinear resize            -> (1, 3, H, W), H, W = the FPGA ``size`` (as calibration)
    float / quant callable     -> logits (1, C, h, w) NCHW (h, w: the head's output)
    bilinear resize (host)     -> (1, C, Hp, Wp): the logits of the padded input, as the
                                  segmentor's head resizes to ``inputs.shape[-2:]``
    head.predict_by_feat(meta) -> crop padding, resize to ori_shape, post-process
                                  (argmax / sigmoid / L2-normalise / identity)
    metric.process             -> on ``SegDataSample.to_dict()`` (as mmengine's Evaluator)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from mmseg_m3vit.engine import resolve_data_root

#: ``(1, 3, H, W)`` normalised image -> ``(1, C, h, w)`` task logits (NCHW).
LogitsFn = Callable[[Any], Any]


class ValDataError(RuntimeError):
    """The configured val data set (or the task's val metric) is missing or unusable;
    the message names the config key and the path."""


def task_metric_config(cfg: Any, task: str) -> dict:
    """The metric config of ``task`` inside ``cfg.val_evaluator``.

    ``val_evaluator`` is a ``MultiTaskDeltaMetric`` whose ``task_metrics`` dict has one
    metric config per task (configs/_base_/datasets/nyud_mt.py); a list of them, or of
    per-task metrics (each with a ``task`` key), is accepted too.

    Raises:
        ValDataError: no metric for ``task`` (naming ``val_evaluator`` and what it holds).
    """
    from mmseg_m3vit.evaluation.metrics import task_metric_configs

    evaluator = cfg.get("val_evaluator")
    if evaluator is None:
        raise ValDataError("config has no 'val_evaluator' (needed for the task's val metric)")
    entries = list(evaluator) if isinstance(evaluator, list | tuple) else [evaluator]
    for entry in entries:
        metrics = entry.get("task_metrics")
        if isinstance(metrics, dict) and task in metrics:
            return task_metric_configs(metrics, [task])[task]
        if entry.get("task") == task:
            return dict(entry)
    raise ValDataError(
        f"config key val_evaluator has no metric for task {task!r} "
        f"(expected val_evaluator.task_metrics.{task}; found {entries})"
    )


def build_val_dataset(cfg: Any) -> tuple[Any, str]:
    """Build ``cfg.val_dataloader.dataset`` (default scope of the config, 'mmseg').

    Returns ``(dataset, description)``; ``data_root`` is resolved with
    :func:`mmseg_m3vit.engine.resolve_data_root` (relative paths: against the working
    directory, else the repository root).

    Raises:
        ValDataError: no ``val_dataloader.dataset`` in the config, its data root does not
            exist, or the data set cannot be built (message names the key and the path).
    """
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    import mmseg_m3vit  # noqa: F401  (registers the data sets and their transforms)

    try:
        dcfg = dict(cfg.val_dataloader.dataset)
    except (AttributeError, KeyError, TypeError):
        raise ValDataError("config has no val_dataloader.dataset") from None
    root = dcfg.get("data_root")
    if root:
        path = resolve_data_root(root)
        if not path.exists():
            raise ValDataError(
                f"val data set missing: val_dataloader.dataset.data_root={root!r} "
                f"({path} does not exist; `make demo` or "
                "tools/dataset_converters/make_synthetic_nyud.py writes data/synthetic_nyud)"
            )
        dcfg["data_root"] = str(path)
    init_default_scope(cfg.get("default_scope", "mmseg"))  # pipeline transform lookups
    try:
        dataset = DATASETS.build(dcfg)
    except Exception as err:  # noqa: BLE001 - re-raised with the config key
        raise ValDataError(
            f"val_dataloader.dataset ({dcfg.get('type')} at {dcfg.get('data_root')!r}, "
            f"split {dcfg.get('split')!r}) cannot be built: {type(err).__name__}: {err}"
        ) from err
    if len(dataset) == 0:
        raise ValDataError(
            f"val_dataloader.dataset at {dcfg.get('data_root')!r} (split "
            f"{dcfg.get('split')!r}) holds no images"
        )
    desc = f"{dcfg.get('data_root')} val_dataloader.dataset (split {dcfg.get('split')!r}"
    if dcfg.get("holdout"):
        desc += f", holdout part {dict(dcfg['holdout']).get('part')!r}"
    return dataset, desc + ")"


def val_frames(
    cfg: Any, size: tuple[int, int], num_images: int | None = None
) -> Iterator[tuple[Any, Any, dict]]:
    """The first ``num_images`` val images (all when None) as FPGA input frames.

    Yields ``(frame, data_sample, meta)``: ``frame`` (1, 3, H, W) float32, the image
    through ``model.data_preprocessor`` (normalised, padded) resized bilinearly
    (align_corners=False) to ``size`` = (H, W); ``data_sample`` the loader's sample
    (ground truth at the original size); ``meta`` its metainfo after the preprocessor.

    Raises:
        ValDataError: the val data set is missing or unusable (see
            :func:`build_val_dataset`).
    """
    import torch
    import torch.nn.functional as F
    from mmseg.registry import MODELS

    dataset, _ = build_val_dataset(cfg)
    n = len(dataset) if num_images is None else min(int(num_images), len(dataset))
    pre = MODELS.build(dict(cfg.model.data_preprocessor))
    with torch.no_grad():
        for i in range(n):
            item = dataset[i]
            sample = item["data_samples"]
            batch = pre(dict(inputs=[item["inputs"]], data_samples=[sample]), False)
            img = batch["inputs"].float()
            img = F.interpolate(img, size=tuple(size), mode="bilinear", align_corners=False)
            yield img, sample, batch["data_samples"][0].metainfo


def input_frames(cfg: Any, num: int, size: tuple[int, int], seed: int) -> tuple[list, str]:
    """``num`` FPGA input frames (1, 3, H, W) and where they came from.

    The first ``num`` val images (:func:`val_frames`) when the configured val data set
    exists, else synthetic N(0, 1) frames drawn with ``seed`` (the note says why).
    """
    import torch

    try:
        _, desc = build_val_dataset(cfg)
        frames = [img for img, _, _ in val_frames(cfg, size, num)]
        return frames, f"val split of {desc} ({len(frames)} images)"
    except ValDataError as err:
        note = f"synthetic N(0,1) images ({err})"
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, *size, generator=gen) for _ in range(num)], note


def build_post_head(cfg: Any, task: str, in_channels: int | None = None) -> Any:
    """The task's ``PUPHead`` of ``cfg.model.decode_heads`` (random weights: only its
    post-processing, :meth:`PUPHead.predict_by_feat`, and its resize are used)."""
    from mmseg.registry import MODELS

    import mmseg_m3vit  # noqa: F401
    from mmseg_m3vit.models.segmentors import model_head_configs

    hcfg = model_head_configs(cfg.model)[task]
    hcfg.setdefault("in_channels", in_channels or cfg.model.backbone.get("embed_dims", 384))
    return MODELS.build(hcfg).eval()


def logits_to_prediction(logits: Any, head: Any, meta: dict) -> Any:
    """Prediction of one image as the segmentor writes it into ``<pred_field>``.

    Args:
        logits: (1, C, h, w) task logits of the frame the model saw (any h, w).
        head: the task's ``PUPHead`` (its ``predict_by_feat`` and bilinear resize).
        meta: the data sample's metainfo after the data preprocessor (``pad_shape``,
            ``img_shape``, ``ori_shape``, optional ``flip``).

    Returns:
        (1, H, W) or (3, H, W) tensor at ``ori_shape`` (long ids for 'argmax', float
        otherwise), i.e. ``head.predict_by_feat(logits at pad_shape, [meta])[0]``.
    """
    pad_hw = tuple(meta.get("pad_shape", meta.get("img_shape", logits.shape[-2:]))[:2])
    if tuple(logits.shape[-2:]) != pad_hw:
        logits = head._up(logits.float(), size=pad_hw)  # the head's resize to the input
    return head.predict_by_feat(logits, [meta])[0]


def evaluate_val_metric(
    cfg: Any,
    task: str,
    float_logits_fn: LogitsFn,
    quant_logits_fn: LogitsFn,
    size: tuple[int, int],
    num_images: int | None = None,
    head: Any = None,
) -> dict[str, Any]:
    """Task metric of the float and the quantized model on the configured val split.

    Args:
        cfg: mmengine config with ``val_dataloader.dataset``, ``val_evaluator`` and
            ``model.data_preprocessor`` / ``model.decode_heads[task]``.
        task: task name (key of ``val_evaluator.task_metrics``).
        float_logits_fn / quant_logits_fn: normalised image (1, 3, H, W) float32 ->
            logits (1, C, h, w) NCHW (called under ``torch.no_grad()``).
        size: (H, W) in pixels of the FPGA input frame; every preprocessed val image is
            resized bilinearly (align_corners=False) to it, as for calibration.
        num_images: evaluate the first ``num_images`` samples; None: all of them.
        head: the task's ``PUPHead`` for post-processing (default: built from the config
            by :func:`build_post_head`; its weights are not used).

    Returns:
        ``{"metric": class name, "images": N, "data": description, "float": {key: value},
        "quantized": {key: value}, "primary": key, "lower_is_better": bool,
        "float_primary": x, "quant_primary": y, "delta": y - x, "seconds": wall time}``;
        metric values in the metric's units (degrees, percent, metres).

    Raises:
        ValDataError: the val data set or the task's metric config is missing (the
            message names the config key and the path).
    """
    import torch
    from mmengine.structures import PixelData
    from mmseg.registry import METRICS

    from mmseg_m3vit.tasks import get_task

    t0 = time.time()
    spec = get_task(task)
    mcfg = task_metric_config(cfg, task)
    dataset, desc = build_val_dataset(cfg)
    n = len(dataset) if num_images is None else min(int(num_images), len(dataset))
    if n < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if head is None:
        head = build_post_head(cfg, task)
    metrics = {"float": METRICS.build(dict(mcfg)), "quantized": METRICS.build(dict(mcfg))}
    for metric in metrics.values():
        metric.dataset_meta = dataset.metainfo
    fns = {"float": float_logits_fn, "quantized": quant_logits_fn}
    with torch.no_grad():
        for i, (img, sample, meta) in enumerate(val_frames(cfg, size, n)):
            if spec.gt_field not in sample:
                raise ValDataError(
                    f"val sample {i} has no {spec.gt_field!r} (task {task!r} not among "
                    "val_dataloader.dataset.tasks?)"
                )
            for kind, fn in fns.items():
                logits = fn(img)
                if logits.dim() != 4 or logits.shape[:2] != (1, head.num_classes):
                    raise ValueError(
                        f"{kind} logits must be (1, {head.num_classes}, h, w), got "
                        f"{tuple(logits.shape)}"
                    )
                pred = logits_to_prediction(logits, head, meta)
                out = sample.clone()
                out.set_data({spec.pred_field: PixelData(data=pred)})
                metrics[kind].process({}, [out.to_dict()])
    res = {kind: metric.evaluate(n) for kind, metric in metrics.items()}
    prefix = metrics["float"].prefix
    primary = "/".join(filter(None, (prefix, spec.main_metric)))
    if primary not in res["float"]:
        raise KeyError(f"{type(metrics['float']).__name__} returned no {primary!r}")
    f_val, q_val = res["float"][primary], res["quantized"][primary]
    return {
        "metric": type(metrics["float"]).__name__,
        "images": n,
        "data": desc,
        "input_size": list(size),
        "float": res["float"],
        "quantized": res["quantized"],
        "primary": primary,
        "lower_is_better": spec.lower_is_better,
        "float_primary": f_val,
        "quant_primary": q_val,
        "delta": q_val - f_val,
        "seconds": round(time.time() - t0, 2),
    }
