"""Mixture-of-experts feed-forward layer (dropless, V-MoE gate; docs/model.md)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import fused
from .dispatch import get_dispatch
from .gating import balance_loss, check_moe_sizes, vmoe_top_k
from .reference import DispatchFn
from .routers import MultiGateRouter, build_router


class MoERouting(NamedTuple):
    """Routing decision of one MoE layer, flattened over the batch.

    Attributes:
        expert_ids: (B*N, k) long expert index per token (tokens in (b, n) row order).
        gates: (B*N, k) gate weights of those experts (detached).
    """

    expert_ids: Tensor
    gates: Tensor


class MoEFFN(nn.Module):
    """Top-k mixture of E two-layer GELU experts with a task-aware router.

    Expert weights are stacked: ``w1`` (E, D, Hd), ``b1`` (E, Hd), ``w2`` (E, Hd, D),
    ``b2`` (E, D); expert e computes ``GELU(v @ w1[e] + b1[e]) @ w2[e] + b2[e]``.

    Args:
        dim: token dims D.
        hidden_dims: expert hidden dims Hd.
        num_experts: E.
        top_k: experts per token k (1 <= k <= E).
        router: router variant ('multi_gate', 'task_conditioned', 'shared').
        num_tasks: T (routers per layer for multi_gate; one-hot size for task_conditioned).
        task_embed_dims: g of the task-conditioned router.
        noise_std: router noise std (divided by E), training only.
        dispatch: how the experts run: a name of :data:`.dispatch.DISPATCH_IMPLS`
            ('auto' picks per call) or a callable with the dispatch signature (e.g.
            :class:`.expert_parallel.ExpertParallelDispatch`).

    This layer initialises its experts (:meth:`reset_expert_parameters`); the
    backbone does not touch them.

    Inference fast path (chosen automatically): in eval mode without autograd, with the
    'auto' or 'fused' dispatch and bf16 compute on CUDA, the gate runs as one kernel
    (:func:`.fused.fused_top_k`) and the experts (and a multi-gate router) read bf16
    copies of their weights made once and kept until a weight changes (in place or
    replaced) or the layer is put in training mode. A CUDA graph captured on this path
    reads the copies it found at capture: capture again after changing the weights.
    """

    def __init__(
        self,
        dim: int,
        hidden_dims: int,
        num_experts: int,
        top_k: int,
        router: str = "multi_gate",
        num_tasks: int = 1,
        task_embed_dims: int = 64,
        noise_std: float = 0.0,
        dispatch: str | DispatchFn = "auto",
    ) -> None:
        super().__init__()
        check_moe_sizes(num_experts, top_k)
        get_dispatch(dispatch)  # validates the name
        self.num_experts, self.top_k, self.num_tasks = num_experts, top_k, num_tasks
        self.noise_std, self.dispatch = float(noise_std), dispatch
        self.router_variant = router
        self.router = build_router(router, dim, num_experts, num_tasks, task_embed_dims)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dims))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden_dims))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dims, dim))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
        self.reset_expert_parameters()
        #: inference copies of weights in bf16: name -> (key, tensors)
        self._bf16_cache: dict[str, tuple[tuple, tuple[Tensor, ...]]] = {}

    def train(self, mode: bool = True) -> MoEFFN:
        """As ``nn.Module.train``; entering training drops the inference weight copies."""
        if mode:
            self._bf16_cache = {}
        return super().train(mode)

    def _inference_copies(self, name: str, params: tuple[Tensor, ...], dtype: torch.dtype):
        """``params`` in ``dtype``, cast once and reused while every parameter is the
        same tensor at the same version (in-place updates bump the version)."""
        key = (dtype,) + tuple((p.data_ptr(), p._version, p.shape, p.device) for p in params)
        hit = self._bf16_cache.get(name)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, tuple(p.detach().to(dtype).contiguous() for p in params))
            self._bf16_cache[name] = hit
        return hit[1]

    def _fast_inference(self, x: Tensor) -> bool:
        """Whether this call takes the inference fast path (class docstring)."""
        if self.training or self.dispatch not in ("auto", "fused") or fused.kernels is None:
            return False
        if torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        ):
            return False
        return fused.fused_usable(x, self.w1)

    def _router_logits(self, x: Tensor, task_ids: Tensor | None, dtype: torch.dtype) -> Tensor:
        """The router's logits on the fast path: a multi-gate router's (T, D, E) gates
        come from a cached copy in ``dtype`` (the dtype its autocast bmm casts them to:
        the same numbers, one cast launch less per call)."""
        if type(self.router) is MultiGateRouter and task_ids is not None:
            (w,) = self._inference_copies("router", (self.router.weight,), dtype)
            return torch.bmm(x, w.index_select(0, task_ids))
        return self.router(x, task_ids)

    def reset_expert_parameters(self) -> None:
        """Expert matrices truncated normal with std 0.02 (the ViT init of every other
        matrix of the backbone); zero biases."""
        for w in (self.w1, self.w2):
            nn.init.trunc_normal_(w, std=0.02)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def forward(self, x: Tensor, task_ids: Tensor | None) -> tuple[Tensor, MoERouting, Tensor]:
        """Route and run the experts.

        Args:
            x: (B, N, D) LayerNorm'd tokens (router and experts see the same input).
            task_ids: (B,) long task index per sample, or None (shared router only).

        Returns:
            ``(y, routing, balance)``: y (B, N, D); routing per token; the unweighted
            balance loss (sum over the tasks present of cv2(importance) + cv2(load),
            each task's tokens forming one router call), 0 when not training.
        """
        b, n, d = x.shape
        x2 = x.reshape(b * n, d)
        if self._fast_inference(x2):
            cd = torch.bfloat16
            logits = self._router_logits(x, task_ids, cd)
            ids, gates, sort = fused.fused_top_k(logits.reshape(b * n, -1), self.top_k)
            experts = self._inference_copies("experts", (self.w1, self.b1, self.w2, self.b2), cd)
            y = fused.fused_expert_ffn(x2, ids, gates, *experts, sort=sort)
            loss = x.new_zeros((), dtype=torch.float32)
            return y.reshape(b, n, d), MoERouting(ids, gates), loss
        logits = self.router(x, task_ids)
        gate = vmoe_top_k(
            logits.reshape(b * n, -1),
            self.top_k,
            self.noise_std,
            self.training,
            with_stats=self.training,
        )
        fn = get_dispatch(self.dispatch)
        y = fn(x.reshape(b * n, d), gate.expert_ids, gate.gates, self.w1, self.b1, self.w2, self.b2)
        if self.training:
            if task_ids is None:
                loss = balance_loss(gate)
            else:
                loss = balance_loss(gate, task_ids, self.num_tasks, run_length=n)
        else:
            loss = x.new_zeros((), dtype=torch.float32)
        routing = MoERouting(gate.expert_ids, gate.gates.detach())
        return y.reshape(b, n, d), routing, loss
