"""The Brevitas mirror of one task's pathway against independent float references."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.finn


def _backbone(**kw):
    import mmseg_m3vit  # noqa: F401
    from mmseg_m3vit.models.backbones.m3vit import M3ViT

    torch.manual_seed(0)
    args = dict(
        tasks=["semseg", "normals"],
        img_size=(8, 12),
        patch_size=4,
        embed_dims=16,
        num_layers=2,
        num_heads=2,
        num_experts=4,
        top_k=2,
        expert_hidden_dims=8,
    )
    args.update(kw)
    return M3ViT(**args).eval()


def test_topk_gate_is_exact_topk_with_lower_index_tie_break() -> None:
    """Gates equal a sort-based top-k of the quantized probabilities (ties: lower index)."""
    from finn_flow.quant_model import QuantTopKGate

    torch.manual_seed(1)
    for e, k in ((4, 2), (6, 1), (5, 3)):
        gate = QuantTopKGate(e, k, prob_bits=4).eval()  # 4 bits: many exact ties
        p = torch.softmax(torch.randn(1, 300, e) * 2, dim=-1)
        with torch.no_grad():
            g = gate(p)
            pq = gate.prob_quant(p)
        order = torch.sort(-pq, dim=-1, stable=True).indices[..., :k]
        ref = torch.zeros_like(pq).scatter(-1, order, pq.gather(-1, order))
        torch.testing.assert_close(g, ref, rtol=0, atol=1e-6)
        assert ((g > 0).sum(-1) <= k).all()


def test_patchify_matches_conv_patch_embedding() -> None:
    """Host-side patch cutting + linear == the float model's strided Conv2d (+ CLS row)."""
    from finn_flow.quant_model import patchify

    conv = torch.nn.Conv2d(3, 5, 4, 4)
    img = torch.randn(2, 3, 8, 12)
    rows = patchify(img, 4)
    assert rows.shape == (2, 1 + 6, 48)
    assert torch.all(rows[:, 0] == 0)
    lin = rows[:, 1:] @ conv.weight.reshape(5, -1).t() + conv.bias
    ref = conv(img).flatten(2).transpose(1, 2)
    torch.testing.assert_close(lin, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task", ["semseg", "normals"])
def test_quant_pathway_tracks_float_backbone(task: str) -> None:
    """With 8-bit quantization the pathway's tokens stay close to the float model's."""
    from finn_flow import quant_model as qm

    bb = _backbone()
    dims = qm.pathway_dims(bb, (2, 3))
    assert dims.moe_layers == (1,) and dims.tokens == 7
    q = qm.QuantM3ViTPathway(dims, qm.QuantSpec())
    qm.load_backbone(q, bb, task)
    imgs = [torch.randn(1, 3, 8, 12) for _ in range(6)]
    qm.calibrate(q, [qm.patchify(im, 4) for im in imgs])
    with torch.no_grad():
        for im in imgs[:3]:
            ref = bb(im, task).tokens
            got = q(qm.patchify(im, 4))
            rel = float((ref - got).norm() / ref.norm())
            assert rel < 0.1, f"relative error {rel:.3f} of task {task}"


def test_load_backbone_rejects_unknown_task() -> None:
    from finn_flow import quant_model as qm

    bb = _backbone()
    q = qm.QuantM3ViTPathway(qm.pathway_dims(bb, (2, 3)), qm.QuantSpec())
    with pytest.raises(ValueError, match="not one of the backbone's tasks"):
        qm.load_backbone(q, bb, "depth")
