"""M3ViT backbone: timm-layout loading, dense-block equivalence, pos-embed resize, tasks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmseg_m3vit.models.backbones import M3ViT, resize_pos_embed
from mmseg_m3vit.models.backbones.pretrained import load_timm_checkpoint

D, HEADS, LAYERS = 32, 4, 4


def _small(**kw) -> M3ViT:
    cfg = dict(
        tasks=["semseg", "depth"],
        img_size=(64, 80),
        embed_dims=D,
        num_heads=HEADS,
        num_layers=LAYERS,
        num_experts=4,
        top_k=2,
        expert_hidden_dims=16,
    )
    cfg.update(kw)
    return M3ViT(**cfg)


def _timm_state_dict(grid: int = 3, layers: int = LAYERS, seed: int = 0) -> dict:
    """Random weights in timm's ViT naming (with a final norm and head to be ignored)."""
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g) * 0.2

    sd = {
        "patch_embed.proj.weight": r(D, 3, 16, 16),
        "patch_embed.proj.bias": r(D),
        "cls_token": r(1, 1, D),
        "pos_embed": r(1, 1 + grid * grid, D),
        "norm.weight": r(D),
        "norm.bias": r(D),
        "head.weight": r(10, D),
        "head.bias": r(10),
    }
    for i in range(layers):
        p = f"blocks.{i}."
        sd.update(
            {
                p + "norm1.weight": 1 + r(D),
                p + "norm1.bias": r(D),
                p + "attn.qkv.weight": r(3 * D, D),
                p + "attn.qkv.bias": r(3 * D),
                p + "attn.proj.weight": r(D, D),
                p + "attn.proj.bias": r(D),
                p + "norm2.weight": 1 + r(D),
                p + "norm2.bias": r(D),
                p + "mlp.fc1.weight": r(4 * D, D),
                p + "mlp.fc1.bias": r(4 * D),
                p + "mlp.fc2.weight": r(D, 4 * D),
                p + "mlp.fc2.bias": r(D),
            }
        )
    return sd


def _ln(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _reference_vit_block(x, sd, i):
    """A plain pre-norm ViT block written from scratch (float64)."""
    p = f"blocks.{i}."
    w = {k[len(p) :]: v.double() for k, v in sd.items() if k.startswith(p)}
    b, n, d = x.shape
    h = _ln(x, w["norm1.weight"], w["norm1.bias"])
    qkv = h @ w["attn.qkv.weight"].t() + w["attn.qkv.bias"]
    q, k, v = qkv.split(d, dim=-1)
    hd = d // HEADS

    def heads(t):
        return t.reshape(b, n, HEADS, hd).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    o = (att @ v).transpose(1, 2).reshape(b, n, d)
    x = x + o @ w["attn.proj.weight"].t() + w["attn.proj.bias"]
    h = _ln(x, w["norm2.weight"], w["norm2.bias"])
    h = _gelu(h @ w["mlp.fc1.weight"].t() + w["mlp.fc1.bias"])
    return x + h @ w["mlp.fc2.weight"].t() + w["mlp.fc2.bias"]


def _naive_bilinear(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Half-pixel bilinear resize (align_corners=False) by explicit loops. grid: (h, w, D)."""
    in_h, in_w, _ = grid.shape
    out = np.zeros((out_h, out_w, grid.shape[2]))

    def coords(o, n_in, n_out):
        s = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(s)), n_in - 1)
        return i0, min(i0 + 1, n_in - 1), s - i0

    for y in range(out_h):
        y0, y1, ly = coords(y, in_h, out_h)
        for x in range(out_w):
            x0, x1, lx = coords(x, in_w, out_w)
            out[y, x] = (1 - ly) * ((1 - lx) * grid[y0, x0] + lx * grid[y0, x1]) + ly * (
                (1 - lx) * grid[y1, x0] + lx * grid[y1, x1]
            )
    return out


def test_pos_embed_resize_matches_naive_bilinear() -> None:
    pe = torch.randn(1, 1 + 3 * 3, 5, dtype=torch.float64)
    out = resize_pos_embed(pe, (3, 3), (4, 5))
    assert out.shape == (1, 1 + 20, 5)
    assert torch.equal(out[:, 0], pe[:, 0])  # CLS kept apart
    ref = _naive_bilinear(pe[0, 1:].reshape(3, 3, 5).numpy(), 4, 5)
    np.testing.assert_allclose(out[0, 1:].reshape(4, 5, 5).numpy(), ref, atol=1e-12)


def test_dense_blocks_equal_plain_vit_after_timm_loading(tmp_path) -> None:
    sd = _timm_state_dict(grid=3)
    path = tmp_path / "deit.pth"
    torch.save({"model": sd}, path)
    model = _small(moe_layers=[], pretrained=str(path), img_size=(48, 48))
    model.init_weights()
    model = model.double().eval()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    out = model(x, "semseg")
    # reference: patchify by unfold, CLS, pos embed, plain blocks
    patches = x.unfold(2, 16, 16).unfold(3, 16, 16)  # (B, 3, 3, 3, 16, 16)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 9, 3 * 16 * 16)
    tok = patches @ sd["patch_embed.proj.weight"].double().reshape(D, -1).t()
    tok = tok + sd["patch_embed.proj.bias"].double()
    tok = torch.cat([sd["cls_token"].double().expand(2, -1, -1), tok], 1)
    tok = tok + sd["pos_embed"].double()
    for i in range(LAYERS):
        tok = _reference_vit_block(tok, sd, i)
    assert out.tokens.shape == (2, 10, D)
    assert torch.allclose(out.tokens, tok, atol=1e-9)
    assert float(out.balance_loss) == 0.0 and out.routing == []


def test_loading_resizes_pos_embed_and_splits_experts(tmp_path) -> None:
    sd = _timm_state_dict(grid=3)
    path = tmp_path / "vit.pth"
    torch.save(sd, path)
    model = _small(expert_hidden_dims=D, num_experts=6, pretrained=str(path))
    report = load_timm_checkpoint(model, str(path))
    assert "head.weight" in report["unexpected"] and "norm.weight" in report["unexpected"]
    assert all("router" in k for k in report["missing"]), report["missing"]
    pe = model.pos_embed.detach()
    assert torch.equal(pe[:, 0], sd["pos_embed"][:, 0])
    ref = _naive_bilinear(sd["pos_embed"][0, 1:].reshape(3, 3, D).double().numpy(), 4, 5)
    np.testing.assert_allclose(pe[0, 1:].reshape(4, 5, D).double().numpy(), ref, atol=1e-5)
    # 'split': 4*D hidden units, expert hidden D -> G = 4 groups; expert e uses group e % 4
    moe = model.blocks[1].moe
    fc1_w, fc1_b = sd["blocks.1.mlp.fc1.weight"], sd["blocks.1.mlp.fc1.bias"]
    fc2_w, fc2_b = sd["blocks.1.mlp.fc2.weight"], sd["blocks.1.mlp.fc2.bias"]
    assert torch.equal(moe.w1[5], fc1_w[D : 2 * D].t())  # 5 % 4 == 1
    v = torch.randn(7, D, dtype=torch.float64)
    dense = _gelu(v @ fc1_w.double().t() + fc1_b.double()) @ fc2_w.double().t() + fc2_b.double()
    summed = sum(
        _gelu(v @ moe.w1[e].double() + moe.b1[e].double()) @ moe.w2[e].double() + moe.b2[e].double()
        for e in range(4)
    )
    assert torch.allclose(summed, dense, atol=1e-5)


def test_split_init_forward_is_gated_groups_not_the_dense_mlp(tmp_path) -> None:
    """What a MoE layer computes right after expert_init='split': sum over the router's
    top-k of p_j * (dense group i_j mod G, with fc2 bias / G), p_j the softmax
    probabilities of the randomly initialised router. Rebuilt in float64 from the timm
    weights and the router matrix; it is not the dense MLP."""
    torch.manual_seed(0)
    sd = _timm_state_dict(grid=3)
    torch.save(sd, tmp_path / "vit.pth")
    e, k, hd = 8, 2, D
    model = _small(expert_hidden_dims=hd, num_experts=e, top_k=k).double().eval()
    load_timm_checkpoint(model, str(tmp_path / "vit.pth"))
    model.double()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    y, routing, _ = model.blocks[1].moe(x, torch.tensor([1, 1]))
    fc1_w, fc1_b = sd["blocks.1.mlp.fc1.weight"].double(), sd["blocks.1.mlp.fc1.bias"].double()
    fc2_w, fc2_b = sd["blocks.1.mlp.fc2.weight"].double(), sd["blocks.1.mlp.fc2.bias"].double()
    groups = 4 * D // hd

    def group(g, v):
        cols = slice(g * hd, (g + 1) * hd)
        return _gelu(v @ fc1_w[cols].t() + fc1_b[cols]) @ fc2_w[:, cols].t() + fc2_b / groups

    gate = model.blocks[1].moe.router.weight[1].detach().double()  # task 'depth'
    expected = torch.zeros_like(x)
    for b in range(2):
        for n in range(5):
            p = torch.softmax(x[b, n] @ gate, dim=0)
            top = sorted(range(e), key=lambda i: -float(p[i]))[:k]
            expected[b, n] = sum(p[i] * group(i % groups, x[b, n]) for i in top)
    # (the gate softmax runs in float32: agreement to float32 precision)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    dense = _gelu(x @ fc1_w.t() + fc1_b) @ fc2_w.t() + fc2_b
    assert (y - dense).norm() > 0.5 * dense.norm()


def test_expert_init_random_keeps_experts(tmp_path) -> None:
    path = tmp_path / "vit.pth"
    torch.save(_timm_state_dict(grid=3), path)
    model = _small(expert_init="random")
    before = model.blocks[1].moe.w1.detach().clone()
    report = load_timm_checkpoint(model, str(path))
    assert torch.equal(model.blocks[1].moe.w1, before)
    assert "blocks.1.moe.w1" in report["missing"]


def test_load_errors(tmp_path) -> None:
    sd = _timm_state_dict(grid=3)
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(5, 5)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight"):
        load_timm_checkpoint(_small(), str(tmp_path / "bad.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_timm_checkpoint(_small(), str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="multiple of expert_hidden_dims"):
        good = _timm_state_dict(grid=3)
        torch.save(good, tmp_path / "good.pth")
        load_timm_checkpoint(_small(expert_hidden_dims=24), str(tmp_path / "good.pth"))


def test_pretrained_file_that_loads_nothing_fails(tmp_path) -> None:
    """Lenient for routers (and experts with expert_init='random'), but an empty or
    unrelated file, or one lacking backbone blocks, fails naming what is missing."""
    torch.save({}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match=r"empty\.pth lacks \d+ backbone tensors"):
        load_timm_checkpoint(_small(), str(tmp_path / "empty.pth"))
    unrelated = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}
    torch.save({"state_dict": unrelated}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match=r"resnet\.pth lacks.*conv1\.weight, fc\.weight"):
        load_timm_checkpoint(_small(), str(tmp_path / "resnet.pth"))
    shallow = _timm_state_dict(grid=3, layers=2)  # the model has 4 blocks
    torch.save(shallow, tmp_path / "shallow.pth")
    with pytest.raises(ValueError, match=r"blocks\.2\."):
        load_timm_checkpoint(_small(), str(tmp_path / "shallow.pth"))
    # through the config key: init_weights fails the same way
    with pytest.raises(ValueError, match="empty.pth"):
        _small(pretrained=str(tmp_path / "empty.pth")).init_weights()


@pytest.mark.parametrize("router", ["multi_gate", "task_conditioned", "shared"])
def test_any_patch_multiple_input_size(router: str) -> None:
    model = _small(router=router).eval()
    for h, w in [(64, 80), (32, 48)]:
        out = model(torch.randn(1, 3, h, w), None if router == "shared" else "depth")
        assert out.tokens.shape == (1, 1 + (h // 16) * (w // 16), D)
        assert out.grid == (h // 16, w // 16)
        assert len(out.routing) == 2 and out.routing[0].expert_ids.shape == (out.tokens.shape[1], 2)
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        model(torch.randn(1, 3, 40, 48), "depth")


@pytest.mark.parametrize("router", ["multi_gate", "task_conditioned"])
def test_mixed_task_batch_equals_per_task_passes(router: str) -> None:
    model = _small(router=router).eval()
    x = torch.randn(3, 3, 32, 32)
    mixed = model(x, torch.tensor([1, 0, 1]))
    for i, t in enumerate(["depth", "semseg", "depth"]):
        single = model(x[i : i + 1], t)
        assert torch.allclose(mixed.tokens[i], single.tokens[0], atol=1e-5)
    # the two tasks really route differently
    a, b = model(x, "semseg"), model(x, "depth")
    assert not torch.allclose(a.tokens, b.tokens)


@pytest.mark.parametrize("router", ["multi_gate", "task_conditioned", "shared"])
def test_forward_tasks_equals_sequential_passes(router: str) -> None:
    torch.manual_seed(0)
    model = _small(router=router).train()
    x = torch.randn(2, 3, 32, 48)
    tasks = ["semseg", "depth"]
    batched = model.forward_tasks(x, tasks)
    seq = [model(x, None if router == "shared" else t) for t in tasks]
    assert torch.allclose(batched.tokens, torch.cat([s.tokens for s in seq]), atol=1e-5)
    expected_bal = seq[0].balance_loss if router == "shared" else sum(s.balance_loss for s in seq)
    assert torch.allclose(batched.balance_loss, expected_bal, atol=1e-5)


def test_forward_tasks_shares_everything_before_the_first_router() -> None:
    model = _small().train()
    first = model.blocks[model.first_moe_layer]
    batches: dict[str, int] = {}

    def record(name: str):
        def hook(module, args, out) -> None:
            batches.setdefault(name, args[0].shape[0])

        return hook

    for name in ("attn", "norm2", "moe"):
        getattr(first, name).register_forward_hook(record(name))
    model.forward_tasks(torch.randn(2, 3, 32, 48), ["semseg", "depth"])
    assert batches == {"attn": 2, "norm2": 2, "moe": 4}


def test_forward_tasks_without_moe_layers_runs_the_backbone_once() -> None:
    torch.manual_seed(0)
    model = _small(moe_layers=[]).train()
    x = torch.randn(2, 3, 32, 48)
    batched = model.forward_tasks(x, ["semseg", "depth"])
    single = model(x, "semseg")
    assert torch.equal(batched.tokens, single.tokens.repeat(2, 1, 1))
    assert batched.routing == [] and float(batched.balance_loss) == 0.0


def test_balance_loss_train_only_and_differentiable() -> None:
    model = _small().train()
    out = model(torch.randn(2, 3, 32, 32), "semseg")
    assert out.balance_loss.requires_grad and float(out.balance_loss.detach()) > 0
    out.balance_loss.backward()
    assert model.blocks[1].moe.router.weight.grad[0].abs().sum() > 0
    assert float(model.eval()(torch.randn(1, 3, 32, 32), "semseg").balance_loss) == 0.0


def test_bad_config_fails_at_build() -> None:
    with pytest.raises(ValueError, match="top_k=5"):
        _small(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="num_heads=5 does not divide embed_dims=32"):
        _small(num_heads=5)
    with pytest.raises(ValueError, match="unknown router variant 'soft'"):
        _small(router="soft")
    with pytest.raises(ValueError, match="non-empty task list"):
        _small(tasks=[])
    with pytest.raises(ValueError, match="unknown expert_init"):
        _small(expert_init="clone")
    with pytest.raises(ValueError, match="moe_layers"):
        _small(moe_layers=[7])
    model = _small()
    with pytest.raises(ValueError, match="unknown task 'edge'"):
        model(torch.randn(1, 3, 32, 32), "edge")
    with pytest.raises(ValueError, match="needs a task"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"task indices must be in \[0, 2\)"):
        model(torch.randn(1, 3, 32, 32), torch.tensor([2]))


def test_registered_and_buildable_from_dict() -> None:
    from mmseg.registry import MODELS

    import mmseg_m3vit  # noqa: F401

    model = MODELS.build(
        dict(
            type="M3ViT",
            tasks=["semseg"],
            embed_dims=32,
            num_heads=2,
            num_layers=2,
            num_experts=2,
            top_k=1,
        )
    )
    assert isinstance(model, M3ViT) and model.moe_layers == [1]
