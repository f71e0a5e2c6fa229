"""Worker of tests/test_expert_parallel.py, started by torchrun (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node 2 tests/_ep_worker.py OUT_DIR

Each rank draws its own tokens and routing (rank-dependent seed) and the shared expert
weights (same seed), runs the expert-parallel FFN twice (raw function on hand-sliced
weights; ``MoEFFN`` sharded by ``shard_experts``), backpropagates sum(y * probe), and
saves inputs, outputs and gradients to OUT_DIR/rank{r}.pt for the test to check.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from mmseg_m3vit.models.moe import MoEFFN
from mmseg_m3vit.models.moe.expert_parallel import (
    ExpertParallelDispatch,
    expert_parallel_ffn,
    shard_experts,
)

E, D, HD, K, M = 8, 12, 10, 2, 37


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        g = torch.Generator().manual_seed(100 + rank)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(M)])
        if rank == 1:
            ids[:, 0] = 0  # skewed load: rank 1 sends most rows to rank 0's first expert
        x = torch.randn(M, D, generator=g, dtype=torch.float64)
        gates = torch.rand(M, K, generator=g, dtype=torch.float64)
        probe = torch.randn(M, D, generator=g, dtype=torch.float64)
        gw = torch.Generator().manual_seed(7)
        shapes = [(E, D, HD), (E, HD), (E, HD, D), (E, D)]
        weights = [torch.randn(s, generator=gw, dtype=torch.float64) for s in shapes]

        # the function on hand-sliced weights
        e_l = E // world
        local = [w[rank * e_l : (rank + 1) * e_l].clone().requires_grad_() for w in weights]
        xg, gg = x.clone().requires_grad_(), gates.clone().requires_grad_()
        y = expert_parallel_ffn(xg, ids, gg, *local, num_experts=E)
        (y * probe).sum().backward()

        # the module path: MoEFFN sharded by shard_experts (1/W gradient scaling)
        layer = MoEFFN(D, HD, E, K, router="shared").double()
        with torch.no_grad():
            for name, w in zip(("w1", "b1", "w2", "b2"), weights, strict=True):
                getattr(layer, name).copy_(w)
        names = shard_experts(layer)
        experts = (layer.w1, layer.b1, layer.w2, layer.b2)
        assert isinstance(layer.dispatch, ExpertParallelDispatch)
        ym = layer.dispatch(x, ids, gates, *experts)
        (ym * probe).sum().backward()
        torch.save(
            {
                "world": world,
                "inputs": {"x": x, "ids": ids, "gates": gates, "probe": probe},
                "weights": weights,
                "y": y.detach(),
                "gx": xg.grad,
                "ggates": gg.grad,
                "glocal": [w.grad for w in local],
                "names": names,
                "local_shapes": [tuple(p.shape) for p in experts],
                "gmodule": [p.grad for p in experts],
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
