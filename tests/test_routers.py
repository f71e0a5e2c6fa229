"""One task's router as an affine map: ``task_gate_weight`` / ``task_logit_offset``.

Reference: the router's logits computed by hand in float64 from its parameters (the
task MLP written out layer by layer), for every task of every variant; the pair must
also reproduce the router's own forward for a batch of that task.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmseg_m3vit.models.moe import build_router

D, E, T, G = 8, 6, 3, 5


def hand_logits(router, variant: str, x: torch.Tensor, task: int) -> torch.Tensor:
    """float64 logits (N, E) of tokens x (N, D) for ``task``."""
    xd = x.double()
    if variant == "multi_gate":
        return xd @ router.weight[task].double()
    if variant == "shared":
        return xd @ router.gate.weight.double().t()
    mlp = router.task_mlp
    h = torch.eye(T, dtype=torch.float64)[task]
    h = h @ mlp[0].weight.double().t() + mlp[0].bias.double()
    h = h @ mlp[1].weight.double().t() + mlp[1].bias.double()
    h = F.layer_norm(F.gelu(h), (G,), mlp[3].weight.double(), mlp[3].bias.double(), mlp[3].eps)
    inp = torch.cat([xd, h.expand(x.shape[0], -1)], dim=-1)
    return inp @ router.gate.weight.double().t()


@pytest.mark.parametrize("variant", ["multi_gate", "task_conditioned", "shared"])
def test_task_gate_is_the_routers_affine_map(variant: str) -> None:
    torch.manual_seed(0)
    router = build_router(variant, D, E, T, task_embed_dims=G).eval()
    with torch.no_grad():  # non-trivial task MLP / LayerNorm parameters
        for p in router.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(7, D)
    for task in range(T):
        with torch.no_grad():
            w, b = router.task_gate_weight(task), router.task_logit_offset(task)
            got = x.double() @ w.double() + b.double()
            fwd = router(x[None], torch.tensor([task]))[0]
        assert w.shape == (D, E) and b.shape == (E,)
        torch.testing.assert_close(got, hand_logits(router, variant, x, task), rtol=0, atol=1e-5)
        torch.testing.assert_close(got.float(), fwd, rtol=0, atol=1e-5)
        if variant != "task_conditioned":
            assert torch.all(b == 0)
    if variant == "task_conditioned":  # the task embedding makes a real offset
        offsets = torch.stack([router.task_logit_offset(t) for t in range(T)])
        assert offsets.abs().max() > 1e-3 and not torch.allclose(offsets[0], offsets[1])


@pytest.mark.parametrize("variant", ["multi_gate", "task_conditioned"])
def test_task_gate_rejects_unknown_task_index(variant: str) -> None:
    router = build_router(variant, D, E, T, task_embed_dims=G)
    with pytest.raises(IndexError, match="task index 3 out of range for 3 task"):
        router.task_gate_weight(T)
    with pytest.raises(IndexError, match="task index -1"):
        router.task_logit_offset(-1)
