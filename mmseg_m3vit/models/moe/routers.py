"""Router variants of M3VIT.md section 1: multi-gate, task-conditioned, shared.

Every router maps LayerNorm'd tokens ``x`` (B, N, D) and per-sample task indices
``task_ids`` (B,) long (None only for the shared router) to logits (B, N, E). The gate
math (softmax, top-k, noise) lives in :mod:`.gating`, common to all variants.
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
