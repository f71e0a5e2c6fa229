"""Router variants of M3VIT.md section 1: multi-gate, task-conditioned, shared.

Every router maps LayerNorm'd tokens ``x`` (B, N, D) and per-sample task indices
``task_ids`` (B,) long (None only for the shared router) to logits (B, N, E). The gate
math (softmax, top-k, noise) lives in :mod:`.gating`, common to all variants.

For ONE task every variant is an affine map of the token; each router says which::

    router(x, task_ids=[t] * B) == x @ router.task_gate_weight(t) + router.task_logit_offset(t)

(the FPGA flow builds one task's router from this pair; the offset is zero except for
the task-conditioned router, whose task embedding adds a constant per expert).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROUTER_VARIANTS = ("multi_gate", "task_conditioned", "shared")


class MultiGateRouter(nn.Module):
    """One ``Linear(D, E, bias=False)`` per task, stored stacked as ``weight`` (T, D, E).

    A mixed-task batch gathers each sample's task matrix (no loop over tasks).
    """

    #: parameters indexed by task, and the axis (task names travel with the backbone)
    TASK_AXES = {"weight": 0}

    def __init__(self, dim: int, num_experts: int, num_tasks: int) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"multi_gate router needs at least one task, got {num_tasks}")
        self.weight = nn.Parameter(torch.empty(num_tasks, dim, num_experts))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: Tensor, task_ids: Tensor | None) -> Tensor:
        """x (B, N, D), task_ids (B,) long -> logits (B, N, E)."""
        if task_ids is None:
            raise ValueError("the multi_gate router needs the task of every sample")
        return torch.bmm(x, self.weight.index_select(0, task_ids).to(x.dtype))

    def task_gate_weight(self, task_index: int) -> Tensor:
        """Task ``task_index``'s gate matrix (D, E): logits = x @ it."""
        _check_task_index(task_index, self.weight.shape[0])
        return self.weight[task_index]

    def task_logit_offset(self, task_index: int) -> Tensor:
        """Constant logits (E,) added for task ``task_index``: zeros (no task embedding)."""
        _check_task_index(task_index, self.weight.shape[0])
        return self.weight.new_zeros(self.weight.shape[-1])


class TaskConditionedRouter(nn.Module):
    """One router on ``concat(token, e_t)``, ``e_t = MLP(one_hot(t))``.

    The task MLP is ``Linear(T, g) -> Linear(g, g) -> GELU -> LayerNorm(g)`` (g =
    ``task_embed_dims``, M3VIT.md: one_hot -> g -> g, GELU, LayerNorm). The gate is
    ``Linear(D + g, E, bias=False)``.
    """

    #: the task MLP's first layer takes the one-hot task: its input axis is the task
    TASK_AXES = {"task_mlp.0.weight": 1}

    def __init__(
        self, dim: int, num_experts: int, num_tasks: int, task_embed_dims: int = 64
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"task_conditioned router needs at least one task, got {num_tasks}")
        self.num_tasks = num_tasks
        self.task_mlp = nn.Sequential(
            nn.Linear(num_tasks, task_embed_dims),
            nn.Linear(task_embed_dims, task_embed_dims),
            nn.GELU(),
            nn.LayerNorm(task_embed_dims),
        )
        self.gate = nn.Linear(dim + task_embed_dims, num_experts, bias=False)
        nn.init.trunc_normal_(self.gate.weight, std=0.02)

    def task_embedding(self, task_ids: Tensor) -> Tensor:
        """task_ids (B,) long -> e_t (B, g)."""
        one_hot = F.one_hot(task_ids, self.num_tasks).to(self.gate.weight.dtype)
        return self.task_mlp(one_hot)

    def forward(self, x: Tensor, task_ids: Tensor | None) -> Tensor:
        """x (B, N, D), task_ids (B,) long -> logits (B, N, E)."""
        if task_ids is None:
            raise ValueError("the task_conditioned router needs the task of every sample")
        emb = self.task_embedding(task_ids).to(x.dtype)
        emb = emb[:, None, :].expand(-1, x.shape[1], -1)
        return self.gate(torch.cat([x, emb], dim=-1))

    def task_gate_weight(self, task_index: int) -> Tensor:
        """The token part of the gate, (D, E): the columns of ``gate.weight`` that multiply
        the token (the task embedding's part is :meth:`task_logit_offset`)."""
        _check_task_index(task_index, self.num_tasks)
        dim = self.gate.in_features - self.task_mlp[0].out_features
        return self.gate.weight[:, :dim].t()

    def task_logit_offset(self, task_index: int) -> Tensor:
        """Constant logits (E,) of task ``task_index``: the gate's embedding columns times
        ``e_t`` (the same for every token of the task)."""
        _check_task_index(task_index, self.num_tasks)
        dim = self.gate.in_features - self.task_mlp[0].out_features
        ids = torch.tensor([task_index], device=self.gate.weight.device)
        return self.task_embedding(ids)[0] @ self.gate.weight[:, dim:].t()


class SharedRouter(nn.Module):
    """One ``Linear(D, E, bias=False)`` shared by all tasks; ignores ``task_ids``."""

    TASK_AXES: dict[str, int] = {}

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        nn.init.trunc_normal_(self.gate.weight, std=0.02)

    def forward(self, x: Tensor, task_ids: Tensor | None = None) -> Tensor:
        """x (B, N, D) -> logits (B, N, E)."""
        return self.gate(x)

    def task_gate_weight(self, task_index: int) -> Tensor:
        """The shared gate matrix (D, E), the same for every task."""
        return self.gate.weight.t()

    def task_logit_offset(self, task_index: int) -> Tensor:
        """Zeros (E,): the shared router has no task input."""
        return self.gate.weight.new_zeros(self.gate.out_features)


def _check_task_index(task_index: int, num_tasks: int) -> None:
    if not 0 <= int(task_index) < num_tasks:
        raise IndexError(f"task index {task_index} out of range for {num_tasks} task(s)")


def build_router(
    variant: str, dim: int, num_experts: int, num_tasks: int, task_embed_dims: int = 64
) -> nn.Module:
    """Build the router called ``variant`` (one of :data:`ROUTER_VARIANTS`)."""
    if variant == "multi_gate":
        return MultiGateRouter(dim, num_experts, num_tasks)
    if variant == "task_conditioned":
        return TaskConditionedRouter(dim, num_experts, num_tasks, task_embed_dims)
    if variant == "shared":
        return SharedRouter(dim, num_experts)
    raise ValueError(f"unknown router variant {variant!r}; choose one of {list(ROUTER_VARIANTS)}")
