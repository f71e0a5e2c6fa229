"""Reference dispatch implementations in plain torch (CPU and GPU) and their contract.

Every MoE dispatch takes the flattened tokens, the router's choice and the stacked
expert weights, and returns the weighted sum of the chosen experts' outputs per token
(M tokens, D model dims, Hd expert hidden dims, E experts, k experts per token):

- ``x``: (M, D) tokens (already LayerNorm'd: the same input the router saw)
- ``expert_ids``: (M, k) integer expert index per token and slot, in [0, E)
- ``gates``: (M, k) float, weight of each chosen expert (not renormalised)
- ``w1`` (E, D, Hd), ``b1`` (E, Hd), ``w2`` (E, Hd, D), ``b2`` (E, D)
- returns (M, D): ``sum_j gates[m, j] * expert[expert_ids[m, j]](x[m])`` where
  ``expert[e](v) = GELU(v @ w1[e] + b1[e]) @ w2[e] + b2[e]`` (exact erf GELU).

:func:`sorted_dispatch` is the portable reference path; :func:`expert_loop_dispatch`
the per-expert-loop baseline that the benchmarks compare against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

DispatchFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: the autocast dtype when autocast is on, else x's."""
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def check_dispatch_inputs(
    x: Tensor, expert_ids: Tensor, gates: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor
) -> None:
    """Raise ``ValueError`` naming the argument whose shape does not match the contract."""
    if x.dim() != 2:
        raise ValueError(f"x must be (M, D), got shape {tuple(x.shape)}")
    m, d = x.shape
    if expert_ids.dim() != 2 or expert_ids.shape[0] != m:
        raise ValueError(f"expert_ids must be (M={m}, k), got {tuple(expert_ids.shape)}")
    if gates.shape != expert_ids.shape:
        raise ValueError(
            f"gates must have the shape of expert_ids {tuple(expert_ids.shape)}, "
            f"got {tuple(gates.shape)}"
        )
    if w1.dim() != 3 or w1.shape[1] != d:
        raise ValueError(f"w1 must be (E, D={d}, Hd), got {tuple(w1.shape)}")
    e, _, hd = w1.shape
    expected = {"b1": (e, hd), "w2": (e, hd, d), "b2": (e, d)}
    for name, t in (("b1", b1), ("w2", w2), ("b2", b2)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must be {expected[name]}, got {tuple(t.shape)}")
    if expert_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"expert_ids must be an integer tensor, got {expert_ids.dtype}")


def sorted_dispatch(
    x: Tensor, expert_ids: Tensor, gates: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor
) -> Tensor:
    """Sort the (token, slot) pairs by expert and run each non-empty expert once.

    The M*k assignments are stably sorted by expert id; the tokens are gathered in that
    order (``index_select``), split into one contiguous chunk per expert, each chunk goes
    through its expert's FFN in one matmul pair, outputs are scaled by their gate and
    scatter-added back to their token (``index_add_``). Experts with no token are skipped.
    Cost: one Python iteration per expert (never per token), gathered activations of
    size (M*k, D). See the module docstring for shapes.
    """
    check_dispatch_inputs(x, expert_ids, gates, w1, b1, w2, b2)
    m, d = x.shape
    k = expert_ids.shape[1]
    num_experts = w1.shape[0]
    flat_ids = expert_ids.reshape(-1).long()
    order = torch.argsort(flat_ids, stable=True)
    token_idx = order // k
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    if len(counts) > num_experts:
        raise ValueError(f"expert_ids hold values >= num_experts={num_experts}")
    gathered = x.index_select(0, token_idx)
    outputs = []
    for e, chunk in enumerate(gathered.split(counts)):
        if counts[e] == 0:
            continue
        hidden = F.gelu(torch.addmm(b1[e], chunk, w1[e]))
        outputs.append(torch.addmm(b2[e], hidden, w2[e]))
    y = torch.cat(outputs) if outputs else gathered.new_zeros((0, d))
    y = y * gates.reshape(-1).index_select(0, order).unsqueeze(1).to(y.dtype)
    return x.new_zeros((m, d), dtype=y.dtype).index_add_(0, token_idx, y)


def expert_loop_dispatch(
    x: Tensor, expert_ids: Tensor, gates: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor
) -> Tensor:
    """The straightforward baseline (Mixtral style): per expert, find its tokens and run them.

    Same function as :func:`sorted_dispatch`, but ``torch.where`` per expert costs a host
    synchronisation each; kept as the ``'loop'`` implementation for benchmarks.
    """
    check_dispatch_inputs(x, expert_ids, gates, w1, b1, w2, b2)
    out = None
    for e in range(w1.shape[0]):
        token, slot = torch.where(expert_ids == e)
        if token.numel() == 0:
            continue
        h = F.gelu(x[token] @ w1[e] + b1[e])
        y = (h @ w2[e] + b2[e]) * gates[token, slot].unsqueeze(1).to(h.dtype)
        if out is None:
            out = x.new_zeros(x.shape, dtype=y.dtype)
        out.index_add_(0, token, y)
    return out if out is not None else x.new_zeros(x.shape)
