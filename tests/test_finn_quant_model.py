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


def _trained_like(bb):
    """Non-zero biases and LayerNorm gains / biases, as after training."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in bb.named_parameters():
            if name.endswith(("bias", ".b1", ".b2")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
    return bb


def test_folded_layernorm_affine_keeps_the_float_function() -> None:
    """At 16 bits the folded and the unfolded pathway compute the same tokens (both
    near the float backbone, whose LayerNorms keep their gain and bias; the remaining
    error is the calibrated quantizers' clipping, the same in both); a wrong fold
    would be far off. Dense blocks only: a near-tie in a router could pick another
    expert. (Float biases here: a 32-bit bias on the grid of 16 x 16-bit products
    cannot hold them.)"""
    from finn_flow import quant_model as qm

    imgs = [torch.randn(1, 3, 8, 12) for _ in range(6)]
    tokens = {}
    for fold in (False, True):
        bb = _trained_like(_backbone(moe_layers=[]))
        dims = qm.pathway_dims(bb, (2, 3))
        spec = qm.QuantSpec(
            weight_bits=16, act_bits=16, prob_bits=16, fold_norm_affine=fold, int_bias=False
        )
        q = qm.QuantM3ViTPathway(dims, spec)
        qm.load_backbone(q, bb, "normals")
        if fold:
            for block in q.blocks:
                for norm in (block.norm1, block.norm2):
                    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
        qm.calibrate(q, [qm.patchify(im, 4) for im in imgs])
        with torch.no_grad():
            tokens[fold] = torch.cat([q(qm.patchify(im, 4)) for im in imgs[:3]])
            ref = torch.cat([bb(im, "normals").tokens for im in imgs[:3]])
        assert float((ref - tokens[fold]).norm() / ref.norm()) < 0.1
    diff = float((tokens[True] - tokens[False]).norm() / tokens[False].norm())
    assert diff < 2e-3, f"folded vs unfolded: relative difference {diff:.2e}"


@pytest.mark.parametrize("task", ["semseg", "normals"])
def test_folded_moe_router_and_experts_see_the_same_inputs(task: str) -> None:
    """MoE block: router logits and expert fc1 pre-activations of the folded linears on
    the plain-normalised tokens equal the float model's on its affine LayerNorm."""
    import torch.nn.functional as F

    from finn_flow import quant_model as qm

    bb = _trained_like(_backbone())
    q = qm.QuantM3ViTPathway(qm.pathway_dims(bb, (2, 3)), qm.QuantSpec())
    qm.load_backbone(q, bb, task)
    fb, qb = bb.blocks[1], q.blocks[1]
    x = torch.randn(7, 16, dtype=torch.float64)
    with torch.no_grad():
        ln = F.layer_norm(x, (16,), fb.norm2.weight.double(), fb.norm2.bias.double(), 1e-6)
        ln0 = F.layer_norm(x, (16,), None, None, 1e-6)
        t = bb.tasks.index(task)
        ref_logits = ln @ fb.moe.router.weight[t].double()
        got_logits = F.linear(ln0, qb.ffn.router.weight.double(), qb.ffn.router.bias.double())
        torch.testing.assert_close(got_logits, ref_logits, rtol=1e-5, atol=1e-5)
        w1, b1 = fb.moe.w1.double(), fb.moe.b1.double()  # (E, D, Hd), (E, Hd)
        ref_h = torch.einsum("nd,edh->neh", ln, w1) + b1
        got_h = F.linear(ln0, qb.ffn.fc1.weight.double(), qb.ffn.fc1.bias.double())
        torch.testing.assert_close(got_h, ref_h.reshape(7, -1), rtol=1e-5, atol=1e-5)


def _linears_with_int_bias(q):
    """(name, QuantLinear, input quantizer) of every linear whose bias is quantized."""
    from finn_flow.quant_model import QuantMoE

    pairs = [("patch_embed", q.patch_embed, q.in_quant)]
    for i, block in enumerate(q.blocks):
        a = block.attn
        for h in range(a.num_heads):
            for kind in ("q", "k", "v"):
                pairs.append((f"{i}.{kind}{h}", getattr(a, kind)[h], getattr(a, f"{kind}_in")[h]))
        pairs.append((f"{i}.proj0", a.proj[0], a.out_quant[0]))
        ffn = block.ffn
        if isinstance(ffn, QuantMoE):
            pairs += [
                (f"{i}.router", ffn.router, ffn.router_in),
                (f"{i}.e_fc1", ffn.fc1, ffn.fc1_in),
            ]
        else:
            pairs += [(f"{i}.fc1", ffn.fc1, ffn.in_quant), (f"{i}.fc2", ffn.fc2, ffn.post_act)]
    return pairs


def test_biases_lie_on_the_accumulator_grid() -> None:
    """Every learned bias the quantized layer adds is an integer multiple of (input
    scale x weight scale): read off the layer's output for an all-zero quantized input."""
    from finn_flow import quant_model as qm

    bb = _trained_like(_backbone())
    q = qm.QuantM3ViTPathway(qm.pathway_dims(bb, (2, 3)), qm.QuantSpec())
    qm.load_backbone(q, bb, "normals")
    imgs = [qm.patchify(torch.randn(1, 3, 8, 12), 4) for _ in range(4)]
    qm.calibrate(q, imgs)
    nonzero = 0
    with torch.no_grad():
        for name, lin, quant in _linears_with_int_bias(q):
            zero = quant(torch.zeros(1, 1, lin.in_features))
            s_in = float(zero.scale)
            s_w = float(lin.quant_weight().scale)
            bias = lin(zero).reshape(-1).double()  # W x 0 + quantized bias
            steps = bias / (s_in * s_w)
            # float32 holds the product to ~1e-7 relative
            tol = 1e-3 + 4e-7 * steps.abs()
            assert torch.all((steps - steps.round()).abs() <= tol), name
            # rounded, not clipped: within half a step of the float bias
            err = (bias - lin.bias.double()).abs().max() / (s_in * s_w)
            assert err <= 0.5 + 1e-3, f"{name}: bias off by {err:.3g} steps"
            nonzero += int((steps.round() != 0).sum())
    assert nonzero > 0


def test_float_bias_mode_keeps_biases_off_the_grid() -> None:
    """Control: with ``int_bias=False`` the biases are the float ones (not on the grid)."""
    from finn_flow import quant_model as qm

    bb = _trained_like(_backbone())
    spec = qm.QuantSpec(int_bias=False, fold_norm_affine=False)
    q = qm.QuantM3ViTPathway(qm.pathway_dims(bb, (2, 3)), spec)
    qm.load_backbone(q, bb, "normals")
    torch.testing.assert_close(q.blocks[0].attn.q[0].bias, bb.blocks[0].attn.qkv.bias[:8])
    assert not q.blocks[0].attn.q_in[0].return_quant_tensor
