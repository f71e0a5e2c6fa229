"""Checks around the checkpoints a training run writes and resumes from.

* Nothing non-finite is saved: before any checkpoint is written (interval, last, best),
  the model's parameters and buffers and the optimizer state must be finite; otherwise
  training stops, nothing is written and ``last_checkpoint`` keeps pointing at the last
  verified file.
* Resuming is strict: the resumed checkpoint must have exactly the model's keys and
  shapes (the task routers map by task name), and finite tensors.
* After a resume exactly one ``best_*`` checkpoint per metric stays, as in a run that was
  never interrupted.
"""

from __future__ import annotations

import glob
import os
import os.path as osp
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmseg.registry import HOOKS

from ...compat.checkpoint import (
    SHOWN,
    CheckpointMismatchError,
    check_state_dict,
    extract_state_dict,
    load_checkpoint_file,
)
from ...models.task_order import task_order_changes


class NonFiniteCheckpointError(RuntimeError):
    """A checkpoint would hold (or holds) NaN / infinite tensors; the message says which."""


def iter_tensors(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(dotted name, tensor)`` for every tensor nested in dicts / lists of ``obj``."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from iter_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, f"{prefix}[{i}]")


def non_finite_tensors(obj: Any, prefix: str = "") -> tuple[list[str], int]:
    """Names of the floating-point tensors in ``obj`` holding a NaN or an infinity, and
    the number of floating-point tensors checked."""
    bad, total = [], 0
    for name, t in iter_tensors(obj, prefix):
        if t.is_floating_point() or t.is_complex():
            total += 1
            if not bool(torch.isfinite(t).all()):
                bad.append(name)
    return bad, total


def _optimizer_param_names(runner: Any) -> dict[int, str]:
    """Optimizer-state index -> parameter name (state keys count the params of all groups)."""
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    names = {id(p): n for n, p in model.named_parameters()}
    out, i = {}, 0
    try:
        groups = runner.optim_wrapper.optimizer.param_groups
    except AttributeError:
        return out
    for group in groups:
        for p in group["params"]:
            out[i] = names.get(id(p), f"param {i}")
            i += 1
    return out


def checkpoint_problems(checkpoint: Mapping[str, Any], runner: Any = None) -> list[str]:
    """Non-finite tensors of a checkpoint dict (``state_dict`` and ``optimizer``),
    described as "<part>: <count> of <total> (<first names>)"; empty when all finite."""
    problems = []
    bad, total = non_finite_tensors(checkpoint.get("state_dict", {}))
    if bad:
        problems.append(f"model {len(bad)} of {total} tensors ({', '.join(bad[:SHOWN])})")
    if "optimizer" in checkpoint:
        bad, total = non_finite_tensors(checkpoint["optimizer"], "optimizer")
        if bad and runner is not None:
            names = _optimizer_param_names(runner)

            def rename(n: str) -> str:
                m = re.match(r"optimizer\.state\.(\d+)\.(.*)", n)
                return f"{m.group(2)} of {names.get(int(m.group(1)), m.group(1))}" if m else n

            bad = [rename(n) for n in bad]
        if bad:
            problems.append(
                f"optimizer state {len(bad)} of {total} tensors ({', '.join(bad[:SHOWN])})"
            )
    return problems


_VERIFIED: dict[tuple[str, float], bool] = {}


def last_verified_checkpoint(work_dir: str) -> tuple[str | None, str]:
    """The checkpoint named by ``<work_dir>/last_checkpoint`` if it loads and holds only
    finite tensors, with a sentence that says so (or why there is none)."""
    marker = osp.join(work_dir, "last_checkpoint")
    if not osp.isfile(marker):
        return None, f"no checkpoint was saved yet in {work_dir}"
    with open(marker) as f:
        path = f.read().strip()
    if not osp.isfile(path):
        return None, f"last_checkpoint names {path}, which does not exist"
    key = (path, osp.getmtime(path))
    if key not in _VERIFIED:
        try:
            _VERIFIED[key] = not checkpoint_problems(load_checkpoint_file(path))
        except Exception:
            _VERIFIED[key] = False
    if _VERIFIED[key]:
        return path, f"the last verified checkpoint is {path}"
    return None, f"last_checkpoint names {path}, which does not load or is not finite"


def _position(runner: Any, by_epoch: bool) -> int:
    return runner.epoch if by_epoch else runner.iter


@HOOKS.register_module()
class CheckpointGuardHook(Hook):
    """Refuse non-finite checkpoints, resume strictly, keep one best after a resume.

    * ``before_save_checkpoint`` (every save: interval, last and best) and
      ``after_val_epoch`` (before ``CheckpointHook`` removes the previous best):
      :class:`NonFiniteCheckpointError` when a parameter, buffer or optimizer-state
      tensor is NaN or infinite, naming the first few, the iteration and the last
      verified checkpoint; nothing is written and ``last_checkpoint`` is unchanged.
    * ``after_load_checkpoint``: a non-finite checkpoint fails at once; keys / shapes
      that do not match the model, or another task order (the optimizer state cannot be
      mapped by task name), fail in ``before_train`` when the run resumed (``load_from``
      without resuming keeps mmengine's lenient loading).
    * ``before_train`` after a resume: the ``best_*`` files of each ``save_best``
      metric are reconciled with the resumed state. mmengine re-saves the latest
      checkpoint after a new best, but not in a resumed run before its first interval
      checkpoint, and not if the process dies in between; the best files written then
      are unknown to the checkpoint being resumed. A best file newer than the tracked one
      but at or before the resumed iteration becomes the tracked best (its score is read
      from it); every other best file of that metric (older ones, or ones from
      iterations after the resumed one, which the resumed run redoes) is removed, so
      exactly one stays, as without the interruption.

    Runs before ``CheckpointHook`` (priority ``NORMAL`` vs ``VERY_LOW``).
    """

    priority = "NORMAL"

    def __init__(self) -> None:
        self._load_mismatch: str | None = None

    # ------------------------------------------------------------------ saving
    def _refuse(self, runner: Any, problems: list[str], what: str, iteration: int) -> None:
        _, last = last_verified_checkpoint(runner.work_dir)
        raise NonFiniteCheckpointError(
            f"non-finite {what} at iteration {iteration}: " + "; ".join(problems) + ". "
            f"No checkpoint was written; {last}. Lower the learning rate (or check the "
            "ground truth) and resume from that checkpoint."
        )

    def before_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        """Refuse to write a checkpoint with NaN / infinite tensors."""
        problems = checkpoint_problems(checkpoint, runner)
        if problems:
            iteration = checkpoint.get("meta", {}).get("iter", runner.iter)
            self._refuse(runner, problems, "tensors in the checkpoint to be saved", iteration)

    def after_val_epoch(self, runner: Any, metrics: dict | None = None) -> None:
        """Check the model before ``CheckpointHook`` replaces the best checkpoint."""
        if not any(isinstance(h, CheckpointHook) and h.save_best for h in runner.hooks):
            return
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        problems = checkpoint_problems({"state_dict": model.state_dict()})
        if problems:
            self._refuse(runner, problems, "weights after validation", runner.iter)

    # ------------------------------------------------------------------ loading
    def after_load_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        """Fail on non-finite tensors; remember a key / shape mismatch for a resume."""
        problems = checkpoint_problems(checkpoint)
        if problems:
            raise NonFiniteCheckpointError(
                "the checkpoint being loaded holds non-finite tensors: "
                + "; ".join(problems)
                + ". It was written before checkpoints were checked; resume from an "
                "earlier one."
            )
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        try:
            state_dict = extract_state_dict(checkpoint, "the checkpoint")
            check_state_dict(model, state_dict, "being resumed")
            changes = task_order_changes(model, state_dict)
            self._load_mismatch = None
            if changes:  # weights map by name, the optimizer state would not
                self._load_mismatch = (
                    f"the checkpoint lists the tasks in another order ({'; '.join(changes)}) "
                    "and the optimizer state is stored per position; resume with the "
                    "checkpoint's task order (testing or fine-tuning may reorder)"
                )
        except (CheckpointMismatchError, ValueError) as err:
            self._load_mismatch = str(err)

    def before_train(self, runner: Any) -> None:
        """After a resume: fail on a mismatched checkpoint, reconcile ``best_*`` files."""
        hooks = [h for h in runner.hooks if isinstance(h, CheckpointHook)]
        by_epoch = hooks[0].by_epoch if hooks else False
        if _position(runner, by_epoch) == 0:
            return  # not resumed
        if self._load_mismatch is not None:
            raise CheckpointMismatchError(f"cannot resume: {self._load_mismatch}")
        for hook in hooks:
            if hook.save_best:
                self._reconcile_best(runner, hook)

    def _reconcile_best(self, runner: Any, hook: CheckpointHook) -> None:
        out_dir = hook.out_dir or runner.work_dir
        if out_dir != runner.work_dir:  # CheckpointHook appends the work dir's name
            out_dir = osp.join(out_dir, osp.basename(runner.work_dir.rstrip(osp.sep)))
        if not osp.isdir(out_dir):
            return
        unit = "epoch" if hook.by_epoch else "iter"
        position = _position(runner, hook.by_epoch)
        hub = runner.message_hub
        single = len(hook.key_indicators) == 1
        for key in hook.key_indicators:
            score_key = "best_score" if single else f"best_score_{key}"
            ckpt_key = "best_ckpt" if single else f"best_ckpt_{key}"
            stem = f"best_{key}_".replace("/", "_")
            pattern = re.compile(re.escape(stem) + unit + r"_(\d+)\.pth$")
            found = {}
            for path in glob.glob(osp.join(glob.escape(out_dir), stem + "*.pth")):
                m = pattern.search(osp.basename(path))
                if m:
                    found[osp.abspath(path)] = int(m.group(1))
            recorded = hub.get_info(ckpt_key)
            recorded_name = osp.basename(recorded) if recorded else None
            # the tracked file, matched by name (the work dir may have been moved)
            keep = next((p for p in found if osp.basename(p) == recorded_name), None)
            m = pattern.search(recorded_name or "")
            recorded_at = int(m.group(1)) if m else -1
            # written after the resumed checkpoint, at or before its iteration
            adopt = [p for p, at in found.items() if recorded_at < at <= position]
            if keep is not None and keep != recorded:
                hub.update_info(ckpt_key, keep)
            if adopt:
                newest = max(adopt, key=found.get)
                saved = load_checkpoint_file(newest).get("message_hub", {})
                score = saved.get("runtime_info", {}).get(score_key)
                if score is not None:
                    hub.update_info(score_key, score)
                    hub.update_info(ckpt_key, newest)
                    keep = newest
                    print_log(
                        f"resumed at {unit} {position}: the best checkpoint for {key} is "
                        f"{newest} (score {float(score):.4f}), saved after the resumed "
                        "checkpoint",
                        logger="current",
                    )
            if not is_main_process():
                continue
            for path in found:
                if path != keep:
                    os.remove(path)
                    print_log(
                        f"removed {path}: a best checkpoint for {key} that the resumed run "
                        f"no longer tracks (the best is {keep})",
                        logger="current",
                    )
