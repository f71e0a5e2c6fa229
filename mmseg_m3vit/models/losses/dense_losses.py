"""Per-task dense losses (docs/model.md s. 3), registered in mmseg's MODELS.

Every loss has the same interface: ``loss(pred, target) -> scalar``, with ``pred`` the
head's raw output (B, C, H, W) and ``target`` the packed ground truth (B, Cg, H, W) of
the task table (C = 3 for normals, else 1), at the same H x W. Invalid pixels are
excluded from the average; when a batch has no valid pixel the loss is an exact 0 that
still depends on ``pred`` (so DDP sees every parameter used). Loss weights live in the
segmentor (``loss_weights``), not here. ``loss_name`` starts with ``loss_`` so mmengine
sums it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mmseg.registry import MODELS
from torch import Tensor, nn


def _check(pred: Tensor, target: Tensor, name: str, pred_c: int | None, target_c: int) -> None:
    if pred.dim() != 4 or target.dim() != 4:
        raise ValueError(
            f"{name}: pred and target must be (B, C, H, W), got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    if pred.shape[0] != target.shape[0] or pred.shape[-2:] != target.shape[-2:]:
        raise ValueError(
            f"{name}: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in "
            "batch or spatial size"
        )
    if pred_c is not None and pred.shape[1] != pred_c:
        raise ValueError(f"{name}: pred must have {pred_c} channels, got {pred.shape[1]}")
    if target.shape[1] != target_c:
        raise ValueError(f"{name}: target must have {target_c} channels, got {target.shape[1]}")


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the bool ``mask``; 0 when nothing is valid (masked-out
    values are selected away, not multiplied by 0). No host synchronisation."""
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


@MODELS.register_module()
class PixelCrossEntropyLoss(nn.Module):
    """Per-pixel softmax cross-entropy, mean over pixels whose label != ``ignore_index``.

    pred (B, K, H, W) logits; target (B, 1, H, W) integer labels in [0, K) or ignore.
    """

    def __init__(self, ignore_index: int = 255, loss_name: str = "loss_ce") -> None:
        super().__init__()
        self.ignore_index, self.loss_name = ignore_index, loss_name

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        _check(pred, target, type(self).__name__, None, 1)
        target = target[:, 0].long()
        valid = target != self.ignore_index
        bad = valid & ((target < 0) | (target >= pred.shape[1]))
        if bool(bad.any()):
            raise ValueError(
                f"{type(self).__name__}: labels {sorted(set(target[bad].tolist()))[:5]} are "
                f"outside [0, {pred.shape[1]}) and not ignore_index={self.ignore_index}"
            )
        per_pixel = F.cross_entropy(
            pred.float(), target, ignore_index=self.ignore_index, reduction="none"
        )
        return _masked_mean(per_pixel, valid)


@MODELS.register_module()
class DepthL1Loss(nn.Module):
    """L1 between predicted and true depth (metres) over valid pixels (gt > 0, finite).

    pred (B, 1, H, W); target (B, 1, H, W) float, 0 = invalid.
    """

    def __init__(self, loss_name: str = "loss_depth") -> None:
        super().__init__()
        self.loss_name = loss_name

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        _check(pred, target, type(self).__name__, 1, 1)
        target = target.float()
        valid = (target > 0) & torch.isfinite(target)
        diff = (pred.float() - torch.where(valid, target, torch.zeros_like(target))).abs()
        return _masked_mean(diff, valid)


@MODELS.register_module()
class NormalsL1Loss(nn.Module):
    """L1 between the L2-normalised prediction and the GT unit normals.

    pred (B, 3, H, W) raw vectors (normalised here along C, eps 1e-12); target (B, 3, H, W),
    an all-zero vector marks an invalid pixel. Mean over valid pixels x 3 components.
    """

    def __init__(self, loss_name: str = "loss_normals") -> None:
        super().__init__()
        self.loss_name = loss_name

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        _check(pred, target, type(self).__name__, 3, 3)
        target = target.float()
        unit = F.normalize(pred.float(), p=2, dim=1, eps=1e-12)
        valid = (target.abs().sum(dim=1, keepdim=True) > 0).expand_as(target)
        return _masked_mean((unit - target).abs(), valid)


@MODELS.register_module()
class BalancedBCELoss(nn.Module):
    """Binary cross-entropy on logits with weight w on positives and 1 - w on negatives.

    ``loss = sum_valid -(w y log s(z) + (1 - w)(1 - y) log(1 - s(z))) / n_valid``.
    With ``pos_weight=None`` (saliency) w is class-balanced per batch: the fraction of
    negatives among valid pixels. Edge uses the fixed ``pos_weight=0.95``.
    pred (B, 1, H, W) logits; target (B, 1, H, W) in {0, 1} or ``ignore_index``.
    """

    def __init__(
        self, pos_weight: float | None = None, ignore_index: int = 255, loss_name: str = "loss_bce"
    ) -> None:
        super().__init__()
        if pos_weight is not None and not 0.0 <= pos_weight <= 1.0:
            raise ValueError(f"pos_weight must be in [0, 1] or None, got {pos_weight}")
        self.pos_weight, self.ignore_index, self.loss_name = pos_weight, ignore_index, loss_name

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        _check(pred, target, type(self).__name__, 1, 1)
        valid = target != self.ignore_index
        bad = valid & (target != 0) & (target != 1)
        if bool(bad.any()):
            raise ValueError(
                f"{type(self).__name__}: targets must be 0, 1 or ignore_index="
                f"{self.ignore_index}, got {sorted(set(target[bad].tolist()))[:5]}"
            )
        y = (target == 1).float()
        if self.pos_weight is None:
            n_valid = valid.sum().clamp(min=1)
            w = ((valid & (target == 0)).sum() / n_valid).float()
        else:
            w = torch.tensor(self.pos_weight, device=pred.device)
        z = pred.float()
        per_pixel = -(w * y * F.logsigmoid(z) + (1 - w) * (1 - y) * F.logsigmoid(-z))
        return _masked_mean(per_pixel, valid)
