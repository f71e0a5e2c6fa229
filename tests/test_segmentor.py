"""MultiTaskSegmentor: losses, task-batched training, single-task inference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

import mmseg_m3vit  # noqa: F401  (registers everything)
from mmseg_m3vit.tasks import DATASET_TASKS, TASK_SPECS

init_default_scope("mmseg")

NYUD_LOSSES = {
    "semseg": dict(type="PixelCrossEntropyLoss"),
    "depth": dict(type="DepthL1Loss"),
    "normals": dict(type="NormalsL1Loss"),
    "edge": dict(type="BalancedBCELoss", pos_weight=0.95),
}


def nyud_cfg(router: str = "multi_gate", **kw) -> dict:
    """A tiny 4-task NYUD model config as a plain dict (the real configs live in configs/)."""
    cfg = dict(
        type="MultiTaskSegmentor",
        backbone=dict(
            type="M3ViT",
            img_size=(64, 80),
            embed_dims=32,
            num_heads=2,
            num_layers=4,
            num_experts=4,
            top_k=2,
            expert_hidden_dims=16,
            router=router,
        ),
        decode_heads={
            task: dict(type="PUPHead", num_classes=c, channels=8, loss_decode=NYUD_LOSSES[task])
            for task, c in DATASET_TASKS["nyud"].items()
        },
        loss_weights=dict(semseg=1.0, depth=1.0, normals=10.0, edge=50.0),
        data_preprocessor=dict(
            type="MultiTaskDataPreprocessor",
            mean=[123.675, 116.28, 103.53],
            std=[58.395, 57.12, 57.375],
            size_divisor=16,
        ),
    )
    cfg.update(kw)
    return cfg


def samples(b: int = 2, h: int = 64, w: int = 80, seed: int = 0) -> list[SegDataSample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(b):
        ds = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        ds.gt_sem_seg = PixelData(data=torch.randint(0, 40, (1, h, w), generator=g))
        ds.gt_depth_map = PixelData(data=torch.rand(1, h, w, generator=g) * 3)
        ds.gt_normal_map = PixelData(data=F.normalize(torch.randn(3, h, w, generator=g), dim=0))
        ds.gt_edge_map = PixelData(data=torch.randint(0, 2, (1, h, w), generator=g))
        out.append(ds)
    return out


def build(router: str = "multi_gate", **kw):
    torch.manual_seed(0)
    return MODELS.build(nyud_cfg(router, **kw))


def test_nyud_model_builds_and_loss_keys() -> None:
    model = build().train()
    losses = model.loss(torch.randn(2, 3, 64, 80), samples())
    assert set(losses) == {
        "semseg.loss_ce",
        "depth.loss_depth",
        "normals.loss_normals",
        "edge.loss_bce",
        "loss_moe_balance",
    }
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())


def test_loss_weights_and_balance_against_direct_calls() -> None:
    model = build(task_batched=False).train()
    x, ds = torch.randn(2, 3, 32, 48), samples(2, 32, 48)
    losses = model.loss(x, ds)
    torch.manual_seed(0)
    balance = 0.0
    for task in ["semseg", "depth", "normals", "edge"]:
        out = model.backbone(x, task)
        balance += float(out.balance_loss.detach())
        head = model.heads[task]
        gt = torch.stack([s.get(TASK_SPECS[task].gt_field).data for s in ds])
        logits = head(out.tokens, out.grid)
        raw = float(head.loss_decode(logits, gt).detach())
        key = f"{task}.{head.loss_decode.loss_name}"
        expected = raw * model.loss_weights[task]
        assert float(losses[key].detach()) == pytest.approx(expected, rel=1e-5)
    assert model.loss_weights["edge"] == 50.0
    assert float(losses["loss_moe_balance"].detach()) == pytest.approx(0.01 * balance, rel=1e-5)


def _losses_and_grads(model, x, ds):
    model.zero_grad()
    losses = model.loss(x, ds)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize("router", ["multi_gate", "task_conditioned"])
def test_task_batched_training_equals_sequential(router: str) -> None:
    model = build(router).train()
    assert model.task_batched  # default on
    x, ds = torch.randn(2, 3, 32, 48), samples(2, 32, 48)
    batched_losses, batched_grads = _losses_and_grads(model, x, ds)
    model.task_batched = False
    seq_losses, seq_grads = _losses_and_grads(model, x, ds)
    assert batched_losses.keys() == seq_losses.keys()
    for k in seq_losses:
        assert torch.allclose(batched_losses[k], seq_losses[k], rtol=1e-4, atol=1e-6), k
    assert batched_grads.keys() == seq_grads.keys()
    for n in seq_grads:
        assert torch.allclose(batched_grads[n], seq_grads[n], rtol=1e-3, atol=1e-6), n
    # every task's router received gradient
    router_grads = [g for n, g in seq_grads.items() if "router" in n]
    assert router_grads and all(g.abs().sum() > 0 for g in router_grads)


def _count_calls(module) -> list:
    calls = []
    module.register_forward_hook(lambda m, args, out: calls.append(args))
    return calls


@pytest.mark.parametrize(
    ("router", "batched", "passes"),
    [("multi_gate", False, 4), ("multi_gate", True, 1), ("shared", None, 1)],
)
def test_backbone_passes_per_training_step(router, batched, passes) -> None:
    model = build(router, task_batched=batched).train()
    stem = _count_calls(model.backbone.patch_embed.proj)
    model.loss(torch.randn(1, 3, 32, 48), samples(1, 32, 48))
    assert len(stem) == passes


@pytest.mark.parametrize("router", ["multi_gate", "task_conditioned", "shared"])
def test_single_task_predict_runs_only_that_task(router: str) -> None:
    model = build(router).eval()
    head_calls = {t: _count_calls(h) for t, h in model.heads.items()}
    router_calls = [_count_calls(b.moe.router) for b in model.backbone.blocks if b.is_moe]
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        out = model.predict(x, samples(), tasks="depth")
    assert [t for t, c in head_calls.items() if c] == ["depth"]
    depth_idx = model.backbone.tasks.index("depth")
    for calls in router_calls:
        assert len(calls) == 1
        task_ids = calls[0][1]
        if router == "shared":
            assert task_ids is None
        else:
            assert torch.equal(task_ids, torch.full((2,), depth_idx))
    assert "pred_depth_map" in out[0] and "pred_sem_seg" not in out[0]
    # same numbers as running the backbone and the head by hand
    with torch.no_grad():
        feats = model.backbone(x, None if router == "shared" else "depth")
        ref = model.heads["depth"](feats.tokens, feats.grid)
    assert torch.allclose(out[1].pred_depth_map.data, ref[1], atol=1e-5)


def test_infer_tasks_config_and_argument() -> None:
    model = build(infer_tasks=["semseg", "edge"]).eval()
    with torch.no_grad():
        out = model.predict(torch.randn(1, 3, 32, 48), samples(1, 32, 48))
    preds = {k for k in out[0].keys() if k.startswith("pred_")}
    assert preds == {"pred_sem_seg", "pred_edge_map"}
    with pytest.raises(ValueError, match=r"unknown tasks \['parts'\]; valid tasks are"):
        model.predict(torch.randn(1, 3, 32, 48), None, tasks=["parts"])


def test_predict_through_data_preprocessor_at_original_size() -> None:
    model = build().eval()
    ds = []
    for h, w in [(40, 56), (48, 64)]:
        d = SegDataSample(metainfo=dict(ori_shape=(2 * h, 2 * w)))
        ds.append(d)
    data = dict(
        inputs=[
            torch.randint(0, 255, (3, 40, 56), dtype=torch.uint8),
            torch.randint(0, 255, (3, 48, 64), dtype=torch.uint8),
        ],
        data_samples=ds,
    )
    with torch.no_grad():
        out = model.test_step(data)
    for d, (h, w) in zip(out, [(80, 112), (96, 128)]):
        assert d.pred_sem_seg.data.shape == (1, h, w) and d.pred_sem_seg.data.dtype == torch.long
        assert int(d.pred_sem_seg.data.max()) < 40
        assert d.pred_depth_map.data.shape == (1, h, w)
        n = d.pred_normal_map.data
        assert n.shape == (3, h, w) and torch.allclose(n.norm(dim=0), torch.ones(h, w), atol=1e-4)
        e = d.pred_edge_map.data
        assert e.shape == (1, h, w) and float(e.min()) >= 0 and float(e.max()) <= 1


def test_train_step_through_data_preprocessor() -> None:
    from mmengine.optim import OptimWrapper

    model = build().train()
    ds = samples(2, 32, 48)
    for d in ds:
        d.set_metainfo(dict(ori_shape=(32, 48)))
    image = torch.randint(0, 255, (3, 32, 48), dtype=torch.uint8)
    data = dict(inputs=[image, image], data_samples=ds)
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9))
    log_vars = model.train_step(data, optim)
    assert "loss" in log_vars and "loss_moe_balance" in log_vars
    assert torch.isfinite(log_vars["loss"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_train_step_raises_for_bad_labels_after_the_step() -> None:
    """The segmentor's train_step reads its losses' GPU checks when it ends."""
    from mmengine.optim import OptimWrapper

    model = build().cuda().train()
    ds = samples(2, 32, 48)
    ds[1].gt_sem_seg.data[0, 5, 5] = 77
    image = torch.randint(0, 255, (3, 32, 48), dtype=torch.uint8)
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=1e-3))
    with pytest.raises(ValueError, match=r"PixelCrossEntropyLoss: labels in \[77, 77\]"):
        model.train_step(dict(inputs=[image, image], data_samples=ds), optim)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_train_step_does_not_wait_on_the_gpu() -> None:
    """A bf16 train step as ``tools/train.py --amp`` configures it, fed from host memory
    as the data loader feeds it, runs with the sync debugger set to error (after two
    warm-up steps): the copies to the device do not wait for the previous step."""
    from mmengine.optim import AmpOptimWrapper

    model = build().cuda().train()
    ds = samples(2, 32, 48)
    image = torch.randint(0, 255, (3, 32, 48), dtype=torch.uint8)
    data = dict(inputs=[image, image], data_samples=ds)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    optim = AmpOptimWrapper(optimizer=sgd, dtype="bfloat16", loss_scale=dict(enabled=False))
    for _ in range(2):
        model.train_step(data, optim)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        log_vars = model.train_step(data, optim)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(log_vars["loss"])


def test_tensor_mode_returns_logits_per_task() -> None:
    model = build().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 48), mode="tensor")
    assert {t: tuple(v.shape) for t, v in out.items()} == {
        "semseg": (1, 40, 32, 48),
        "depth": (1, 1, 32, 48),
        "normals": (1, 3, 32, 48),
        "edge": (1, 1, 32, 48),
    }


def test_config_errors() -> None:
    cfg = nyud_cfg()
    bad = copy.deepcopy(cfg)
    bad["backbone"]["tasks"] = ["semseg", "depth", "normals", "edge", "sal"]
    with pytest.raises(ValueError, match=r"backbone tasks .* differ from the segmentor's"):
        MODELS.build(bad)
    with pytest.raises(ValueError, match=r"unknown loss_weights \['segsem'\]"):
        MODELS.build(nyud_cfg(loss_weights=dict(segsem=2.0)))
    with pytest.raises(ValueError, match=r"unknown infer_tasks \['sal'\]"):
        MODELS.build(nyud_cfg(infer_tasks=["sal"]))
    bad = copy.deepcopy(cfg)
    bad["backbone"].update(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="top_k=3"):
        MODELS.build(bad)
    with pytest.raises(ValueError, match="decode_heads is empty"):
        MODELS.build(nyud_cfg(decode_heads={}))
    with pytest.raises(ValueError, match=r"tasks \['sal'\] are not tasks of dataset 'nyud'"):
        MODELS.build(nyud_cfg(dataset="nyud", tasks=["semseg", "sal"]))
    with pytest.raises(ValueError, match=r"tasks \['parts'\] have no entry in decode_heads"):
        MODELS.build(nyud_cfg(dataset="pascal", tasks=["semseg", "parts"]))


def test_head_template_task_table_and_class_counts() -> None:
    """One template for every head, a per-task table holding more tasks than are built,
    class counts from the task table of the data set, weights of unbuilt tasks ignored."""
    table = {task: dict(loss_decode=loss) for task, loss in NYUD_LOSSES.items()}
    table["parts"] = dict(loss_decode=dict(type="PixelCrossEntropyLoss"))
    template = dict(type="PUPHead", channels=8, num_up=2)
    weights = dict(semseg=1.0, parts=2.0, depth=3.0, normals=10.0, edge=50.0)
    model = build(
        decode_heads=table, head_template=template, dataset="pascal", loss_weights=weights
    )
    assert model.tasks == ["semseg", "parts", "normals", "edge"]  # PASCAL order; no sal entry
    assert {t: h.num_classes for t, h in model.heads.items()} == dict(
        semseg=21, parts=7, normals=3, edge=1
    )
    assert all(h.channels == 8 and h.num_up == 2 for h in model.heads.values())
    assert model.loss_weights == dict(semseg=1.0, parts=2.0, normals=10.0, edge=50.0)
    two = build(
        decode_heads=table, head_template=template, dataset="nyud", tasks=["depth", "semseg"]
    )
    assert two.tasks == two.backbone.tasks == ["depth", "semseg"]
    assert two.heads["semseg"].num_classes == 40
    # a task's own entry wins over the template
    table["depth"] = dict(table["depth"], channels=4)
    assert (
        build(decode_heads=table, head_template=template, dataset="nyud").heads["depth"].channels
        == 4
    )


def test_tam_is_training_only_and_off_by_default() -> None:
    assert not hasattr(build(), "tam")
    model = build(tam=dict(levels=(0, 2), loss_weight=0.5)).train()
    losses = model.loss(torch.randn(2, 3, 32, 48), samples(2, 32, 48))
    for task, name in [("semseg", "loss_ce"), ("edge", "loss_bce")]:
        for level in (0, 2):
            assert f"{task}.tam{level}_{name}" in losses
    total = sum(losses.values())
    total.backward()
    tam_params = list(model.tam.parameters())
    assert tam_params and all(p.grad is not None for p in tam_params)
    calls = _count_calls(model.tam["level0"])
    model.eval()
    with torch.no_grad():
        model.predict(torch.randn(1, 3, 32, 48), samples(1, 32, 48))
    assert calls == []
    with pytest.raises(ValueError, match="tam levels"):
        build(tam=dict(levels=(4,)))


def test_task_batched_features_split_per_task() -> None:
    model = build().eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        feats, _ = model.extract_feat(x, ["normals", "semseg"])
        for task in ["normals", "semseg"]:
            ref = model.backbone(x, task)
            assert torch.allclose(feats[task].tokens, ref.tokens, atol=1e-5)
            for got, want in zip(feats[task].routing, ref.routing):
                assert torch.equal(got.expert_ids, want.expert_ids)
                assert torch.allclose(got.gates, want.gates, atol=1e-6)
