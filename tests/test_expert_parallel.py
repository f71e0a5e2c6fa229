"""Expert parallelism on CPU: two gloo processes (torchrun), each holding half the experts.

tests/_ep_worker.py runs on each rank and saves its tokens, routing, the shared weights,
its outputs and gradients. Reference here: one process with all experts and a
token-by-token float64 loop over each rank's tokens, objective = mean over ranks of
sum(y * probe). Outputs, token and gate gradients must match per rank; each rank's
expert gradients must match the reference's slice for its experts.
"""

from __future__ import annotations

import os
import os.path as osp
import socket
import subprocess
import sys

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.mark.slow
def test_expert_parallel_equals_all_experts_on_one_process(tmp_path) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        osp.join(ROOT, "tests", "_ep_worker.py"), str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    # reference: all experts in one process, mean over the ranks' objectives
    weights = [w.clone().requires_grad_() for w in got[0]["weights"]]
    loss, ref = 0.0, []
    for r in range(WORLD):
        inp = got[r]["inputs"]
        x, gates = inp["x"].clone().requires_grad_(), inp["gates"].clone().requires_grad_()
        y = naive(x, inp["ids"], gates, *weights)
        loss = loss + (y * inp["probe"]).sum() / WORLD
        ref.append((y.detach(), x, gates))
    loss.backward()

    e_l = weights[0].shape[0] // WORLD
    tol = dict(rtol=1e-10, atol=1e-10)
    for r, res in enumerate(got):
        torch.testing.assert_close(res["weights"][0], got[0]["weights"][0])  # same experts
        y, x, gates = ref[r]
        torch.testing.assert_close(res["y"], y, **tol)
        # this rank's own objective has weight 1, the reference's 1/WORLD
        torch.testing.assert_close(res["gx"], x.grad * WORLD, **tol)
        torch.testing.assert_close(res["ggates"], gates.grad * WORLD, **tol)
        mine = slice(r * e_l, (r + 1) * e_l)
        for i, w in enumerate(weights):
            assert res["local_shapes"][i] == tuple(w[mine].shape)
            # raw function: the sum over the ranks' objectives = WORLD x the mean
            torch.testing.assert_close(res["glocal"][i], w.grad[mine] * WORLD, **tol)
            # shard_experts scales by 1/W: the mean, as DDP gives the dense weights
            torch.testing.assert_close(res["gmodule"][i], w.grad[mine], **tol)
        assert res["names"] == ["w1", "b1", "w2", "b2"]
