"""Task names stored with the weights, so that task-indexed parameters load by name.

A multi-gate router stores one gate per task as row ``t`` of a (T, D, E) tensor, and the
task-conditioned router's task MLP takes a one-hot of size T: the meaning of index ``t`` is
the task's position in the model's task list (the order of ``decode_heads`` in the
config). A module whose parameters are indexed by task therefore saves its task names in
its state dict, as ``<module>._extra_state``: a uint8 tensor of the UTF-8 names joined by
newlines (a tensor, so that mmengine's checkpoint code, which moves every entry to the
CPU, handles it like the weights). When such a state dict is loaded into a model that
lists the same tasks in another order, the task-indexed rows are permuted to the model's
order; other tasks, or task-indexed weights without names, fail.

A module opts in by defining ``tasks`` (list of names) and ``task_indexed_parameters()``
(``{parameter name relative to the module: task axis}``) and calling
:func:`attach_task_names` in its ``__init__``; with ``mappable = False`` a different
order fails instead of being mapped (for modules whose computation depends on the order
in other ways).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

EXTRA_STATE = "_extra_state"


class TaskOrderError(ValueError):
    """The task names stored with a state dict do not fit the model's tasks."""


def encode_task_names(tasks: Sequence[str]) -> Tensor:
    """Task names -> uint8 tensor (UTF-8, newline-separated); names hold no newline."""
    for t in tasks:
        if "\n" in t:
            raise ValueError(f"task name {t!r} contains a newline")
    return torch.tensor(list("\n".join(tasks).encode("utf-8")), dtype=torch.uint8)


def decode_task_names(value: Any) -> list[str]:
    """Inverse of :func:`encode_task_names`.

    Raises:
        TaskOrderError: when ``value`` is not a 1-D uint8 tensor of UTF-8 text.
    """
    if not isinstance(value, Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise TaskOrderError(
            f"stored task names must be a 1-D uint8 tensor, got {type(value).__name__} "
            f"{getattr(value, 'dtype', '')} {tuple(getattr(value, 'shape', ()))}"
        )
    text = bytes(value.tolist()).decode("utf-8")
    return text.split("\n") if text else []


def has_task_order(module: nn.Module) -> bool:
    """Whether ``module`` stores its task names (see the module docstring)."""
    return hasattr(module, "task_indexed_parameters") and hasattr(module, "tasks")


def map_task_order(
    module: nn.Module,
    state_dict: MutableMapping[str, Any] | Mapping[str, Any],
    prefix: str,
    source: str = "the state dict",
    apply: bool = True,
) -> None:
    """Check (and with ``apply``, permute in place) ``module``'s task-indexed entries of
    ``state_dict`` (keys ``prefix + name``) from the stored task order to the module's.

    Raises:
        TaskOrderError: the stored tasks differ from the module's (both lists named); the
            order differs and the module is not ``mappable``; or task-indexed weights of
            a multi-task module come without stored names.
    """
    tasks = list(module.tasks)
    key = prefix + EXTRA_STATE
    indexed = {
        prefix + name: axis
        for name, axis in module.task_indexed_parameters().items()
        if prefix + name in state_dict
    }
    where = f"{source}, {prefix[:-1]}," if prefix else source
    if key not in state_dict:
        if indexed and len(tasks) > 1:
            raise TaskOrderError(
                f"{where} holds task-indexed weights ({sorted(indexed)[0]}, ...) but no task "
                f"names ({key}), so it cannot be told which row is which task. It was "
                f"written without them; if you know its task order, add "
                f"state_dict[{key!r}] = encode_task_names([...]) "
                f"(mmseg_m3vit.models.task_order) and save it again"
            )
        return
    saved = decode_task_names(state_dict[key])
    if saved == tasks:
        return
    if sorted(saved) != sorted(tasks):
        raise TaskOrderError(
            f"{where} was trained for tasks {saved}; the model has tasks {tasks}. Use a "
            f"config with the checkpoint's tasks"
        )
    if not getattr(module, "mappable", True):
        raise TaskOrderError(
            f"{where} lists its tasks in the order {saved}; {type(module).__name__} depends "
            f"on the order and the model has {tasks}. List the tasks (decode_heads) in the "
            f"checkpoint's order"
        )
    if not apply:
        return
    perm = torch.tensor([saved.index(t) for t in tasks])
    for k, axis in indexed.items():
        state_dict[k] = state_dict[k].index_select(axis, perm.to(state_dict[k].device))
    state_dict[key] = encode_task_names(tasks)


def check_task_orders(model: nn.Module, state_dict: Mapping[str, Any], source: str) -> None:
    """Run :func:`map_task_order` (checks only) for every opted-in submodule of ``model``."""
    for name, module in model.named_modules():
        if has_task_order(module):
            map_task_order(module, state_dict, f"{name}." if name else "", source, apply=False)


def attach_task_names(module: nn.Module) -> None:
    """Make ``module`` save its task names and map task-indexed rows by name on load."""

    def pre_hook(mod, state_dict, prefix, *args, **kwargs) -> None:
        map_task_order(mod, state_dict, prefix)

    module.register_load_state_dict_pre_hook(pre_hook)


class TaskNamesMixin:
    """``get_extra_state`` / ``set_extra_state`` storing ``self.tasks`` (mix into an
    ``nn.Module`` that also calls :func:`attach_task_names`)."""

    def get_extra_state(self) -> Tensor:
        """The task names as a uint8 tensor (saved as ``<module>._extra_state``)."""
        return encode_task_names(self.tasks)

    def set_extra_state(self, state: Any) -> None:
        """Accept the stored names (the load pre-hook has already mapped them)."""
        names = decode_task_names(state)
        if names != list(self.tasks):
            raise TaskOrderError(f"stored tasks {names} differ from the module's {self.tasks}")
