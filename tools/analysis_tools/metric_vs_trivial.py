"""A trained checkpoint's test metrics beside trivial predictors, per task.

Usage::

    python tools/analysis_tools/metric_vs_trivial.py CONFIG CHECKPOINT [--out FILE.json]
        [--trust-checkpoint]

Runs the config's test loop on the checkpoint (as ``tools/test.py``) and evaluates, with
the same metrics and data, the trivial predictors of ``tools/demo.py`` fitted on the
training split: majority class (semseg), mean depth, mean normal, all-zero edges. Prints
the per-task table (``yes`` where the model beats the trivial predictor) and writes both
metric dicts to ``--out``. Exit status 1 when the model does not beat every trivial
predictor.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import os.path as osp
import sys
import tempfile
from typing import Any

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)


def _demo() -> Any:
    """tools/demo.py as a module (its trivial predictors and result table)."""
    spec = importlib.util.spec_from_file_location("m3vit_demo", osp.join(ROOT, "tools", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("checkpoint")
    p.add_argument("--out", default=None, help="JSON with both metric dicts")
    p.add_argument("--trust-checkpoint", action="store_true")
    args = p.parse_args(argv)
    for path, what in ((args.config, "config"), (args.checkpoint, "checkpoint")):
        if not osp.isfile(path):
            print(f"metric_vs_trivial.py: error: {what} {path!r} does not exist", file=sys.stderr)
            return 2
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    import mmseg_m3vit  # noqa: F401
    from mmseg_m3vit.utils import config_tasks

    trust = True if args.trust_checkpoint else None  # None: M3VIT_TRUST_CHECKPOINT
    demo = _demo()
    cfg = Config.fromfile(args.config)
    init_default_scope(cfg.get("default_scope", "mmseg"))
    tasks = config_tasks(cfg)
    with tempfile.TemporaryDirectory() as work:
        cfg.work_dir = work
        cfg.load_from = None
        cfg.default_hooks.visualization = dict(type="MultiTaskVisualizationHook", draw=False)
        runner = Runner.from_cfg(cfg)
        from mmseg_m3vit.compat.checkpoint import load_model_checkpoint

        load_model_checkpoint(runner.model, args.checkpoint, trust=trust)
        metrics = runner.test()
    stats = demo.fit_trivial(cfg, tasks)
    trivial = demo.evaluate_trivial(cfg, stats)
    table, all_better = demo.result_table(tasks, metrics, trivial)
    print(table)
    if args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"model": metrics, "trivial": trivial, "checkpoint": args.checkpoint},
                      f, indent=2, default=float)  # fmt: skip
        os.replace(tmp, args.out)
    return 0 if all_better else 1


if __name__ == "__main__":
    sys.exit(main())
