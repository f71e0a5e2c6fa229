"""Routing dump: quantized routing against an independent top-k, agreement counts on
hand-made routings, expert load and entropy in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.finn


def test_agreement_counts_on_a_hand_made_routing() -> None:
    from finn_flow.routing_dump import agreement

    f_ids = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])
    q_ids = np.array([[0, 1], [3, 2], [4, 9], [8, 9]])  # same; swapped; one; none
    f_g = np.array([[0.5, 0.2], [0.4, 0.3], [0.6, 0.1], [0.5, 0.5]], dtype=np.float32)
    q_g = np.array([[0.5, 0.3], [0.3, 0.3], [0.5, 0.2], [0.5, 0.5]], dtype=np.float32)
    a = agreement([(f_ids, f_g)], [(q_ids, q_g)])
    assert a["tokens"] == 4
    assert a["set"] == pytest.approx(50.0)  # tokens 0 and 1
    assert a["top1"] == pytest.approx(50.0)  # tokens 0 and 2
    assert a["slots"] == pytest.approx(100 * 3 / 8)  # (0,0), (0,1), (2,0)
    # matched experts: t0 e0 0, e1 0.1; t1 e2 |0.4-0.3|, e3 |0.3-0.3|; t2 e4 0.1
    assert a["gate_abs_diff"] == pytest.approx((0 + 0.1 + 0.1 + 0 + 0.1) / 5, abs=1e-6)


def test_order_by_gate_breaks_ties_to_the_lower_id() -> None:
    from finn_flow.routing_dump import order_by_gate

    ids, gates = order_by_gate(np.array([[5, 2, 7]]), np.array([[0.2, 0.2, 0.6]]))
    assert ids.tolist() == [[7, 2, 5]]
    np.testing.assert_allclose(gates, [[0.6, 0.2, 0.2]], rtol=1e-6)


def test_expert_load_and_entropy() -> None:
    from finn_flow.routing_dump import expert_load, load_entropy

    frame = [(np.array([[0, 1], [0, 2]]), np.zeros((2, 2))), (np.array([[3, 2], [1, 0]]), 0)]
    load = expert_load([frame, frame], 4)
    np.testing.assert_allclose(load[0], [1.0, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(load[1], [0.5, 0.5, 0.5, 0.5])
    ent = load_entropy(load)
    assert ent[1] == pytest.approx(2.0)  # uniform over 4 experts
    assert ent[0] == pytest.approx(1.5)  # (1/2, 1/4, 1/4)


def test_quantized_routing_is_the_exact_topk_of_the_quantized_probabilities() -> None:
    """Hooked routing of every MoE layer == a stable sort of the quantized router
    probabilities recomputed from the layer's own input (ties: lower id)."""
    import mmseg_m3vit  # noqa: F401
    from finn_flow import quant_model as qm
    from finn_flow.routing_dump import float_routing, quant_routing
    from mmseg_m3vit.models.backbones.m3vit import M3ViT

    torch.manual_seed(0)
    bb = M3ViT(
        tasks=["semseg", "normals"], img_size=(8, 12), patch_size=4, embed_dims=16,
        num_layers=4, num_heads=2, num_experts=6, top_k=2, expert_hidden_dims=8,
    ).eval()  # fmt: skip
    q = qm.QuantM3ViTPathway(qm.pathway_dims(bb, (2, 3)), qm.QuantSpec(prob_bits=4))
    qm.load_backbone(q, bb, "normals")
    imgs = [torch.randn(1, 3, 8, 12) for _ in range(4)]
    qm.calibrate(q, [qm.patchify(im, 4) for im in imgs])
    moes = [b.ffn for b in q.blocks if isinstance(b.ffn, qm.QuantMoE)]
    inputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, a, o: inputs.append(a[0])) for m in moes]
    with torch.no_grad():
        got = quant_routing(q, qm.patchify(imgs[0], 4))
    for h in hooks:
        h.remove()
    assert len(got) == len(moes) == 2
    for moe, x, (ids, gates) in zip(moes, inputs, got):
        with torch.no_grad():
            logits = moe.logit_quant(moe.router(moe.router_in(x)))
            pq = moe.gate.prob_quant(torch.softmax(logits, dim=-1))[0]
        order = torch.sort(-pq, dim=-1, stable=True).indices[:, :2]
        ref_ids = order.numpy()
        ref_g = torch.gather(pq, 1, order).numpy()
        # canonical order: descending gate, ties to the lower id (as a stable sort gives)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(gates, ref_g, atol=1e-6)
    fr = float_routing(bb, imgs[0], "normals")
    assert [r[0].shape for r in fr] == [g[0].shape for g in got] == [(7, 2), (7, 2)]


TINY_FPGA = """
_base_ = [{base!r}]
data_root = {root!r}
model = dict(
    backbone=dict(
        img_size=(8, 8), patch_size=4, embed_dims=16, num_layers=1, num_heads=1,
        moe_layers=[0], num_experts=4, top_k=2, expert_hidden_dims=8,
    ),
    head_template=dict(channels=8, num_up=0),
)
val_dataloader = dict(dataset=dict(data_root=data_root, split="val", holdout=None))
fpga = dict(input_size=(8, 8), calib_images=2)
"""


def test_command_line_writes_every_tasks_routing(tmp_path, tiny_nyud_root: str) -> None:
    """routing_dump.py end to end on a tiny FPGA config: routing.json with every task's
    expert ids per frame from both models, and the load figure."""
    import json
    from pathlib import Path

    from finn_flow import routing_dump

    base = Path(__file__).resolve().parents[1] / "configs" / "fpga"
    cfg = tmp_path / "tiny.py"
    cfg.write_text(
        TINY_FPGA.format(
            base=str(base / "m3vit_vit-t16-6blk-moe16-top2-mg_fpga_synthnyud-64x80.py"),
            root=tiny_nyud_root,
        )
    )
    out = tmp_path / "routing"
    assert routing_dump.main(["--config", str(cfg), "--images", "3", "--out", str(out)]) == 0
    dump = json.loads((out / "routing.json").read_text())
    assert (out / "expert_load.png").stat().st_size > 0
    assert dump["images"] == 3 and sorted(dump["tasks"]) == sorted(dump["load"])
    assert set(dump["tasks"]) == {"semseg", "depth", "normals", "edge"}
    for load in dump["load"].values():
        # one MoE layer, 4 experts, top-2: each row of loads sums to k = 2
        assert np.asarray(load["float"]["load"]).shape == (1, 4)
        np.testing.assert_allclose(np.asarray(load["float"]["load"]).sum(axis=1), 2.0)
