"""What a config builds, as JSON, to check that a config edit changes nothing it should not.

Usage::

    python tools/analysis_tools/config_fingerprint.py CONFIG [CONFIG ...] --out FILE.json
    python tools/analysis_tools/config_fingerprint.py --diff OLD.json NEW.json \
        [--rename OLD_NAME=NEW_NAME ...]

The fingerprint of a config is what the runner builds from it, not how the file spells
it: the model's parameter and buffer names and shapes (built on the ``meta`` device, so
no weights are initialised), every module's type and plain attributes (task list, loss
weights, number of classes, top-k, upsampling mode, ...), the built evaluator's per-task
metrics with their settings and the Δm references, and the remaining runner settings
(data loaders with their pipelines, schedule, hooks, FPGA section) as plain dicts.
Two configs with equal fingerprints train and evaluate the same model on the same data.
``--diff`` prints every path where two fingerprint files differ (configs named in both
after ``--rename``), and exits 1 when any does.
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import sys
from typing import Any

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

#: Runner settings compared as plain dicts (the model and evaluators are built instead).
RUNNER_KEYS = (
    "train_dataloader",
    "val_dataloader",
    "test_dataloader",
    "test_pipeline",
    "train_cfg",
    "val_cfg",
    "test_cfg",
    "optim_wrapper",
    "param_scheduler",
    "default_hooks",
    "custom_hooks",
    "env_cfg",
    "log_processor",
    "log_level",
    "visualizer",
    "randomness",
    "default_scope",
    "custom_imports",
    "load_from",
    "resume",
    "model_wrapper_cfg",
    "tta_model",
    "fpga",
)
PLAIN = (bool, int, float, str, type(None))
NOT_PLAIN = object()


def _plain(value: Any) -> Any:
    """``value`` as JSON-able data when it is made of plain values, else :data:`NOT_PLAIN`."""
    if isinstance(value, PLAIN):
        return value
    if isinstance(value, list | tuple):
        items = [_plain(v) for v in value]
        return NOT_PLAIN if NOT_PLAIN in items else items
    if isinstance(value, dict):
        items = {str(k): _plain(v) for k, v in value.items()}
        return NOT_PLAIN if NOT_PLAIN in items.values() else items
    return NOT_PLAIN


def module_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """Parameter / buffer shapes and, per module, its type and plain public attributes."""
    tensors = {n: list(p.shape) for n, p in model.named_parameters()}
    tensors.update({f"{n} (buffer)": list(b.shape) for n, b in model.named_buffers()})
    modules = {}
    for name, module in model.named_modules():
        attrs = {
            k: _plain(v)
            for k, v in vars(module).items()
            if not k.startswith("_") and k != "training" and _plain(v) is not NOT_PLAIN
        }
        modules[name or "(model)"] = {"type": type(module).__name__, **attrs}
    return {"tensors": tensors, "modules": modules}


def metric_fingerprint(metric: Any) -> dict[str, Any]:
    """Type and plain public attributes of a metric, and of the task metrics it wraps."""
    out = {"type": type(metric).__name__}
    for key in dir(metric):
        if key.startswith("_") or key in ("results", "dataset_meta"):
            continue
        try:
            value = getattr(metric, key)
        except Exception:  # a property that needs data the metric has not seen
            continue
        if callable(value):
            continue
        if isinstance(value, dict) and value and all(hasattr(v, "process") for v in value.values()):
            # the metrics a metric wraps, whatever its attribute is called
            out["(wrapped metrics)"] = {k: metric_fingerprint(v) for k, v in value.items()}
        elif _plain(value) is not NOT_PLAIN:
            out[key] = _plain(value)
    return out


def _evaluator_metric(cfg: Any, key: str, dataset_meta: dict) -> Any:
    from mmseg.registry import METRICS

    evaluator = cfg.get(key)
    if evaluator is None:
        return None
    entries = evaluator if isinstance(evaluator, list | tuple) else [evaluator]
    out = []
    for entry in entries:
        metric = METRICS.build(entry.to_dict() if hasattr(entry, "to_dict") else dict(entry))
        metric.dataset_meta = dataset_meta
        out.append(metric_fingerprint(metric))
    return out


def fingerprint(path: str) -> dict[str, Any]:
    """The fingerprint of the config file ``path`` (see the module docstring)."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS, MODELS

    import mmseg_m3vit  # noqa: F401  (registers the plugin)

    cfg = Config.fromfile(path)
    init_default_scope(cfg.get("default_scope", "mmseg"))
    with torch.device("meta"):
        model = MODELS.build(cfg.model)
    dataset_cfg = cfg.test_dataloader.dataset
    dataset_cls = DATASETS.get(dataset_cfg.type)
    tasks = list(dataset_cfg.get("tasks") or [])
    from mmseg_m3vit.tasks import DATASET_TASKS

    channels = DATASET_TASKS[dataset_cls.DATASET]
    dataset_meta = dict(
        dataset_cls.METAINFO,
        tasks=tasks,
        task_channels={t: channels[t] for t in tasks},
    )
    out: dict[str, Any] = {"model": module_fingerprint(model)}
    for key in ("val_evaluator", "test_evaluator"):
        out[key] = _evaluator_metric(cfg, key, dataset_meta)
    for key in RUNNER_KEYS:
        value = cfg.get(key)
        out[key] = value.to_dict() if hasattr(value, "to_dict") else value
    return json.loads(json.dumps(out, default=repr))


def diff(old: Any, new: Any, path: str = "") -> list[str]:
    """Every path at which two JSON values differ, as ``path: old -> new`` lines."""
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for key in sorted(set(old) | set(new)):
            sub = f"{path}.{key}" if path else key
            if key not in old:
                lines.append(f"{sub}: (absent) -> {json.dumps(new[key])[:200]}")
            elif key not in new:
                lines.append(f"{sub}: {json.dumps(old[key])[:200]} -> (absent)")
            else:
                lines.extend(diff(old[key], new[key], sub))
        return lines
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        pairs = enumerate(zip(old, new))
        return [line for i, (a, b) in pairs for line in diff(a, b, f"{path}[{i}]")]
    return [] if old == new else [f"{path}: {json.dumps(old)[:200]} -> {json.dumps(new)[:200]}"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the fingerprint tool."""
    parser = argparse.ArgumentParser(
        description="Fingerprint what configs build (model, metrics, data, schedule), or "
        "compare two fingerprint files",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("configs", nargs="*", help="config files to fingerprint")
    parser.add_argument("--out", default=None, help="write the JSON here (default: stdout)")
    parser.add_argument(
        "--diff", nargs=2, metavar=("OLD", "NEW"), help="compare two fingerprint files"
    )
    parser.add_argument(
        "--rename",
        nargs="+",
        default=[],
        metavar="OLD=NEW",
        help="with --diff: config OLD of the first file is config NEW of the second",
    )
    args = parser.parse_args(argv)
    if bool(args.configs) == bool(args.diff):
        parser.error("give config files, or --diff OLD.json NEW.json")
    return args


def main(argv: list[str] | None = None) -> int:
    """Write fingerprints, or print the differences of two fingerprint files."""
    args = parse_args(argv)
    if args.diff:
        with open(args.diff[0]) as f:
            old = json.load(f)
        with open(args.diff[1]) as f:
            new = json.load(f)
        rename = dict(item.split("=", 1) for item in args.rename)
        old = {rename.get(k, k): v for k, v in old.items()}
        lines = diff(old, new)
        print("\n".join(lines) if lines else f"identical: {len(new)} configs")
        return 1 if lines else 0
    result = {osp.relpath(p): fingerprint(p) for p in args.configs}
    text = json.dumps(result, indent=1, sort_keys=True)
    if args.out is None:
        print(text)
    else:
        tmp = f"{args.out}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
