"""Experimental expert parallelism: the E experts of an MoE layer sharded over ranks.

Not used by any config: measured on two GPUs it is slower than replicated experts at
this model's size (``benchmarks/RESULTS.md``). It is switched on explicitly, per
model, by :func:`shard_experts`, which slices the experts and sets each MoE layer's
``dispatch`` to an :class:`ExpertParallelDispatch`.

Rank r of a group of W ranks holds experts ``[r*E/W, (r+1)*E/W)`` (contiguous blocks).
Every rank routes its own tokens with its (replicated) router; the chosen (token, slot)
rows travel to the rank that owns their expert with one ``all_to_all``, are computed
there by its local experts, travel back with a second ``all_to_all`` and are gated and
summed on the rank they came from. Shapes (M tokens on this rank, k slots, D dims, Hd
expert hidden dims, E experts in all, E_l = E / W local experts)::

    x (M, D), expert_ids (M, k) in [0, E), gates (M, k)
    w1 (E_l, D, Hd), b1 (E_l, Hd), w2 (E_l, Hd, D), b2 (E_l, D)   # this rank's experts
    -> (M, D), the same function as :func:`.reference.sorted_dispatch` with all E experts

Differentiable end to end (``torch.distributed.nn`` all-to-all). The expert gradients on
the owner rank are the SUM of every rank's contribution; a data-parallel wrapper
averages the other gradients over the ranks, so :func:`shard_experts` scales the local
expert gradients by 1/W to keep both on the same objective (the mean of the ranks'
losses). Benchmark: ``tools/analysis_tools/benchmark_moe.py --expert-parallel``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.nn.functional import all_to_all_single

from .grouped import (
    combine_slots,
    gather_sorted_rows,
    grouped_mm_usable,
    grouped_rows_ffn,
    sort_by_expert,
)
from .moe_ffn import MoEFFN
from .reference import matmul_dtype

EXPERT_PARAMS = ("w1", "b1", "w2", "b2")


def _rows_ffn(
    rows: Tensor, counts: list[int], w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor
) -> Tensor:
    """Expert FFN on rows already grouped by local expert (``counts`` rows each)."""
    if grouped_mm_usable(rows, w1):
        offs = torch.tensor(counts, device=rows.device).cumsum(0).to(torch.int32)
        return grouped_rows_ffn(rows, offs, w1, b1, w2, b2, torch.bfloat16)
    outs = []
    for e, chunk in enumerate(rows.split(counts)):
        if counts[e]:
            outs.append(torch.addmm(b2[e], F.gelu(torch.addmm(b1[e], chunk, w1[e])), w2[e]))
    return torch.cat(outs) if outs else rows.new_zeros((0, w2.shape[2]))


def expert_parallel_ffn(
    x: Tensor,
    expert_ids: Tensor,
    gates: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    num_experts: int,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Dropless top-k MoE FFN with this rank's experts only (shapes: module docstring).

    Every rank of ``group`` must call it (collective). One host synchronisation per call
    (the all-to-all split sizes). Returns (M, D) in the compute dtype (bf16 on the CUDA
    grouped-GEMM path, else the dtype of ``x``).
    """
    world = dist.get_world_size(group)
    e_local = w1.shape[0]
    if e_local * world != num_experts:
        raise ValueError(
            f"{e_local} local experts x {world} ranks != num_experts={num_experts}; "
            "num_experts must be divisible by the expert-parallel group size"
        )
    m, d = x.shape
    k = expert_ids.shape[1]
    dtype = matmul_dtype(x) if grouped_mm_usable(x, w1) else x.dtype
    order, inv_order, _ = sort_by_expert(expert_ids, num_experts)
    token_of = order // k
    counts = torch.bincount(expert_ids.reshape(-1).long(), minlength=num_experts)
    recv_counts = torch.empty_like(counts)  # [s*E_l + j]: rows rank s sends to my expert j
    dist.all_to_all_single(recv_counts, counts, group=group)
    split_counts = recv_counts.view(world, e_local)
    host = torch.cat(  # the one host sync: rows to send / receive per rank, per local expert
        [counts.view(world, e_local).sum(1), split_counts.sum(1), split_counts.sum(0)]
    ).tolist()
    send, recv = host[:world], host[world : 2 * world]
    per_expert_host = host[2 * world :]
    rows_out = sum(recv)
    xs = gather_sorted_rows(x.to(dtype), token_of, inv_order, k)  # (M*k, D) by dest rank
    got = all_to_all_single(xs.new_empty((rows_out, d)), xs, recv, send, group=group)
    # received rows are ordered (source rank, local expert): regroup by local expert
    local_ids = torch.arange(e_local, device=x.device).repeat(world)
    local_ids = local_ids.repeat_interleave(recv_counts, output_size=rows_out)
    perm = torch.argsort(local_ids, stable=True)
    y = _rows_ffn(got.index_select(0, perm), per_expert_host, w1, b1, w2, b2).to(dtype)
    inv_perm = torch.empty_like(perm).scatter_(0, perm, torch.arange(rows_out, device=x.device))
    y = y.index_select(0, inv_perm)  # back to (source rank, local expert) order
    ys = all_to_all_single(y.new_empty((m * k, d)), y, send, recv, group=group)
    return combine_slots(ys, gates.to(dtype), order, inv_order, token_of)


class ExpertParallelDispatch:
    """A dispatch callable (see :mod:`.dispatch`) running :func:`expert_parallel_ffn`
    over ``group`` with this rank's experts; E = local experts x group size."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group if group is not None else dist.group.WORLD

    def __call__(
        self,
        x: Tensor,
        expert_ids: Tensor,
        gates: Tensor,
        w1: Tensor,
        b1: Tensor,
        w2: Tensor,
        b2: Tensor,
    ) -> Tensor:
        num_experts = w1.shape[0] * dist.get_world_size(self.group)
        return expert_parallel_ffn(
            x, expert_ids, gates, w1, b1, w2, b2, num_experts=num_experts, group=self.group
        )

    def __repr__(self) -> str:
        return f"ExpertParallelDispatch(world={dist.get_world_size(self.group)})"


def moe_layers(model: nn.Module) -> Iterator[nn.Module]:
    """The :class:`~.moe_ffn.MoEFFN` modules of ``model``."""
    return (m for m in model.modules() if isinstance(m, MoEFFN))


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> list[str]:
    """Keep only this rank's experts in every MoE layer and route through all-to-all.

    Replaces each layer's ``w1/b1/w2/b2`` by this rank's contiguous slice (same values),
    sets its ``dispatch`` to an :class:`ExpertParallelDispatch` and scales the
    local expert gradients by 1/W (see the module docstring). Call after the weights are
    identical on all ranks (same seed or a loaded checkpoint) and before wrapping in DDP.

    Returns:
        The parameter names (``model.named_parameters`` keys) of the sharded experts,
        which the data-parallel wrapper must not all-reduce.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    names = []
    by_module = {id(m): n for n, m in model.named_modules()}
    for layer in moe_layers(model):
        if layer.num_experts % world:
            raise ValueError(
                f"num_experts={layer.num_experts} of {by_module[id(layer)]} is not divisible "
                f"by the expert-parallel group size {world}"
            )
        e_local = layer.num_experts // world
        for pname in EXPERT_PARAMS:
            full = getattr(layer, pname)
            local = nn.Parameter(full.detach()[rank * e_local : (rank + 1) * e_local].clone())
            local.register_hook(lambda g, w=world: g / w)
            setattr(layer, pname, local)
            prefix = by_module[id(layer)]
            names.append(f"{prefix}.{pname}" if prefix else pname)
        layer.dispatch = ExpertParallelDispatch(group)
    return names
