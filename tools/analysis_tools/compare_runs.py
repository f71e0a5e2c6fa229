"""Compare trained runs in one markdown table like the paper's, plus routing figures.

Usage::

    python tools/analysis_tools/compare_runs.py --root WORK_ROOT [--out comparison.md]
        [--json comparison.json] [--figure-dir DIR] [--no-flops] [--shape H W]
    python tools/analysis_tools/compare_runs.py WORK_DIR [WORK_DIR ...] [...]

A work directory is one training run of ``tools/train.py``. Read from it:

- the config dump, the one ``*.py`` file at its top (``tools/train.py`` writes it);
- the test metrics: the newest ``test/<time>/<time>.json`` (``tools/test.py CONFIG CKPT
  --work-dir <work_dir>/test``); a run without them is listed as not tested;
- optionally ``routing.json`` (``routing.py --json``), ``routing_init.json`` (the same
  without a checkpoint) and ``inference_speed.json`` (``inference_speed.py``).

``--root`` takes every subdirectory holding a config dump. Runs whose configs differ
only in ``randomness.seed`` form one row: mean ± half the range over the seeds (for two
seeds: each seed is mean ± that; the JSON keeps every seed's value).

Columns:

- one per task: the task's main metric on the test split (semseg mIoU %, depth RMSE m,
  normals mean angle °, ...; arrows say which direction is better);
- Δm (%) against the single-task models: runs with one head are the reference of their
  task, ``Δm = 1/T Σ_t (-1)^{l_t} (M_t - M_stl,t) / M_stl,t x 100`` over the row's tasks
  that have a reference (docs/model.md s. 6; l_t = 1 when lower is better), computed per seed,
  then averaged;
- parameters (all of them, M) and multiply-adds (``flops.py``; 1 MAC = 2 FLOPs, every
  matmul counted, only the experts a token is routed to) at the backbone's input size:
  one task's pathway (the mean over the model's tasks) and all tasks (``predict`` for
  every task);
- milliseconds per image of the single-task pathway (mean over tasks) at each batch
  size of ``inference_speed.json``, and the device it was measured on.

Routing, for every MoE row (its first seed): a heat map per task of the fraction of
tokens sent to each expert in each MoE layer, trained and at random initialisation, and
(two tasks) their difference (``routing_<row>.png`` in ``--figure-dir``)
and the task divergence, the mean over MoE layers of the total-variation distance
``1/2 Σ_e |p_a(e) - p_b(e)|`` between two tasks' expert distributions ``p = load / k``
(0: the tasks use the experts identically, 1: disjoint experts), averaged over task pairs;
beside it the same for the randomly initialised model (``routing_init.json``, written by
``routing.py CONFIG --init-seed S``), since independent random task routers already send
the tasks to different experts.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import os.path as osp
import re
import statistics
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

#: Config keys that do not describe the model, data or schedule (left out of the row key).
RUN_ONLY_KEYS = ("randomness", "work_dir", "launcher", "resume", "load_from", "filename")
ROUTER_NAMES = {
    "multi_gate": "multi-gate",
    "task_conditioned": "task-conditioned",
    "shared": "shared router",
}
METRIC_UNITS = {"mIoU": "%", "rmse": "m", "mean": "°", "odsF": "%", "maxIoU": "%"}


@dataclass
class RunInfo:
    """What one work directory holds."""

    work_dir: str
    config_path: str
    cfg: object
    seed: int
    tasks: list[str]
    key: str
    label: str
    metrics: dict[str, float] | None
    routing: dict | None = None
    routing_init: dict | None = None
    speed: dict | None = None


@dataclass
class Row:
    """One table row: the runs of one config (one per seed) and what is computed."""

    label: str
    runs: list[RunInfo]
    is_stl: bool
    stats: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- reading
def read_json(path: str) -> dict:
    """Load a JSON file, naming the file when it is not valid JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def config_dump(work_dir: str) -> str | None:
    """The one ``*.py`` at the top of ``work_dir`` (None when there is none).

    Raises:
        ValueError: several ``.py`` files, so the run's config is ambiguous.
    """
    found = sorted(glob.glob(osp.join(work_dir, "*.py")))
    if len(found) > 1:
        raise ValueError(
            f"work dir {work_dir!r} holds several configs {[osp.basename(f) for f in found]}; "
            "expected the one tools/train.py dumped"
        )
    return found[0] if found else None


def test_metrics(work_dir: str) -> dict[str, float] | None:
    """The newest test metrics under ``<work_dir>/test/<time>/<time>.json`` (or None)."""
    found = sorted(glob.glob(osp.join(work_dir, "test", "*", "*.json")))
    found = [f for f in found if osp.basename(f)[:-5] == osp.basename(osp.dirname(f))]
    if not found:
        return None
    data = read_json(found[-1])
    return {k: float(v) for k, v in data.items() if isinstance(v, int | float)}


def model_label(cfg) -> str:
    """A readable name for the model of ``cfg``: architecture, routing, tasks."""
    from mmseg_m3vit.utils import config_tasks

    bb = cfg.model.backbone
    tasks = config_tasks(cfg)
    moe = bb.get("moe_layers")
    if moe is not None and len(moe) == 0:
        kind = "dense ViT"
    else:
        router = bb.get("router", "multi_gate")
        kind = f"M3ViT {ROUTER_NAMES.get(router, router)}"
    return f"{kind}, single-task {tasks[0]}" if len(tasks) == 1 else f"{kind}, multi-task"


def run_key(cfg) -> str:
    """The config without its run-only keys, as canonical JSON (runs of one row share it)."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in RUN_ONLY_KEYS}
    return json.dumps(d, sort_keys=True, default=str)


def load_run(work_dir: str) -> RunInfo:
    """Read one work directory (see the module docstring).

    Raises:
        FileNotFoundError: ``work_dir`` holds no config dump.
    """
    from mmengine.config import Config

    from mmseg_m3vit.utils import config_tasks

    path = config_dump(work_dir)
    if path is None:
        raise FileNotFoundError(f"work dir {work_dir!r} holds no config dump (*.py)")
    cfg = Config.fromfile(path)
    seed = (cfg.get("randomness") or {}).get("seed")
    routing = routing_init = speed = None
    if osp.isfile(osp.join(work_dir, "routing.json")):
        routing = read_json(osp.join(work_dir, "routing.json"))
    if osp.isfile(osp.join(work_dir, "routing_init.json")):
        routing_init = read_json(osp.join(work_dir, "routing_init.json"))
    if osp.isfile(osp.join(work_dir, "inference_speed.json")):
        speed = read_json(osp.join(work_dir, "inference_speed.json"))
    return RunInfo(
        work_dir=work_dir,
        config_path=path,
        cfg=cfg,
        seed=seed,
        tasks=list(config_tasks(cfg)),
        key=run_key(cfg),
        label=model_label(cfg),
        metrics=test_metrics(work_dir),
        routing=routing,
        routing_init=routing_init,
        speed=speed,
    )


def find_work_dirs(root: str) -> list[str]:
    """Subdirectories of ``root`` holding a config dump, sorted by name."""
    if not osp.isdir(root):
        raise FileNotFoundError(f"--root {root!r} is not a directory")
    return sorted(
        d for d in glob.glob(osp.join(root, "*")) if osp.isdir(d) and glob.glob(osp.join(d, "*.py"))
    )


# ----------------------------------------------------------------------------- numbers
def main_metric(metrics: Mapping[str, float], task: str) -> float:
    """The task's main metric (``<task>/<main>``, e.g. ``semseg/mIoU``) from test metrics.

    Raises:
        KeyError: naming the missing key and the keys there are.
    """
    from mmseg_m3vit.tasks import get_task

    key = f"{task}/{get_task(task).main_metric}"
    if key not in metrics:
        raise KeyError(f"test metrics have no {key!r}; keys: {sorted(metrics)}")
    return metrics[key]


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half the range) of ``values``."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def task_divergence(load: Mapping[str, Sequence[Sequence[float]]]) -> dict:
    """Total-variation distance between the tasks' expert distributions (docstring).

    ``load[task]`` is (L, E), rows summing to k. Returns ``{"mean": float, "per_layer":
    [float] * L}`` averaged over task pairs; None values when there is one task.
    """
    arrays = {t: np.asarray(a, dtype=np.float64) for t, a in load.items()}
    if len(arrays) < 2:
        return {"mean": None, "per_layer": None}
    per_pair = []
    for a, b in combinations(arrays.values(), 2):
        pa = a / a.sum(axis=1, keepdims=True)
        pb = b / b.sum(axis=1, keepdims=True)
        per_pair.append(0.5 * np.abs(pa - pb).sum(axis=1))
    per_layer = np.mean(per_pair, axis=0)
    return {"mean": float(per_layer.mean()), "per_layer": [float(v) for v in per_layer]}


def experts_used(load: Sequence[Sequence[float]], k: float, share: float = 0.01) -> float:
    """Mean over layers of the number of experts that receive more than ``share`` of the
    routed token slots (``load / k``)."""
    arr = np.asarray(load, dtype=np.float64)
    return float(((arr / k) > share).sum(axis=1).mean())


def model_stats(cfg, shape: Sequence[int] | None, count_flops: bool) -> dict:
    """Parameters and (optionally) multiply-adds of the config's model on CPU."""
    import torch
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    import mmseg_m3vit  # noqa: F401  (registers the plugin)

    init_default_scope(cfg.get("default_scope", "mmseg"))
    model_cfg = cfg.model.to_dict()
    model_cfg["backbone"]["pretrained"] = None
    model = MODELS.build(model_cfg)
    out = {"params": int(sum(p.numel() for p in model.parameters()))}
    if count_flops:
        from flops import count_macs  # noqa: PLC0415 (tools/analysis_tools)

        shape = list(shape or model.backbone.img_size)
        x = torch.zeros(1, 3, *shape)
        per_task = {t: count_macs(model, x, [t])["total"] for t in model.tasks}
        out.update(
            shape=shape,
            macs_per_task=per_task,
            macs_single=float(statistics.fmean(per_task.values())),
            macs_all=count_macs(model, x, list(model.tasks))["total"],
        )
    return out


def build_rows(runs: Sequence[RunInfo]) -> list[Row]:
    """Group runs by config (seeds together), label rows uniquely, STL rows last."""
    groups: dict[str, list[RunInfo]] = {}
    for r in runs:
        groups.setdefault(r.key, []).append(r)
    rows = []
    for members in groups.values():
        members.sort(key=lambda r: (r.seed is None, r.seed))
        seeds = [r.seed for r in members]
        if len(set(seeds)) != len(seeds):
            raise ValueError(
                f"runs {[r.work_dir for r in members]} have the same config and seed {seeds}"
            )
        rows.append(Row(members[0].label, members, is_stl=len(members[0].tasks) == 1))
    labels = [r.label for r in rows]
    for row in rows:  # the same architecture trained differently: add the config name
        if labels.count(row.label) > 1:
            row.label += f" ({osp.splitext(osp.basename(row.runs[0].config_path))[0]})"
    rows.sort(key=lambda r: (r.is_stl, not r.label.startswith("M3ViT"), r.label))
    return rows


def stl_references(rows: Sequence[Row]) -> dict[str, float]:
    """Task -> mean test metric of its single-task row (tested seeds).

    Raises:
        ValueError: two single-task rows for one task (which one is the reference?).
    """
    refs: dict[str, float] = {}
    owner: dict[str, str] = {}
    for row in rows:
        if not row.is_stl:
            continue
        tested = [r for r in row.runs if r.metrics is not None]
        if not tested:
            continue
        task = row.runs[0].tasks[0]
        if task in refs:
            raise ValueError(
                f"two single-task rows for {task!r}: {owner[task]!r} and {row.label!r}"
            )
        refs[task] = statistics.fmean(main_metric(r.metrics, task) for r in tested)
        owner[task] = row.label
    return refs


def compute(
    rows: Sequence[Row], shape: Sequence[int] | None, count_flops: bool
) -> dict[str, float]:
    """Fill every row's ``stats``; returns the single-task references."""
    from mmseg_m3vit.evaluation.metrics.delta_metric import delta_m

    refs = stl_references(rows)
    for row in rows:
        tested = [r for r in row.runs if r.metrics is not None]
        tasks = row.runs[0].tasks
        st: dict = {"seeds": [r.seed for r in tested], "untested": [
            osp.basename(r.work_dir) for r in row.runs if r.metrics is None
        ]}  # fmt: skip
        if tested:
            per_seed = {t: [main_metric(r.metrics, t) for r in tested] for t in tasks}
            st["metric"] = {t: mean_spread(v) for t, v in per_seed.items()}
            st["metric_per_seed"] = per_seed
            with_ref = [t for t in tasks if t in refs]
            zero = [t for t in with_ref if refs[t] == 0]
            if zero and not row.is_stl:
                st["delta_m_note"] = f"undefined: single-task reference of {zero} is 0"
            elif with_ref and not row.is_stl:
                dms = [
                    delta_m({t: main_metric(r.metrics, t) for t in with_ref}, refs)[0]
                    for r in tested
                ]
                st["delta_m"] = mean_spread(dms)
                st["delta_m_per_seed"] = dms
                st["delta_m_tasks"] = with_ref
        st.update(model_stats(row.runs[0].cfg, shape, count_flops))
        speed = next((r.speed for r in row.runs if r.speed), None)
        if speed:
            st["speed"] = {
                b: statistics.fmean(v[t] for t in tasks) for b, v in speed["ms_per_image"].items()
            }
            st["speed_device"] = speed.get("device")
        routed = next((r for r in row.runs if r.routing), None)
        if routed is not None:
            load = routed.routing["load"]
            k = float(np.asarray(next(iter(load.values()))).sum(axis=1).mean())
            st["routing"] = {
                "seed": routed.seed,
                "work_dir": osp.basename(routed.work_dir),
                "top_k": round(k, 3),
                "divergence": task_divergence(load),
                "experts_used": {t: experts_used(a, k) for t, a in load.items()},
            }
            init = next((r.routing_init for r in row.runs if r.routing_init), None)
            if init is not None:
                st["routing"]["divergence_init"] = task_divergence(init["load"])
                st["routing"]["experts_used_init"] = {
                    t: experts_used(a, k) for t, a in init["load"].items()
                }
        row.stats = st
    return refs


# ----------------------------------------------------------------------------- output
def _fmt(value: float, spread: float | None, digits: int, signed: bool = False) -> str:
    sign = "+" if signed else ""
    text = f"{value:{sign}.{digits}f}"
    return text + (f" ± {spread:.{digits}f}" if spread else "")


def _digits(task: str) -> int:
    from mmseg_m3vit.tasks import get_task

    return 3 if get_task(task).main_metric == "rmse" else 2


def format_table(rows: Sequence[Row], refs: Mapping[str, float]) -> str:
    """The markdown table (see the module docstring)."""
    from mmseg_m3vit.tasks import TASK_SPECS, get_task

    present = {t for row in rows for t in row.runs[0].tasks}
    tasks = [t for t in TASK_SPECS if t in present]
    batches: list[str] = []
    for row in rows:
        batches += [b for b in row.stats.get("speed", {}) if b not in batches]
    batches.sort(key=int)
    has_flops = any("macs_all" in r.stats for r in rows)
    head = ["model", "seeds"]
    for t in tasks:
        spec = get_task(t)
        arrow = "↓" if spec.lower_is_better else "↑"
        unit = METRIC_UNITS.get(spec.main_metric, "")
        head.append(f"{t} {spec.main_metric}{f' ({unit})' if unit else ''} {arrow}")
    head += ["Δm vs single-task (%) ↑", "params (M)"]
    if has_flops:
        head += ["GMAC one task", "GMAC all tasks"]
    head += [f"ms/img one task, batch {b}" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        st = row.stats
        cells = [row.label, ", ".join(str(s) for s in st["seeds"]) or "not tested"]
        for t in tasks:
            m = st.get("metric", {}).get(t)
            cells.append(_fmt(m[0], m[1], _digits(t)) if m else "")
        dm = st.get("delta_m")
        if dm:
            cells.append(_fmt(dm[0], dm[1], 2, signed=True))
        else:
            cells.append("reference" if row.is_stl else ("n/a" if "delta_m_note" in st else ""))
        cells.append(f"{st['params'] / 1e6:.2f}")
        if has_flops:
            cells += [f"{st['macs_single'] / 1e9:.2f}", f"{st['macs_all'] / 1e9:.2f}"]
        cells += [f"{st['speed'][b]:.3f}" if b in st.get("speed", {}) else "" for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_routing(rows: Sequence[Row], figures: Mapping[str, str]) -> str:
    """Markdown table of the task divergence and experts used per MoE row."""
    routed = [r for r in rows if "routing" in r.stats]
    if not routed:
        return ""
    lines = [
        "| model (seed) | task divergence, mean over MoE layers (per layer) "
        "| at random initialisation | experts used per layer (> 1 % of slots) | figure |",
        "|---|---|---|---|---|",
    ]

    def div_text(div: dict | None) -> str:
        if div is None:
            return ""
        if div["mean"] is None:
            return "one task"
        return f"{div['mean']:.3f} ({', '.join(f'{v:.2f}' for v in div['per_layer'])})"

    for row in routed:
        rt = row.stats["routing"]
        used = ", ".join(f"{t} {v:.1f}" for t, v in rt["experts_used"].items())
        fig = osp.basename(figures.get(row.label, ""))
        trained, init = div_text(rt["divergence"]), div_text(rt.get("divergence_init"))
        lines.append(f"| {row.label} ({rt['seed']}) | {trained} | {init} | {used} | {fig} |")
    return "\n".join(lines)


def plot_task_routing(
    load: Mapping[str, Sequence[Sequence[float]]],
    init: Mapping[str, Sequence[Sequence[float]]] | None,
    path: str,
    title: str = "",
) -> None:
    """Save the routing figure of one model: a heat map (MoE layer x expert) per task of
    the trained model, then of the randomly initialised one (``init``, if given), each
    row with its own colour scale; with two tasks a last column shows their difference
    (first task minus second, a diverging scale symmetric about 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(load)
    sets = [("trained", load)] + ([("random init", init)] if init is not None else [])
    ncols = len(tasks) + (1 if len(tasks) == 2 else 0)
    fig, axes = plt.subplots(
        len(sets), ncols, figsize=(3.0 * ncols + 1.5, 3.0 * len(sets)), squeeze=False
    )
    fig.subplots_adjust(hspace=0.55, wspace=0.35)
    for i, (name, loads) in enumerate(sets):
        arrays = {t: np.asarray(loads[t], dtype=np.float64) for t in tasks}
        vmax = max(float(a.max()) for a in arrays.values())
        for j, t in enumerate(tasks):
            im = axes[i, j].imshow(arrays[t], vmin=0, vmax=vmax, cmap="magma", aspect="auto")
            axes[i, j].set_title(f"{t} ({name})", fontsize=9)
        fig.colorbar(im, ax=axes[i, : len(tasks)].tolist(), label="fraction of tokens")
        if len(tasks) == 2:
            diff = arrays[tasks[0]] - arrays[tasks[1]]
            lim = float(np.abs(diff).max()) or 1.0
            im = axes[i, 2].imshow(diff, vmin=-lim, vmax=lim, cmap="coolwarm", aspect="auto")
            axes[i, 2].set_title(f"{tasks[0]} - {tasks[1]} ({name})", fontsize=9)
            fig.colorbar(im, ax=axes[i, 2])
        for ax in axes[i]:
            ax.set_xlabel("expert", fontsize=8)
            ax.set_ylabel("MoE layer", fontsize=8)
            ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def slug(text: str) -> str:
    """File-name-safe version of a row label."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def write_text(text: str, path: str) -> None:
    """Write ``text`` atomically (temp file, rename)."""
    d = osp.dirname(osp.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the comparison tool."""
    from mmseg_m3vit.utils.cli import HelpFormatter

    p = argparse.ArgumentParser(
        description="Markdown table of trained runs, like the paper's",
        formatter_class=HelpFormatter,
    )
    p.add_argument("work_dirs", nargs="*", help="training work directories")
    p.add_argument("--root", help="take every run directory under this folder")
    p.add_argument("--out", help="write the markdown here (default: print only)")
    p.add_argument("--json", help="also write every number to this JSON file")
    p.add_argument("--figure-dir", help="write routing_<row>.png here")
    p.add_argument("--no-flops", action="store_true", help="skip the multiply-add counts")
    p.add_argument("--shape", type=int, nargs=2, metavar=("H", "W"), help="input size for MACs")
    args = p.parse_args(argv)
    if not args.work_dirs and not args.root:
        p.error("give work directories or --root")
    return args


def main(argv: list[str] | None = None) -> str:
    """Read the runs, print (and write) the markdown; returns it."""
    args = parse_args(argv)
    sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
    dirs = list(args.work_dirs) + (find_work_dirs(args.root) if args.root else [])
    if not dirs:
        raise SystemExit(f"no work directories with a config dump under {args.root!r}")
    rows = build_rows([load_run(d) for d in dirs])
    refs = compute(rows, args.shape, not args.no_flops)
    figures: dict[str, str] = {}
    if args.figure_dir:
        for row in rows:
            routed = next((r for r in row.runs if r.routing), None)
            if routed is None:
                continue
            init = next((r.routing_init for r in row.runs if r.routing_init), None)
            path = osp.join(args.figure_dir, f"routing_{slug(row.label)}.png")
            plot_task_routing(
                routed.routing["load"],
                init["load"] if init else None,
                path,
                title=f"{row.label}, seed {routed.seed}: tokens per expert, test split",
            )
            figures[row.label] = path
    text = format_table(rows, refs)
    routing_text = format_routing(rows, figures)
    if routing_text:
        text += "\n\nRouting on the test split (task divergence: 0 = same experts, "
        text += "1 = disjoint)\n\n"
        text += routing_text
    for r in rows:
        if "delta_m_note" in r.stats:
            text += f"\n\nΔm of {r.label}: {r.stats['delta_m_note']}"
    untested = [u for r in rows for u in r.stats["untested"]]
    if untested:
        text += f"\n\nNot tested (no test metrics): {', '.join(untested)}"
    print(text)
    if args.out:
        write_text(text + "\n", args.out)
    if args.json:
        payload = {
            "references": refs,
            "rows": [
                {"label": r.label, "work_dirs": [osp.basename(x.work_dir) for x in r.runs]}
                | r.stats
                for r in rows
            ],
        }
        write_text(json.dumps(payload, indent=2, default=str) + "\n", args.json)
    return text


if __name__ == "__main__":
    main()
