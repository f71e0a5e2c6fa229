"""V-MoE top-k gating and the load-balancing loss (docs/model.md, gating).

Pure functions: everything the loss needs is returned, nothing is kept on modules.
Shapes: M tokens, E experts, k experts per token, G routing groups (one group per
task in a batch; a group is what the paper calls one router call).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class GateOutput(NamedTuple):
    """Result of :func:`vmoe_top_k`.

    Attributes:
        expert_ids: (M, k) long, chosen experts, highest probability first.
        gates: (M, k) float, their softmax probabilities (not renormalised).
        importance_per_token: (M, E) gate weight of each expert, 0 where not chosen;
            None when not asked for (``with_stats=False``).
        load_per_token: (M, E) 1 where chosen (noise off) or the smooth probability of
            being in the top-k (noise on, V-MoE); no gradient when noise is off; None
            when not asked for.
    """

    expert_ids: Tensor
    gates: Tensor
    importance_per_token: Tensor | None
    load_per_token: Tensor | None


def check_moe_sizes(num_experts: int, top_k: int) -> None:
    """Raise ``ValueError`` unless ``num_experts >= 1`` and ``1 <= top_k <= num_experts``."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")


def vmoe_top_k(
    logits: Tensor,
    k: int,
    noise_std: float = 0.0,
    training: bool = False,
    with_stats: bool = True,
) -> GateOutput:
    """Softmax over all E experts first, then top-k; weights are not renormalised.

    Args:
        logits: (M, E) router logits (no bias).
        k: experts per token, 1 <= k <= E (:func:`check_moe_sizes`, checked where the
            layer is built).
        noise_std: when ``training`` and > 0, Gaussian noise of std ``noise_std / E`` is
            added to the logits before the softmax, and the load uses the smooth
            probability that an expert stays in the top-k under re-sampled noise.
        training: apply noise only in training.
        with_stats: also return the per-token importance and load that
            :func:`balance_loss` needs (inference skips them).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (M, E), got shape {tuple(logits.shape)}")
    num_experts = logits.shape[1]
    sigma = noise_std / num_experts
    noisy = training and noise_std > 0
    noisy_logits = logits + torch.randn_like(logits) * sigma if noisy else logits
    probs = noisy_logits.float().softmax(dim=-1).to(logits.dtype)
    gates, expert_ids = probs.topk(k, dim=-1)
    if not with_stats:
        return GateOutput(expert_ids, gates, None, None)
    importance = torch.zeros_like(probs).scatter(1, expert_ids, gates)
    if noisy and k < num_experts:
        # P(expert e in top-k) = P(clean_e + noise > threshold_e), threshold_e = the k-th
        # largest noisy logit among the other experts: the (k+1)-th overall when e is
        # itself in the top-k, the k-th overall otherwise.
        top_vals = noisy_logits.topk(k + 1, dim=-1).values
        kth, kth_plus_1 = top_vals[:, k - 1 : k], top_vals[:, k : k + 1]
        chosen = torch.zeros_like(probs, dtype=torch.bool).scatter(1, expert_ids, True)
        threshold = torch.where(chosen, kth_plus_1, kth)
        normal = torch.distributions.Normal(0.0, 1.0)
        load = normal.cdf((logits - threshold) / sigma)
    else:
        load = torch.zeros_like(probs).scatter(1, expert_ids, 1.0).detach()
    return GateOutput(expert_ids, gates, importance, load)


def cv_squared(v: Tensor) -> Tensor:
    """Squared coefficient of variation along the last dim: var / (mean^2 + 1e-10).

    Unbiased variance (divides by E-1); 0 when E = 1. ``v``: (..., E) -> (...).
    """
    if v.shape[-1] <= 1:
        return v.new_zeros(v.shape[:-1])
    v = v.float()
    return v.var(dim=-1, unbiased=True) / (v.mean(dim=-1) ** 2 + 1e-10)


def balance_loss(
    gate: GateOutput,
    group_of_token: Tensor | None = None,
    num_groups: int = 1,
    run_length: int = 1,
) -> Tensor:
    """Sum over routing groups of ``cv2(importance) + cv2(load)`` (unweighted).

    Args:
        gate: output of :func:`vmoe_top_k` for M tokens, with its statistics.
        group_of_token: (M // run_length,) long group id in [0, num_groups) per run of
            ``run_length`` consecutive tokens (one group per task in a mixed-task batch;
            one run per sample when the tokens are (B, N) flattened), or None for a
            single group. Groups with no token contribute nothing.
        num_groups: number of groups G.
        run_length: tokens per entry of ``group_of_token``; each run is summed first,
            so the scatter into the G groups adds M / run_length rows, not M.

    Returns:
        Scalar float32 tensor.
    """
    if gate.importance_per_token is None or gate.load_per_token is None:
        raise ValueError("balance_loss needs vmoe_top_k(..., with_stats=True)")
    imp, load = gate.importance_per_token.float(), gate.load_per_token.float()
    if group_of_token is None:
        return cv_squared(imp.sum(0)) + cv_squared(load.sum(0))
    m, e = imp.shape
    if run_length < 1 or group_of_token.shape != (m // run_length,) or m % run_length:
        raise ValueError(
            f"group_of_token must have shape ({m} // run_length,) = "
            f"({m // max(run_length, 1)},) with run_length={run_length} dividing {m}, "
            f"got shape {tuple(group_of_token.shape)}"
        )
    if run_length > 1:
        imp = imp.view(-1, run_length, e).sum(1)
        load = load.view(-1, run_length, e).sum(1)
    imp_g = imp.new_zeros((num_groups, e)).index_add(0, group_of_token, imp)
    load_g = load.new_zeros((num_groups, e)).index_add(0, group_of_token, load)
    # tokens per group by a scatter-add (indexed assignment would synchronise the host)
    present = imp.new_zeros(num_groups).index_add(0, group_of_token, imp.new_ones(len(imp))) > 0
    per_group = cv_squared(imp_g) + cv_squared(load_g)
    return (per_group * present).sum()
