"""Per-task losses and the PUP head against hand-written references."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmengine.structures import PixelData
from mmseg.structures import SegDataSample
from torch import Tensor

import mmseg_m3vit  # noqa: F401  (registers everything)
from mmseg_m3vit.models.decode_heads import PUPHead, default_output_kind
from mmseg_m3vit.models.losses import (
    BalancedBCELoss,
    DepthL1Loss,
    NormalsL1Loss,
    PixelCrossEntropyLoss,
    raise_label_errors,
)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_cross_entropy_ignores_255() -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 3, 5, generator=g)
    target = torch.randint(0, 4, (2, 1, 3, 5), generator=g)
    target[0, 0, 1, :3] = 255
    loss = PixelCrossEntropyLoss()(pred, target)
    p, t = pred.double().numpy(), target.numpy()
    total, count = 0.0, 0
    for b in range(2):
        for y in range(3):
            for x in range(5):
                label = t[b, 0, y, x]
                if label == 255:
                    continue
                logits = p[b, :, y, x]
                total += math.log(np.exp(logits).sum()) - logits[label]
                count += 1
    assert float(loss) == pytest.approx(total / count, rel=1e-5)


def test_depth_l1_valid_pixels_only() -> None:
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    gt = torch.tensor([[[[1.5, 0.0], [1.0, 0.0]]]])  # two valid pixels
    assert float(DepthL1Loss()(pred, gt)) == pytest.approx((0.5 + 2.0) / 2)


def test_normals_l1_normalises_prediction_and_skips_invalid() -> None:
    pred = torch.zeros(1, 3, 1, 3)
    pred[0, :, 0, 0] = torch.tensor([3.0, 0.0, 4.0])  # -> (0.6, 0, 0.8)
    pred[0, :, 0, 1] = torch.tensor([0.0, -2.0, 0.0])  # -> (0, -1, 0)
    pred[0, :, 0, 2] = torch.tensor([5.0, 5.0, 5.0])  # invalid GT below
    gt = torch.zeros(1, 3, 1, 3)
    gt[0, :, 0, 0] = torch.tensor([0.0, 0.0, 1.0])
    gt[0, :, 0, 1] = torch.tensor([0.0, -1.0, 0.0])
    expected = (0.6 + 0.0 + 0.2 + 0 + 0 + 0) / 6  # mean over 2 valid pixels x 3
    assert float(NormalsL1Loss()(pred, gt)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("pos_weight", [0.95, None])
def test_balanced_bce(pos_weight) -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 1, 4, 4, generator=g)
    y = torch.randint(0, 2, (1, 1, 4, 4), generator=g)
    y[0, 0, 0, :2] = 255
    loss = BalancedBCELoss(pos_weight=pos_weight)(z, y)
    zn, yn = z.double().numpy().ravel(), y.numpy().ravel()
    valid = yn != 255
    w = pos_weight if pos_weight is not None else float((yn[valid] == 0).sum()) / valid.sum()
    s = _sigmoid(zn[valid])
    terms = -(w * (yn[valid] == 1) * np.log(s) + (1 - w) * (yn[valid] == 0) * np.log(1 - s))
    assert float(loss) == pytest.approx(terms.mean(), rel=1e-5)


def test_losses_without_valid_pixels_are_zero_with_grad() -> None:
    pred = torch.randn(1, 1, 2, 2, requires_grad=True)
    for loss, gt in [
        (DepthL1Loss(), torch.zeros(1, 1, 2, 2)),
        (BalancedBCELoss(0.95), torch.full((1, 1, 2, 2), 255)),
    ]:
        pred.grad = None
        value = loss(pred, gt)
        assert float(value.detach()) == 0.0 and value.requires_grad
        value.backward()
        assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_loss_input_errors() -> None:
    with pytest.raises(ValueError, match=r"labels \[7\] are outside \[0, 4\)"):
        PixelCrossEntropyLoss()(torch.randn(1, 4, 2, 2), torch.full((1, 1, 2, 2), 7))
    with pytest.raises(ValueError, match="pred must have 3 channels"):
        NormalsL1Loss()(torch.randn(1, 1, 2, 2), torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"labels \[3\] are not 0, 1 or ignore_index=255"):
        BalancedBCELoss()(torch.randn(1, 1, 2, 2), torch.full((1, 1, 2, 2), 3))
    with pytest.raises(ValueError, match="differ in batch or spatial size"):
        DepthL1Loss()(torch.randn(1, 1, 2, 2), torch.zeros(1, 1, 3, 2))
    with pytest.raises(ValueError, match="pos_weight"):
        BalancedBCELoss(pos_weight=2.0)


def _cross_entropy_float64(pred: Tensor, target: Tensor, num_classes: int) -> float:
    """Mean per-pixel cross-entropy over labels in [0, num_classes), a plain loop."""
    p, t = pred.detach().double().cpu().numpy(), target.cpu().numpy()
    total, count = 0.0, 0
    for b, y, x in np.ndindex(t.shape[0], t.shape[2], t.shape[3]):
        label = t[b, 0, y, x]
        if 0 <= label < num_classes:
            logits = p[b, :, y, x]
            total += math.log(np.exp(logits).sum()) - logits[label]
            count += 1
    return total / count


@pytest.mark.gpu
@requires_cuda
def test_gpu_label_check_is_deferred_without_sync() -> None:
    """On CUDA an unusable label does not stall the stream: forward and backward run
    with the sync debugger set to error, those pixels are ignored (float64 loop), and the
    error names the labels when the check is read (or at the loss's next call)."""
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(2, 4, 6, 7, generator=g).cuda().requires_grad_()
    target = torch.randint(0, 4, (2, 1, 6, 7), generator=g)
    target[0, 0, 0, :3] = 255
    target[1, 0, 2, 1], target[1, 0, 4, 4] = 7, 9
    loss = PixelCrossEntropyLoss()
    loss(pred, target.cuda()).backward()  # warm the pinned-memory cache
    loss.label_check._pending.clear()
    on_gpu = target.cuda()  # a copy from pageable memory: itself a synchronisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        value = loss(pred, on_gpu)
        value.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(value) == pytest.approx(_cross_entropy_float64(pred, target, 4), rel=1e-5)
    with pytest.raises(ValueError, match=r"labels in \[7, 9\] are outside \[0, 4\)"):
        raise_label_errors(loss)
    raise_label_errors(loss)  # read once: nothing left
    loss(pred, target.cuda())
    copied = copy.deepcopy(loss)  # a model copy (EMA, pickling) drops unread results
    raise_label_errors(copied)
    with pytest.raises(ValueError, match=r"labels in \[7, 9\]"):
        raise_label_errors(loss)

    loss(pred, target.cuda())
    torch.cuda.synchronize()
    good = target.clamp(max=3).cuda()
    with pytest.raises(ValueError, match=r"labels in \[7, 9\]"):
        loss(pred, good)  # the earlier batch's result has arrived: this call raises
    loss(pred, good)

    bce = BalancedBCELoss(0.95)
    edges = torch.randint(0, 2, (2, 1, 6, 7), generator=g)
    edges[0, 0, 3, 3] = 3
    bce(pred[:, :1], edges.cuda())
    with pytest.raises(ValueError, match=r"labels in \[3, 3\] are not 0, 1 or ignore_index"):
        raise_label_errors(bce)


def _head(task="semseg", num_classes=5, **kw) -> PUPHead:
    loss = {
        "semseg": dict(type="PixelCrossEntropyLoss"),
        "depth": dict(type="DepthL1Loss"),
        "normals": dict(type="NormalsL1Loss"),
        "edge": dict(type="BalancedBCELoss", pos_weight=0.95),
    }[task]
    return PUPHead(task, num_classes, loss, in_channels=8, channels=6, **kw)


def test_pup_head_matches_functional_reference() -> None:
    head = _head().eval()
    for m in head.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    tokens = torch.randn(2, 1 + 2 * 3, 8)
    out = head(tokens, (2, 3))
    assert out.shape == (2, 5, 32, 48)
    # reference with functional ops only, read from the head's parameters
    x = F.layer_norm(tokens[:, 1:], (8,), head.norm.weight, head.norm.bias, 1e-6)
    x = x.transpose(1, 2).reshape(2, 8, 2, 3)
    for i, cm in enumerate(head.convs):
        x = F.conv2d(x, cm.conv.weight, cm.conv.bias, padding=1)
        bn = cm.bn
        x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0, bn.eps)
        x = x.clamp(min=0)
        if i < 3:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    x = F.conv2d(x, head.conv_seg.weight, head.conv_seg.bias)
    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(out, x, atol=1e-5)
    assert head(tokens, (2, 3), out_size=(30, 40)).shape == (2, 5, 30, 40)


def test_pup_head_nearest_mode_equals_interpolate_nearest() -> None:
    """upsample_mode='nearest' (the FPGA form): every x2 step is F.interpolate nearest;
    an exact integer final resize is nearest too, any other stays bilinear; trains."""
    torch.manual_seed(0)
    head = _head(upsample_mode="nearest").eval()
    tokens = torch.randn(2, 1 + 2 * 3, 8)
    out, feats = head.forward_with_features(tokens, (2, 3))
    x = feats[-1]
    x = F.interpolate(head.conv_seg(x), scale_factor=2, mode="nearest")
    assert torch.equal(out, x)
    for i in range(3):  # stage i+1 sees the nearest x2 of stage i's output
        assert torch.equal(
            head.convs[i + 1](F.interpolate(feats[i], scale_factor=2, mode="nearest")),
            feats[i + 1],
        )
    big = head(tokens, (2, 3), out_size=(64, 96))
    assert torch.equal(big, F.interpolate(out, scale_factor=2, mode="nearest"))
    odd = head(tokens, (2, 3), out_size=(30, 40))
    assert torch.allclose(
        odd, F.interpolate(out, size=(30, 40), mode="bilinear", align_corners=False)
    )
    head.train()
    head(tokens.requires_grad_(True), (2, 3)).sum().backward()
    assert head.convs[0].conv.weight.grad is not None
    with pytest.raises(ValueError, match="upsample_mode"):
        _head(upsample_mode="bicubic")


def test_head_loss_reads_gt_field_from_data_sample() -> None:
    head = _head("depth", 1)
    logits = torch.randn(2, 1, 4, 4)
    samples = []
    for _ in range(2):
        ds = SegDataSample()
        ds.gt_depth_map = PixelData(data=torch.rand(1, 4, 4) + 0.5)
        samples.append(ds)
    losses = head.loss_by_feat(logits, samples)
    gt = torch.stack([s.gt_depth_map.data for s in samples])
    assert set(losses) == {"loss_depth"}
    assert float(losses["loss_depth"]) == pytest.approx(float((logits - gt).abs().mean()), rel=1e-6)
    with pytest.raises(KeyError, match="gt_sem_seg"):
        _head().loss_by_feat(torch.randn(2, 5, 4, 4), samples)


def test_predict_by_feat_crops_padding_resizes_and_postprocesses() -> None:
    meta = dict(img_shape=(6, 8), ori_shape=(12, 16), pad_shape=(8, 8))
    # semseg: valid area favours class 2, padding rows favour class 4
    logits = torch.zeros(1, 5, 8, 8)
    logits[0, 2, :6] = 5.0
    logits[0, 4, 6:] = 50.0
    pred = _head().predict_by_feat(logits, [meta])[0]
    assert pred.shape == (1, 12, 16) and pred.dtype == torch.long
    assert torch.all(pred == 2)
    depth = torch.full((1, 1, 8, 8), 2.5)
    depth[..., 6:, :] = 100.0
    d = _head("depth", 1).predict_by_feat(depth, [meta])[0]
    assert d.shape == (1, 12, 16) and torch.allclose(d, torch.full_like(d, 2.5))
    normals = torch.tensor([3.0, 0.0, 4.0]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    n = _head("normals", 3).predict_by_feat(normals, [meta])[0]
    assert n.shape == (3, 12, 16)
    assert torch.allclose(n[:, 5, 5], torch.tensor([0.6, 0.0, 0.8]), atol=1e-6)
    e = _head("edge", 1).predict_by_feat(torch.zeros(1, 1, 8, 8), [meta])[0]
    assert torch.allclose(e, torch.full((1, 12, 16), 0.5))


def test_predict_undoes_horizontal_flip_of_normals() -> None:
    meta = dict(img_shape=(2, 2), ori_shape=(2, 2), flip=True, flip_direction="horizontal")
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 0, :, 1] = 1.0  # right column, pointing +x in the flipped frame
    logits[0, 2, :, 0] = 1.0
    n = _head("normals", 3).predict_by_feat(logits, [meta])[0]
    # back in the original frame: that column is now on the left and points -x
    assert torch.allclose(n[:, 0, 0], torch.tensor([-1.0, 0.0, 0.0]))
    assert torch.allclose(n[:, 0, 1], torch.tensor([0.0, 0.0, 1.0]))


def test_output_kind_from_task_table_and_errors() -> None:
    assert default_output_kind("semseg", 40) == "argmax"
    assert default_output_kind("edge", 1) == "sigmoid"
    assert default_output_kind("normals", 3) == "normalize"
    assert default_output_kind("depth", 1) == "identity"
    with pytest.raises(KeyError, match="unknown task 'foo'"):
        PUPHead("foo", 1, dict(type="DepthL1Loss"))
    with pytest.raises(ValueError, match="num_classes=3"):
        _head("normals", 1)


def test_tam_group_weights_match_released_table() -> None:
    from mmseg_m3vit.models.decode_heads import tam_group_weights

    # the released code's hand-written cases for 2..5 tasks
    released = {
        2: [("G", 1), ("1-G", 1)],
        3: [("G", 1), ("1-G", 1 / 2), ("1-G", 1 / 2)],
        4: [("G", 1 / 2), ("G", 1 / 2), ("1-G", 1 / 2), ("1-G", 1 / 2)],
        5: [("G", 1 / 2), ("G", 1 / 2), ("1-G", 1 / 3), ("1-G", 1 / 3), ("1-G", 1 / 3)],
    }
    for t, expected in released.items():
        got = tam_group_weights(t)
        assert [w for w, _ in got] == [w for w, _ in expected]
        assert [s for _, s in got] == pytest.approx([s for _, s in expected])
    with pytest.raises(ValueError, match="at least two tasks"):
        tam_group_weights(1)


def test_tam_shapes_and_cross_task_dependence() -> None:
    from mmseg_m3vit.models.decode_heads import TaskAttentionModule

    tam = TaskAttentionModule(["a", "b", "c"], 6, {"a": 4, "b": 1, "c": 3}, channels=5).eval()
    feats = {k: torch.randn(2, 6, 6, 10) for k in "abc"}
    out = tam(feats)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "a": (2, 4, 6, 10),
        "b": (2, 1, 6, 10),
        "c": (2, 3, 6, 10),
    }
    # task a's auxiliary output depends on task c's features (cross-task fusion)
    feats2 = dict(feats, c=torch.randn(2, 6, 6, 10))
    assert not torch.allclose(tam(feats2)["a"], out["a"])
    with pytest.raises(ValueError, match=r"no features for tasks \['c'\]"):
        tam({"a": feats["a"], "b": feats["b"]})
