"""Stop training on a NaN or infinite loss before anything is saved."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from mmengine.dist import all_reduce, is_distributed
from mmengine.hooks import Hook
from mmseg.registry import HOOKS

from .checkpoint_guard_hook import last_verified_checkpoint


class NonFiniteLossError(RuntimeError):
    """Raised by :class:`NonFiniteLossHook`; the message names task, loss and iteration."""


def _as_float(value: Any) -> float | None:
    """Return ``value`` as a float when it is a scalar number or tensor, else ``None``."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        return float(value.detach().float().cpu())
    if isinstance(value, int | float):
        return float(value)
    return None


def find_non_finite(log_vars: Mapping[str, Any]) -> dict[str, float]:
    """Return the entries of ``log_vars`` that are NaN or infinite.

    The summed ``'loss'`` entry is reported only when no component is itself non-finite
    (a single bad component makes the sum non-finite too, which adds no information).
    """
    bad = {}
    for key, value in log_vars.items():
        number = _as_float(value)
        if number is not None and not math.isfinite(number):
            bad[key] = number
    if len(bad) > 1:
        bad.pop("loss", None)
    return bad


def describe_loss_key(key: str) -> str:
    """Name the source of a loss key: ``'semseg.loss_ce'`` -> ``"task 'semseg'"``."""
    if "." in key:
        return f"task {key.split('.', 1)[0]!r}"
    if key == "loss_moe_balance":
        return "the MoE load-balancing loss (all tasks)"
    if key == "loss":
        return "the summed loss"
    return f"loss {key!r}"


@HOOKS.register_module()
class NonFiniteLossHook(Hook):
    """Stop training when any logged loss is NaN or infinite.

    It runs after every training iteration with a higher priority than
    ``CheckpointHook`` (``VERY_LOW``), so the iteration that produced the non-finite loss
    is never saved: the last checkpoint on disk stays the last good one (it is named
    only after it was loaded and found finite). The error names the task (from the
    ``<task>.loss_*`` key prefix), the loss, its value and the 1-based iteration. Under
    distributed training the ranks agree on the decision, so all of them stop together
    instead of one hanging in the next all-reduce.

    Args:
        check_keys_containing: only log entries whose key contains this substring are
            checked (mmengine sums exactly the keys containing ``'loss'``).
    """

    priority = "ABOVE_NORMAL"

    def __init__(self, check_keys_containing: str = "loss") -> None:
        self.check_keys_containing = check_keys_containing

    def after_train_iter(
        self,
        runner: Any,
        batch_idx: int,
        data_batch: Any = None,
        outputs: Mapping[str, Any] | None = None,
    ) -> None:
        """Raise :class:`NonFiniteLossError` if a loss of this iteration is not finite."""
        log_vars = {k: v for k, v in (outputs or {}).items() if self.check_keys_containing in k}
        bad = find_non_finite(log_vars)
        if is_distributed():
            flag = torch.tensor([1.0 if bad else 0.0])
            all_reduce(flag, op="sum")
            if flag.item() > 0 and not bad:
                bad = {"(another rank)": math.nan}
        if not bad:
            return
        iteration = runner.iter + 1
        details = ", ".join(
            f"{describe_loss_key(k)}: {k} = {v}"
            if k != "(another rank)"
            else "a loss on another rank"
            for k, v in bad.items()
        )
        _, last = last_verified_checkpoint(runner.work_dir)
        raise NonFiniteLossError(
            f"non-finite loss at iteration {iteration}: {details}. Training stopped before "
            f"this iteration was saved; {last}. Lower the learning rate, check the ground "
            "truth of that task, or resume from it."
        )
