"""Expert parallelism on CPU: two gloo processes, each holding half of the experts.

Reference: one process with all experts runs the per-expert naive loop on each rank's
tokens; the objective is the mean over ranks of sum(y * probe). Outputs, token and gate
gradients must match per rank; each rank's expert-weight gradients must match the
reference's slice for its experts (mean over ranks, as DDP averages).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmseg_m3vit.models.moe import MoEFFN
from mmseg_m3vit.models.moe.expert_parallel import expert_parallel_ffn, shard_experts

E, D, HD, K, M, WORLD = 8, 12, 10, 2, 37, 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_inputs(rank: int) -> dict[str, torch.Tensor]:
    """Per-rank tokens / routing (rank-dependent) and shared expert weights (float64)."""
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(M)])
    if rank == 1:
        ids[:, 0] = 0  # skewed load: rank 1 sends most rows to rank 0's first expert
    return {
        "x": torch.randn(M, D, generator=g, dtype=torch.float64),
        "ids": ids,
        "gates": torch.rand(M, K, generator=g, dtype=torch.float64),
        "probe": torch.randn(M, D, generator=g, dtype=torch.float64),
    }


def make_weights() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    shapes = [(E, D, HD), (E, HD), (E, HD, D), (E, D)]
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def naive(x, ids, gates, w1, b1, w2, b2) -> torch.Tensor:
    """Token-by-token loop over the chosen experts (independent of the dispatch code)."""
    rows = []
    for m in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=x.dtype)
        for j in range(ids.shape[1]):
            e = int(ids[m, j])
            h = torch.nn.functional.gelu(x[m] @ w1[e] + b1[e])
            acc = acc + gates[m, j] * (h @ w2[e] + b2[e])
        rows.append(acc)
    return torch.stack(rows)


def reference() -> list[dict[str, torch.Tensor]]:
    weights = [w.clone().requires_grad_() for w in make_weights()]
    per_rank, loss = [], 0.0
    for rank in range(WORLD):
        inp = make_inputs(rank)
        x = inp["x"].clone().requires_grad_()
        gates = inp["gates"].clone().requires_grad_()
        y = naive(x, inp["ids"], gates, *weights)
        loss = loss + (y * inp["probe"]).sum() / WORLD
        per_rank.append({"y": y.detach(), "x": x, "gates": gates})
    loss.backward()
    for r in per_rank:
        r["gx"], r["ggates"] = r.pop("x").grad, r.pop("gates").grad
    per_rank.append({f"g{i}": w.grad for i, w in enumerate(weights)})
    return per_rank


def worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        inp = make_inputs(rank)
        # the function on hand-sharded weights
        e_l = E // WORLD
        local = [w[rank * e_l : (rank + 1) * e_l].clone().requires_grad_() for w in make_weights()]
        x = inp["x"].clone().requires_grad_()
        gates = inp["gates"].clone().requires_grad_()
        y = expert_parallel_ffn(x, inp["ids"], gates, *local, num_experts=E)
        (y * inp["probe"]).sum().backward()
        # the module path: MoEFFN sharded by shard_experts (1/W gradient scaling)
        layer = MoEFFN(D, HD, E, K, router="shared").double()
        with torch.no_grad():
            for name, w in zip(("w1", "b1", "w2", "b2"), make_weights(), strict=True):
                getattr(layer, name).copy_(w)
        names = shard_experts(layer)
        xs = inp["x"].clone().requires_grad_()
        experts = (layer.w1, layer.b1, layer.w2, layer.b2)
        ym = expert_parallel_ffn(
            xs, inp["ids"], inp["gates"], *experts, num_experts=E, group=layer.ep_group
        )
        (ym * inp["probe"]).sum().backward()
        queue.put(
            {
                "rank": rank,
                "y": y.detach(),
                "gx": x.grad,
                "ggates": gates.grad,
                "glocal": [w.grad for w in local],
                "names": names,
                "gmodule": [layer.w1.grad, layer.b1.grad, layer.w2.grad, layer.b2.grad],
            }
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_expert_parallel_equals_all_experts_on_one_process() -> None:
    ctx = mp.get_context("fork")  # the worker need not be importable (importlib mode)
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=120) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    ref = reference()
    weight_grads = ref[WORLD]
    e_l = E // WORLD
    for rank, got in enumerate(results):
        torch.testing.assert_close(got["y"], ref[rank]["y"], rtol=1e-10, atol=1e-10)
        # reference grads are of the mean over ranks; this rank's own loss has weight 1
        torch.testing.assert_close(got["gx"], ref[rank]["gx"] * WORLD, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(
            got["ggates"], ref[rank]["ggates"] * WORLD, rtol=1e-10, atol=1e-10
        )
        sl = slice(rank * e_l, (rank + 1) * e_l)
        for i in range(4):
            want = weight_grads[f"g{i}"][sl]
            # raw function: sum over the ranks' losses = WORLD x the mean
            torch.testing.assert_close(got["glocal"][i], want * WORLD, rtol=1e-10, atol=1e-10)
            # shard_experts scales by 1/W: the mean, as DDP gives the dense weights
            torch.testing.assert_close(got["gmodule"][i], want, rtol=1e-10, atol=1e-10)
        assert got["names"] == ["w1", "b1", "w2", "b2"]
