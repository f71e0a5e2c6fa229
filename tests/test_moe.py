"""MoE routing, balance loss and dispatch against independent references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmseg_m3vit.models.moe import (
    MoEFFN,
    balance_loss,
    cv_squared,
    get_dispatch,
    sorted_dispatch,
    vmoe_top_k,
)
from mmseg_m3vit.models.moe.reference import expert_loop_dispatch


def _experts(e: int, d: int, hd: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(e, d, hd, generator=g) * 0.3,
        torch.randn(e, hd, generator=g) * 0.1,
        torch.randn(e, hd, d, generator=g) * 0.3,
        torch.randn(e, d, generator=g) * 0.1,
    )


def _per_token_reference(x, ids, gates, w1, b1, w2, b2):
    """Plain loop over tokens and slots in float64."""
    x, gates = x.double(), gates.double()
    w1, b1, w2, b2 = (t.double() for t in (w1, b1, w2, b2))
    out = torch.zeros_like(x)
    for m in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[m, j])
            h = x[m] @ w1[e] + b1[e]
            h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
            out[m] += gates[m, j] * (h @ w2[e] + b2[e])
    return out


def _random_routing(m: int, e: int, k: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(m)])
    return ids, torch.rand(m, k, generator=g)


@pytest.mark.parametrize("case", ["random", "some_empty", "all_same"])
def test_sorted_dispatch_matches_per_token_loop(case: str) -> None:
    m, d, hd, e, k = 37, 8, 6, 5, 2
    x = torch.randn(m, d, generator=torch.Generator().manual_seed(3))
    w = _experts(e, d, hd)
    ids, gates = _random_routing(m, e, k)
    if case == "some_empty":  # experts 1, 3 and 4 receive no token
        ids = torch.stack(
            [torch.tensor([0, 2]) if i % 2 else torch.tensor([2, 0]) for i in range(m)]
        )
    elif case == "all_same":
        ids = torch.tensor([[4, 1]]).expand(m, k).contiguous()
    out = sorted_dispatch(x, ids, gates, *w)
    ref = _per_token_reference(x, ids, gates, *w)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5), (out.double() - ref).abs().max()


def test_dispatch_rejects_bad_shapes() -> None:
    x = torch.randn(4, 8)
    w1, b1, w2, b2 = _experts(3, 8, 5)
    ids, gates = _random_routing(4, 3, 2)
    with pytest.raises(ValueError, match="gates"):
        sorted_dispatch(x, ids, gates[:, :1], w1, b1, w2, b2)
    with pytest.raises(ValueError, match="w2"):
        sorted_dispatch(x, ids, gates, w1, b1, w2[:, :4], b2)
    with pytest.raises(ValueError, match="num_experts"):
        sorted_dispatch(x, ids + 5, gates, w1, b1, w2, b2)
    with pytest.raises(ValueError, match="unknown MoE dispatch"):
        get_dispatch("nope")


def test_single_expert_top1_equals_dense_mlp() -> None:
    d, hd = 8, 12
    moe = MoEFFN(d, hd, num_experts=1, top_k=1, router="shared")
    fc1, fc2 = torch.nn.Linear(d, hd), torch.nn.Linear(hd, d)
    with torch.no_grad():
        moe.w1.copy_(fc1.weight.t()[None])
        moe.b1.copy_(fc1.bias[None])
        moe.w2.copy_(fc2.weight.t()[None])
        moe.b2.copy_(fc2.bias[None])
    x = torch.randn(2, 5, d)
    y, routing, _ = moe(x, None)
    ref = fc2(F.gelu(fc1(x)))
    assert torch.allclose(y, ref, atol=1e-6)
    assert torch.all(routing.gates == 1.0)


@pytest.mark.parametrize("router", ["multi_gate", "task_conditioned", "shared"])
def test_router_weights_are_softmax_then_topk(router: str) -> None:
    d, e, k, t = 8, 6, 3, 2
    moe = MoEFFN(d, 4, num_experts=e, top_k=k, router=router, num_tasks=t, task_embed_dims=5)
    x = torch.randn(3, 4, d)
    task_ids = torch.tensor([1, 0, 1])
    _, routing, _ = moe(x, task_ids)
    # independent logits in float64
    xd = x.double()
    if router == "multi_gate":
        w = moe.router.weight.double()
        logits = torch.stack([xd[b] @ w[int(task_ids[b])] for b in range(3)])
    elif router == "task_conditioned":
        mlp = moe.router.task_mlp
        one_hot = torch.eye(t, dtype=torch.float64)[task_ids]
        # the authors' task MLP: fc1 -> GELU -> fc2 -> LayerNorm(eps 1e-6)
        h = F.gelu(one_hot @ mlp[0].weight.double().t() + mlp[0].bias.double())
        h = h @ mlp[2].weight.double().t() + mlp[2].bias.double()
        h = F.layer_norm(h, (5,), mlp[3].weight.double(), mlp[3].bias.double(), 1e-6)
        inp = torch.cat([xd, h[:, None, :].expand(-1, 4, -1)], dim=-1)
        logits = inp @ moe.router.gate.weight.double().t()
    else:
        logits = xd @ moe.router.gate.weight.double().t()
    probs = torch.exp(logits - logits.logsumexp(-1, keepdim=True)).reshape(-1, e).detach()
    for row in range(probs.shape[0]):
        order = sorted(range(e), key=lambda i: -float(probs[row, i]))[:k]
        assert routing.expert_ids[row].tolist() == order
        assert torch.allclose(routing.gates[row].double(), probs[row, order], atol=1e-6)
    # not renormalised: the k weights sum to less than 1
    assert torch.all(routing.gates.sum(-1) < 1.0 - 1e-4)


@pytest.mark.parametrize("router", ["multi_gate", "task_conditioned", "shared"])
def test_gate_init_is_the_authors_kaiming_uniform(router: str) -> None:
    """kaiming_uniform_(a=sqrt(5)) on the authors' (D_in, E) gate: fan_in = E, so the
    entries are uniform in +-1/sqrt(E), std 1/sqrt(3E) = 0.1443 for 16 experts; checked
    on the routers of a freshly built backbone (its trunc-normal pass must not undo it)."""
    from mmseg_m3vit.models.backbones import M3ViT

    torch.manual_seed(0)
    e = 16
    model = M3ViT(
        tasks=["semseg", "depth"], img_size=32, embed_dims=384, num_heads=6, num_layers=2,
        num_experts=e, top_k=4, router=router,
    )  # fmt: skip
    r = model.blocks[1].moe.router
    w = r.weight if router == "multi_gate" else r.gate.weight
    w = w.detach().double().flatten()
    bound = 1 / math.sqrt(e)
    assert float(w.abs().max()) <= bound
    assert float(w.abs().max()) > 0.99 * bound  # uniform: the bound is reached
    # n >= 6144 draws: the sample std of a uniform is within ~0.6 % (1 sigma) of 1/sqrt(3E)
    assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.03)
    assert abs(float(w.mean())) < 0.01
    # uniform, not normal: 4th moment / var^2 = 1.8 (a normal gives 3)
    kurt = float(((w - w.mean()) ** 4).mean() / w.var() ** 2)
    assert kurt == pytest.approx(1.8, abs=0.1)
    if router == "task_conditioned":  # the task MLP keeps the ViT init (trunc-normal 0.02)
        assert float(r.task_mlp[2].weight.std()) == pytest.approx(0.02, rel=0.15)
        assert r.task_mlp[3].eps == 1e-6


def test_balance_loss_hand_computed() -> None:
    probs = torch.tensor(
        [[0.5, 0.3, 0.2], [0.6, 0.2, 0.2], [0.1, 0.7, 0.2], [0.25, 0.25, 0.5]]
    ).double()
    gate = vmoe_top_k(probs.log(), k=1)
    assert gate.expert_ids[:, 0].tolist() == [0, 0, 1, 2]
    # importance = [0.5+0.6, 0.7, 0.5], load = [2, 1, 1]
    imp = [1.1, 0.7, 0.5]
    mean = sum(imp) / 3
    cv_imp = sum((v - mean) ** 2 for v in imp) / 2 / mean**2
    cv_load = (((2 - 4 / 3) ** 2 + 2 * (1 - 4 / 3) ** 2) / 2) / (4 / 3) ** 2
    assert cv_load == pytest.approx(3 / 16)
    assert float(balance_loss(gate)) == pytest.approx(cv_imp + cv_load, rel=1e-5)


def test_balance_loss_groups_are_separate_router_calls() -> None:
    logits = torch.randn(10, 4)
    gate = vmoe_top_k(logits, k=2)
    groups = torch.tensor([0, 1, 1, 0, 2, 2, 1, 0, 0, 2])
    total = balance_loss(gate, groups, num_groups=4)  # group 3 is absent
    expected = 0.0
    for g in range(3):
        sel = groups == g
        expected += float(balance_loss(vmoe_top_k(logits[sel], k=2)))
    assert float(total) == pytest.approx(expected, rel=1e-5)


def test_balance_loss_groups_of_runs_equal_per_token_groups() -> None:
    logits = torch.randn(4 * 5, 6)
    gate = vmoe_top_k(logits, k=2, with_stats=True)
    per_sample = torch.tensor([2, 0, 2, 1])  # 4 samples of 5 tokens each
    expected = 0.0
    for g in range(3):
        sel = per_sample.repeat_interleave(5) == g
        expected += float(balance_loss(vmoe_top_k(logits[sel], k=2)))
    got = balance_loss(gate, per_sample, num_groups=3, run_length=5)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match=r"group_of_token must have shape \(20 // run_length,\)"):
        balance_loss(gate, per_sample, num_groups=3, run_length=4)


def test_cv_squared_single_expert_is_zero() -> None:
    assert float(cv_squared(torch.tensor([3.0]))) == 0.0
    assert float(cv_squared(torch.tensor([1.0, 3.0]))) == pytest.approx(2.0 / 4.0)


def test_noise_only_in_training_and_smooth_load() -> None:
    torch.manual_seed(0)
    logits = torch.randn(50, 8, requires_grad=True)
    clean = vmoe_top_k(logits, 2, noise_std=1.0, training=False)
    again = vmoe_top_k(logits, 2, noise_std=1.0, training=False)
    assert torch.equal(clean.expert_ids, again.expert_ids)
    noisy = vmoe_top_k(logits, 2, noise_std=8.0, training=True)
    assert not torch.equal(noisy.gates, clean.gates)
    assert torch.all((noisy.load_per_token >= 0) & (noisy.load_per_token <= 1))
    assert noisy.load_per_token.requires_grad
    # with noise off the load is a count and carries no gradient
    assert not clean.load_per_token.requires_grad
    assert torch.equal(clean.load_per_token.sum(-1), torch.full((50,), 2.0))


def test_gradients_reach_used_routers_and_experts_only() -> None:
    d, e, k = 8, 6, 2
    moe = MoEFFN(d, 4, num_experts=e, top_k=k, router="multi_gate", num_tasks=3)
    moe.train()
    x = torch.randn(2, 5, d)
    task_ids = torch.tensor([0, 2])
    y, routing, bal = moe(x, task_ids)
    (y.square().sum() + bal).backward()
    used = set(routing.expert_ids.flatten().tolist())
    for ex in range(e):
        nonzero = moe.w1.grad[ex].abs().sum() > 0 and moe.w2.grad[ex].abs().sum() > 0
        assert bool(nonzero) == (ex in used), (ex, used)
    grad_per_task = moe.router.weight.grad.abs().sum(dim=(1, 2))
    assert grad_per_task[0] > 0 and grad_per_task[2] > 0
    assert grad_per_task[1] == 0


def test_moe_config_errors() -> None:
    with pytest.raises(ValueError, match="top_k=5"):
        MoEFFN(8, 4, num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="unknown router variant 'bogus'"):
        MoEFFN(8, 4, num_experts=4, top_k=2, router="bogus")
    with pytest.raises(ValueError, match="multi_gate"):
        MoEFFN(8, 4, num_experts=4, top_k=2, router="multi_gate")(torch.randn(1, 2, 8), None)


def test_eval_balance_loss_is_zero() -> None:
    moe = MoEFFN(8, 4, num_experts=4, top_k=2, router="shared").eval()
    _, _, bal = moe(torch.randn(1, 3, 8), None)
    assert bal.shape == () and float(bal) == 0.0


def test_benchmark_tool_runs_tiny_and_its_loop_matches() -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "analysis_tools" / "benchmark_moe.py"
    spec = importlib.util.spec_from_file_location("m3vit_benchmark_moe", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    x = torch.randn(9, 8)
    w = _experts(4, 8, 6)
    ids, gates = _random_routing(9, 4, 2)
    ref = _per_token_reference(x, ids, gates, *w)
    assert torch.allclose(expert_loop_dispatch(x, ids, gates, *w).double(), ref, atol=1e-5)
    tables = tool.main(["--device", "cpu", "--small", "--reps", "1"])
    assert len(tables) == 2  # fwd+bwd, forward at one batch size
    for text in tables:
        rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
        assert [r.split(" | ")[0] for r in rows] == [
            "| dense MLP 16-32-16 (equal active FLOPs)",
            "| sorted",
            "| loop",
        ]
        assert rows[0].split(" | ")[2] == "1.00x"
