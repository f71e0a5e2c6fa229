"""Train, test and analyse every model of the comparison study on one GPU, all at once.

Usage::

    python tools/analysis_tools/run_comparison.py --work-root work_dirs/comparison \
        --data-root data/synthetic_nyud_240x320 [--generate 2400 400 --workers 16] \
        [--iters N | --deadline-s 560 --reserve-s 110] [--runs NAME=CONFIG[:SEED] ...] \
        [--pack results.tar.gz]

The default runs are the configs of ``configs/comparison/``: M3ViT multi-gate (seeds 0
and 1), task-conditioned and shared router (seed 0), the dense multi-task ViT (seeds 0
and 1) and one dense single-task ViT per task (seed 0). Small models leave most of a
large GPU idle, so every run trains at the same time in its own process
(``tools/train.py --amp``); the GPU is time-shared between them.

Phases; re-running the same command resumes, each phase skipping what is done:

1. data: with ``--generate NTRAIN NTEST`` and no data root yet, render the synthetic set
   (``make_synthetic_nyud``; deterministic for a seed, whatever ``--workers``).
2. plan: the iteration count N of every run. ``--iters N``; or, with ``--deadline-s``,
   a timing probe: every run trains at once (at 1 % of the learning rate and without
   validation: only the speed is used) until each has logged ``--probe-warmup``
   iterations, then ``--probe-seconds`` more, and is stopped; t_i is run i's median
   seconds per iteration over the log windows that lie wholly inside that common
   window, when every run was training. N follows from the rule
   ``N = floor(budget / (safety * sum_i t_i / R))`` rounded down to a multiple of
   ``--iters-step``: with R runs sharing the device about evenly, one iteration of every
   run costs about ``sum_i t_i / R`` seconds of it; ``budget`` is the time left before
   ``--deadline-s`` minus ``--reserve-s`` (test, routing, speed) and ``--startup-s``.
   Without either option each config's own schedule is used. ``plan.json`` keeps N for
   a resume.
3. train: every run at once, each config's schedule scaled to N iterations (schedulers
   ending at the config's ``max_iters`` end at N; validation and checkpoint intervals
   keep their fraction of the schedule), the data root replaced by ``--data-root``.
   Training has priority over the later phases: it may run on into ``--reserve-s`` and
   is only stopped ``--min-eval-s`` before the deadline (the checkpoints stay; the same
   command resumes it).
4. test: ``tools/test.py --amp`` on the test split with each run's best checkpoint
   (selected on the held-out val split during training), all runs at once.
5. routing: ``routing.py --json`` on the test split for every MoE model, and for the
   first seed of every MoE config also at random initialisation (``routing_init.json``).
6. speed: ``inference_speed.py`` on the first seed of every config, one model at a time
   after everything else has finished.
7. table: ``compare_runs.py`` -> ``<work root>/comparison.md`` and routing figures.
8. pack: with ``--pack``, the small files (configs, logs, metrics, routing, speed,
   table; no checkpoints) into one ``.tar.gz``.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import os
import os.path as osp
import re
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

COMPARISON = "configs/comparison"
_MOE = COMPARISON + "/m3vit_vit-s16-moe16-top4-{}_1xb16-1250it_synthnyud2task-240x320.py"
_DENSE = COMPARISON + "/vit-s16-dense_1xb16-1250it_synthnyud{}-240x320.py"
#: (name, config relative to the repository root, seed) of the default study.
DEFAULT_RUNS: list[tuple[str, str, int]] = [
    ("m3vit-mg_s0", _MOE.format("mg"), 0),
    ("m3vit-mg_s1", _MOE.format("mg"), 1),
    ("m3vit-tc_s0", _MOE.format("tc"), 0),
    ("m3vit-shared_s0", _MOE.format("shared"), 0),
    ("dense-mtl_s0", _DENSE.format("2task"), 0),
    ("dense-mtl_s1", _DENSE.format("2task"), 1),
    ("dense-stl-semseg_s0", _DENSE.format("-semseg"), 0),
    ("dense-stl-depth_s0", _DENSE.format("-depth"), 0),
]

PROBE_MAX_ITERS = 10**7
PACK_PATTERNS = ("*.py", "*.json", "*.log", "*.png", "*.md", "*.txt")
PACK_MAX_BYTES = 4 << 20


@dataclass
class Run:
    """One training run: a name (its work directory), a config and a seed."""

    name: str
    config: str
    seed: int


def log(msg: str) -> None:
    """Print a time-stamped progress line."""
    print(f"[run_comparison {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_run(text: str) -> Run:
    """``NAME=CONFIG[:SEED]`` -> :class:`Run` (seed 0 when omitted)."""
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)=(.+?)(?::(\d+))?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--runs entry {text!r} is not NAME=CONFIG[:SEED]")
    return Run(m.group(1), m.group(2), int(m.group(3) or 0))


# ----------------------------------------------------------------------------- configs
def scale_schedule(cfg, iters: int) -> None:
    """Scale ``cfg``'s schedule (in place) from its ``train_cfg.max_iters`` to ``iters``.

    Schedulers whose ``end`` is the old ``max_iters`` end at ``iters``; the validation
    and checkpoint intervals keep their fraction of the schedule (at least 1).

    Raises:
        ValueError: ``iters`` does not leave a scheduler that must end at it a positive
        length (its ``begin`` is not below ``iters``).
    """
    old = int(cfg.train_cfg.max_iters)
    old_val = int(cfg.train_cfg.get("val_interval", old))
    val = max(1, round(old_val * iters / old))
    for i, sched in enumerate(cfg.get("param_scheduler") or []):
        if sched.get("end") == old:
            if sched.get("begin", 0) >= iters:
                raise ValueError(
                    f"param_scheduler[{i}] ({sched['type']}) begins at {sched['begin']}, "
                    f"not before the {iters} iterations asked for"
                )
            sched["end"] = iters
    cfg.train_cfg.max_iters = iters
    cfg.train_cfg.val_interval = val
    if "max_iters" in cfg:
        cfg.max_iters = iters
    if "val_interval" in cfg:
        cfg.val_interval = val
    cfg.default_hooks.checkpoint.interval = val


def set_data_root(cfg, data_root: str) -> None:
    """Point every data loader's data set (and ``cfg.data_root``) at ``data_root``."""
    from mmseg_m3vit.utils.preflight import DATALOADER_KEYS, iter_datasets

    if "data_root" in cfg:
        cfg.data_root = data_root
    for key in DATALOADER_KEYS:
        loader = cfg.get(key)
        if loader:
            for _, ds in iter_datasets(loader.get("dataset"), key):
                ds["data_root"] = data_root


def derive_config(
    run: Run,
    out_dir: str,
    iters: int | None,
    data_root: str | None,
    probe: bool = False,
) -> str:
    """Write the config ``run`` trains with into ``out_dir``; returns its path.

    The file is named after the original config (so runs that differ only in the seed
    share the name) inside a folder per run. ``probe``: ``iters`` is the logging
    interval (and the window logged times are averaged over); no validation, no
    checkpoints, 1 % of the learning rate, no LR schedule, no end.
    """
    from mmengine.config import Config

    cfg = Config.fromfile(osp.join(ROOT, run.config) if not osp.isabs(run.config) else run.config)
    if iters is not None:
        if probe:  # ``iters`` is the logging interval; the probe is stopped from outside
            cfg.param_scheduler = None
            cfg.optim_wrapper.optimizer.lr = cfg.optim_wrapper.optimizer.lr * 0.01
            cfg.train_cfg.max_iters = PROBE_MAX_ITERS
            cfg.train_cfg.val_begin = PROBE_MAX_ITERS + 1
            cfg.default_hooks.checkpoint.update(interval=PROBE_MAX_ITERS, save_last=False)
            cfg.default_hooks.logger.interval = iters
            cfg.log_processor = dict(cfg.get("log_processor") or {}, window_size=iters)
        else:
            scale_schedule(cfg, iters)
    if data_root is not None:
        set_data_root(cfg, data_root)
    cfg.randomness = dict(cfg.get("randomness") or {}, seed=run.seed)
    path = osp.join(out_dir, run.name, osp.basename(run.config))
    os.makedirs(osp.dirname(path), exist_ok=True)
    cfg.dump(path)
    return path


# ----------------------------------------------------------------------------- processes
def launch(cmd: list[str], log_path: str) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, output appended to ``log_path``."""
    os.makedirs(osp.dirname(log_path), exist_ok=True)
    fh = open(log_path, "a")  # noqa: SIM115 (closed by wait_all)
    fh.write(f"\n$ {' '.join(cmd)}\n")
    fh.flush()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(
        cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
    )
    proc.log_file = fh  # type: ignore[attr-defined]
    return proc


def stop(proc: subprocess.Popen) -> None:
    """Terminate ``proc``'s process group (SIGTERM, then SIGKILL after 10 s)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def wait_all(
    procs: dict[str, subprocess.Popen], deadline: float | None, what: str
) -> dict[str, int | None]:
    """Wait for every process; stop those still running at ``deadline`` (epoch seconds).

    Returns name -> exit code (None: stopped at the deadline).
    """
    codes: dict[str, int | None] = {}
    last_report = time.time()
    while len(codes) < len(procs):
        for name, p in procs.items():
            if name not in codes and p.poll() is not None:
                codes[name] = p.returncode
                log(f"{what} {name}: exit {p.returncode}")
        if deadline is not None and time.time() > deadline:
            for name, p in procs.items():
                if name not in codes:
                    log(f"{what} {name}: stopped at the deadline")
                    stop(p)
                    codes[name] = None
        if time.time() - last_report > 30 and len(codes) < len(procs):
            log(f"{what}: {len(codes)}/{len(procs)} finished")
            last_report = time.time()
        time.sleep(1)
    for p in procs.values():
        p.log_file.close()  # type: ignore[attr-defined]
    return codes


def tail(path: str, n: int = 40) -> str:
    """The last ``n`` lines of a text file."""
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


# ----------------------------------------------------------------------------- logs
def logged_scalars(work_dir: str) -> list[dict]:
    """The training scalars mmengine logged (``<work_dir>/<time>/vis_data/scalars.json``),
    all sessions of a resumed run in order."""
    rows = []
    for path in sorted(glob.glob(osp.join(work_dir, "*", "vis_data", "scalars.json"))):
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def logged_iters(work_dir: str) -> int:
    """The last iteration with a logged iteration time (0 when none)."""
    return max((r["iter"] for r in logged_scalars(work_dir) if "time" in r), default=0)


def probe_seconds_per_iter(work_dir: str, after: int, window: int) -> tuple[float, float]:
    """Median logged (iteration, data) seconds per iteration over the log windows that
    start after iteration ``after`` (window ``w`` covers iterations ``w - window + 1`` to
    ``w``).

    Raises:
        RuntimeError: no such window was logged.
    """
    rows = [
        r for r in logged_scalars(work_dir) if "time" in r and r.get("iter", 0) - window >= after
    ]
    if not rows:
        raise RuntimeError(
            f"{work_dir}: no iteration times logged for a window after iteration {after}"
        )
    return (
        statistics.median(r["time"] for r in rows),
        statistics.median(r.get("data_time", 0.0) for r in rows),
    )


def probe(
    runs: list[Run],
    probe_root: str,
    data_root: str,
    amp: bool,
    warmup: int,
    seconds: float,
    window: int,
    timeout: float,
) -> dict[str, tuple[float, float]]:
    """Train every run at once; time them while all are past ``warmup`` iterations.

    Returns name -> (median seconds per iteration, median data seconds per iteration).

    Raises:
        SystemExit: a run stopped by itself (its log tail is printed) or did not reach
        ``warmup`` iterations within ``timeout`` seconds.
    """
    procs = {}
    for run in runs:
        cfg = derive_config(run, osp.join(probe_root, "configs"), window, data_root, True)
        wd = osp.join(probe_root, run.name)
        cmd = [sys.executable, "tools/train.py", cfg, "--work-dir", wd]
        procs[run.name] = launch(cmd + (["--amp"] if amp else []), wd + ".log")
    t0 = time.time()
    start: dict[str, int] | None = None
    try:
        while True:
            time.sleep(1)
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead:
                for n in dead:
                    print(f"----- probe {n} log tail\n{tail(osp.join(probe_root, n + '.log'))}")
                raise SystemExit(f"probe runs {dead} stopped by themselves; nothing was trained")
            done = {n: logged_iters(osp.join(probe_root, n)) for n in procs}
            if start is None:
                if min(done.values()) >= warmup:
                    start, t_start = done, time.time()
                    log(f"probe: every run past {warmup} iterations; timing {seconds:.0f} s")
                elif time.time() - t0 > timeout:
                    raise SystemExit(f"probe: not every run reached {warmup} iterations: {done}")
            elif time.time() - t_start >= seconds:
                break
    finally:
        for p in procs.values():
            stop(p)
            p.log_file.close()  # type: ignore[attr-defined]
    return {n: probe_seconds_per_iter(osp.join(probe_root, n), start[n], window) for n in procs}


def choose_iters(
    seconds_per_iter: dict[str, float], budget_s: float, safety: float, step: int
) -> int:
    """The rule of the module docstring: ``floor(budget / (safety * sum t_i / R))`` rounded
    down to a multiple of ``step``.

    Raises:
        ValueError: the budget does not allow ``step`` iterations.
    """
    per_round = sum(seconds_per_iter.values()) / len(seconds_per_iter)
    iters = int(budget_s / (safety * per_round)) // step * step
    if iters < step:
        raise ValueError(
            f"a training budget of {budget_s:.0f} s allows {budget_s / (safety * per_round):.0f}"
            f" iterations (one iteration of every run costs ~{per_round:.3f} s), under {step}"
        )
    return iters


def finished(work_dir: str, iters: int) -> bool:
    """True when the run's log reached ``iters`` and it saved a checkpoint there."""
    return osp.isfile(osp.join(work_dir, f"iter_{iters}.pth"))


def best_checkpoint(work_dir: str) -> str | None:
    """The checkpoint selected on the val split (``best_*.pth``), else the last one."""
    from inference_speed import work_dir_checkpoint  # noqa: PLC0415 (tools folder)

    try:
        return work_dir_checkpoint(work_dir)
    except FileNotFoundError:
        return None


def is_moe(config: str) -> bool:
    """Whether the config's backbone has MoE layers."""
    from mmengine.config import Config

    bb = Config.fromfile(config).model.backbone
    layers = bb.get("moe_layers")
    return layers is None or len(layers) > 0


# ----------------------------------------------------------------------------- phases
def write_json(obj: object, path: str) -> None:
    """Write JSON atomically."""
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=osp.dirname(osp.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def pack(work_root: str, out: str) -> None:
    """Tar the small result files of ``work_root`` (no checkpoints) into ``out``."""
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    n = 0
    with tarfile.open(tmp, "w:gz") as tar:
        for dirpath, _, files in os.walk(work_root):
            for f in sorted(files):
                path = osp.join(dirpath, f)
                rel = osp.relpath(path, work_root)
                if rel.startswith("probe" + os.sep) and not f.endswith((".json", ".log")):
                    continue
                if not any(fnmatch.fnmatch(f, p) for p in PACK_PATTERNS):
                    continue
                if os.path.getsize(path) > PACK_MAX_BYTES:
                    log(f"pack: skipping {rel} ({os.path.getsize(path)} bytes)")
                    continue
                tar.add(path, arcname=rel)
                n += 1
    os.replace(tmp, out)
    log(f"packed {n} files into {out} ({os.path.getsize(out)} bytes)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the driver."""
    from mmseg_m3vit.utils.cli import HelpFormatter

    p = argparse.ArgumentParser(
        description="Run the M3ViT vs dense comparison study", formatter_class=HelpFormatter
    )
    p.add_argument("--work-root", required=True, help="one work directory per run in here")
    p.add_argument("--data-root", required=True, help="the synthetic NYUD-MT data set")
    p.add_argument("--generate", type=int, nargs=2, metavar=("NTRAIN", "NTEST"))
    p.add_argument("--size", type=int, nargs=2, default=(240, 320), metavar=("H", "W"))
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="data generation")
    p.add_argument("--runs", type=parse_run, nargs="+", help="NAME=CONFIG[:SEED] (default: all)")
    p.add_argument("--iters", type=int, help="iterations of every run")
    p.add_argument("--deadline-s", type=float, help="seconds from start the whole job may use")
    p.add_argument("--reserve-s", type=float, default=110, help="kept for test/routing/speed")
    p.add_argument("--startup-s", type=float, default=30, help="training processes' start-up")
    p.add_argument("--probe-warmup", type=int, default=10, help="iterations before timing")
    p.add_argument("--probe-seconds", type=float, default=20, help="timing window")
    p.add_argument("--probe-window", type=int, default=5, help="iterations per logged time")
    p.add_argument("--probe-timeout", type=float, default=180, help="to reach the warm-up")
    p.add_argument("--min-eval-s", type=float, default=45, help="training stops this early")
    p.add_argument("--safety", type=float, default=1.15)
    p.add_argument("--iters-step", type=int, default=50)
    p.add_argument("--max-iters", type=int, help="upper bound on the probe's choice")
    p.add_argument("--no-amp", action="store_true", help="float32 training (CPU runs)")
    p.add_argument("--device", default=None, help="routing / speed device (default: cuda if any)")
    p.add_argument("--speed-batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--speed-reps", type=int, default=30)
    p.add_argument("--speed-warmup", type=int, default=10)
    p.add_argument("--no-table", action="store_true", help="skip compare_runs.py")
    p.add_argument("--pack", help="write the small result files into this .tar.gz")
    args = p.parse_args(argv)
    if args.iters is not None and args.iters < 1:
        p.error(f"--iters must be >= 1, got {args.iters}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the phases; returns 0 when every run trained, tested and was timed."""
    args = parse_args(argv)
    t0 = time.time()
    deadline = t0 + args.deadline_s if args.deadline_s else None
    runs = args.runs or [Run(*r) for r in DEFAULT_RUNS]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise SystemExit(f"run names must be unique, got {names}")
    root = osp.abspath(args.work_root)
    os.makedirs(root, exist_ok=True)
    sys.path.insert(0, osp.join(ROOT, "tools", "analysis_tools"))
    py = sys.executable
    status_path = osp.join(root, "status.json")
    status: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "phases": {}, "runs": {}}
    if osp.isfile(status_path):
        with open(status_path) as f:
            status = json.load(f) | {"resumed": time.strftime("%Y-%m-%d %H:%M:%S")}

    def phase_done(name: str, since: float) -> None:
        status["phases"][name] = round(time.time() - since, 1)
        write_json(status, status_path)
        log(f"phase {name}: {time.time() - since:.1f} s")

    # 1. data
    t = time.time()
    if not osp.isdir(args.data_root):
        if not args.generate:
            raise SystemExit(f"--data-root {args.data_root!r} does not exist; pass --generate")
        from mmseg_m3vit.datasets.synthetic_nyud import generate

        log(f"generating {args.generate} images at {args.size} with {args.workers} workers")
        generate(
            args.data_root,
            args.generate[0],
            args.generate[1],
            size=tuple(args.size),
            seed=args.data_seed,
            workers=args.workers,
            progress=False,
        )
        phase_done("data", t)
    data_root = osp.abspath(args.data_root)

    # 2. plan
    plan_path = osp.join(root, "plan.json")
    if osp.isfile(plan_path):
        with open(plan_path) as f:
            plan = json.load(f)
        log(f"resuming the plan in {plan_path}: {plan['iters']} iterations")
    elif args.iters is not None or deadline is None:
        plan = {"iters": args.iters, "rule": "given" if args.iters else "configs' own"}
        write_json(plan, plan_path)
    else:
        t = time.time()
        timing = probe(
            runs,
            osp.join(root, "probe"),
            data_root,
            not args.no_amp,
            args.probe_warmup,
            args.probe_seconds,
            args.probe_window,
            timeout=args.probe_timeout,
        )
        spi = {n: v[0] for n, v in timing.items()}
        budget = deadline - time.time() - args.reserve_s - args.startup_s
        iters = choose_iters(spi, budget, args.safety, args.iters_step)
        if args.max_iters is not None:
            iters = min(iters, args.max_iters)
        plan = {
            "iters": iters,
            "rule": "probe",
            "probe_warmup": args.probe_warmup,
            "probe_seconds": args.probe_seconds,
            "probe_seconds_per_iter": spi,
            "probe_data_seconds_per_iter": {n: v[1] for n, v in timing.items()},
            "budget_s": round(budget, 1),
            "safety": args.safety,
            "estimated_train_s": round(iters * args.safety * sum(spi.values()) / len(spi), 1),
        }
        write_json(plan, plan_path)
        for n in names:
            log(f"probe {n}: {spi[n]:.3f} s/iter (data {timing[n][1]:.3f})")
        log(f"plan: {iters} iterations for a training budget of {budget:.0f} s")
        phase_done("probe", t)
    iters = plan["iters"]
    status["plan"] = plan

    # 3. train
    t = time.time()
    cfg_root = osp.join(root, "configs")
    configs = {r.name: derive_config(r, cfg_root, iters, data_root) for r in runs}
    if iters is None:
        from mmengine.config import Config

        iters_of = {n: int(Config.fromfile(c).train_cfg.max_iters) for n, c in configs.items()}
    else:
        iters_of = dict.fromkeys(names, iters)
    todo = [r for r in runs if not finished(osp.join(root, r.name), iters_of[r.name])]
    procs = {}
    for run in todo:
        wd = osp.join(root, run.name)
        cmd = [py, "tools/train.py", configs[run.name], "--work-dir", wd, "--resume"]
        procs[run.name] = launch(cmd + ([] if args.no_amp else ["--amp"]), wd + ".log")
    train_deadline = deadline - args.min_eval_s if deadline else None
    codes = wait_all(procs, train_deadline, "train")
    for run in runs:
        wd = osp.join(root, run.name)
        done = finished(wd, iters_of[run.name])
        state = "done" if done else ("stopped" if codes.get(run.name, 0) is None else "failed")
        entry = status["runs"].setdefault(run.name, {})
        entry.update(config=run.config, seed=run.seed, state=state)
        if run.name in codes:  # launched by this call (else keep the earlier call's code)
            entry["exit"] = codes[run.name]
        if state == "failed":
            print(f"----- train {run.name} log tail\n{tail(wd + '.log')}")
    phase_done("train", t)
    if args.pack:  # the logs so far, in case the job is cut short later
        pack(root, args.pack)
    done_runs = [r for r in runs if status["runs"][r.name]["state"] == "done"]

    # 4. test and 5. routing, all at once
    t = time.time()
    device = args.device or ("cuda" if _cuda() else "cpu")
    procs = {}
    for run in done_runs:
        wd = osp.join(root, run.name)
        ckpt = best_checkpoint(wd)
        status["runs"][run.name]["checkpoint"] = osp.basename(ckpt)
        if not glob.glob(osp.join(wd, "test", "*", "*.json")):
            cmd = [py, "tools/test.py", configs[run.name], ckpt, "--work-dir", osp.join(wd, "test")]
            procs["test " + run.name] = launch(
                cmd + ([] if args.no_amp else ["--amp"]), osp.join(wd, "test.log")
            )
        if is_moe(configs[run.name]) and not osp.isfile(osp.join(wd, "routing.json")):
            cmd = [py, "tools/analysis_tools/routing.py", configs[run.name], ckpt]
            cmd += ["--split", "test", "--max-images", "0", "--device", device]
            cmd += ["--json", osp.join(wd, "routing.json"), "--out", osp.join(wd, "routing.png")]
            procs["routing " + run.name] = launch(cmd, osp.join(wd, "routing.log"))
        first = next(r for r in runs if r.config == run.config)
        init_json = osp.join(wd, "routing_init.json")
        if first is run and is_moe(configs[run.name]) and not osp.isfile(init_json):
            cmd = [py, "tools/analysis_tools/routing.py", configs[run.name]]
            cmd += ["--init-seed", str(run.seed), "--split", "test", "--max-images", "0"]
            cmd += ["--device", device, "--json", init_json]
            cmd += ["--out", osp.join(wd, "routing_init.png")]
            procs["routing_init " + run.name] = launch(cmd, osp.join(wd, "routing_init.log"))
    codes = wait_all(procs, deadline - 15 if deadline else None, "eval")
    for key, code in codes.items():
        what, name = key.split(" ", 1)
        status["runs"][name][what] = code
        if code != 0:
            print(f"----- {key} log tail\n{tail(osp.join(root, name, what + '.log'))}")
    phase_done("test+routing", t)

    # 6. speed: the first seed of every config, one model at a time
    t = time.time()
    firsts: dict[str, Run] = {}
    for run in done_runs:
        firsts.setdefault(run.config, run)
    wds = [
        osp.join(root, r.name)
        for r in firsts.values()
        if not osp.isfile(osp.join(root, r.name, "inference_speed.json"))
    ]
    if wds:
        cmd = [py, "tools/analysis_tools/inference_speed.py", "--work-dirs", *wds]
        cmd += ["--device", device, "--reps", str(args.speed_reps)]
        cmd += ["--warmup", str(args.speed_warmup), "--batch"]
        cmd += [str(b) for b in args.speed_batch]
        if args.no_amp:
            cmd.append("--no-amp")
        speed_deadline = deadline - 5 if deadline else None
        codes = wait_all({"speed": launch(cmd, osp.join(root, "speed.log"))}, speed_deadline, "")
        status["speed"] = codes["speed"]
        if codes["speed"] != 0:
            print(f"----- speed log tail\n{tail(osp.join(root, 'speed.log'))}")
    phase_done("speed", t)

    # 7. table
    if not args.no_table and (deadline is None or time.time() < deadline - 15):
        t = time.time()
        cmd = [py, "tools/analysis_tools/compare_runs.py", "--root", root, "--no-flops"]
        cmd += ["--out", osp.join(root, "comparison.md"), "--figure-dir", root]
        table_deadline = deadline - 3 if deadline else None
        table = launch(cmd, osp.join(root, "table.log"))
        code = wait_all({"table": table}, table_deadline, "")["table"]
        status["table"] = code
        print(tail(osp.join(root, "table.log"), 30 if code == 0 else 60))
        phase_done("table", t)

    status["total_s"] = round(time.time() - t0, 1)
    write_json(status, status_path)
    if args.pack:
        pack(root, args.pack)
    ok = (
        len(done_runs) == len(runs)
        and all(
            status["runs"][r.name].get(k, 0) == 0
            for r in done_runs
            for k in ("test", "routing", "routing_init")
        )
        and status.get("speed", 0) == 0
        and status.get("table", 0) == 0
    )
    log(f"{'complete' if ok else 'INCOMPLETE'} after {time.time() - t0:.0f} s")
    return 0 if ok else 1


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
