"""Per-task dense losses (docs/model.md s. 3), registered in mmseg's MODELS.

Every loss has the same interface: ``loss(pred, target) -> scalar``, with ``pred`` the
head's raw output (B, C, H, W) and ``target`` the packed ground truth (B, Cg, H, W) of
the task table (C = 3 for normals, else 1), at the same H x W. Invalid pixels are
excluded from the average; when a batch has no valid pixel the loss is an exact 0 that
still depends on ``pred`` (so DDP sees every parameter used). Loss weights live in the
segmentor (``loss_weights``), not here. ``loss_name`` starts with ``loss_`` so mmengine
sums it.

Labels a loss cannot use (a class id outside the head's range, an edge target that is
neither 0, 1 nor ignore) raise a ``ValueError`` naming them. On the CPU it is raised at
once. On a GPU, reading the check's result would make the host wait for the whole
forward pass, and the backward's launches would then start on an idle device; so the
result travels to the host asynchronously (:class:`LabelCheck`), the pixels are ignored
for that batch, and the error is raised when ``train_step`` ends
(:func:`raise_label_errors`) or, at the latest, by the loss's next call.
"""

from __future__ import annotations

import math

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


class LabelCheck:
    """Unusable-label check of one loss that never blocks a CUDA stream.

    :meth:`submit` takes the batch's bool mask of unusable pixels. CPU tensors are
    checked at once. For CUDA tensors the smallest and largest unusable value are copied
    into pinned host memory behind an event; :meth:`raise_if_bad` reads every result
    whose event has completed (all of them, waiting, with ``wait=True``) and raises for
    the first bad one. ``submit`` first reads the earlier results that have arrived, so an
    error surfaces one batch late at worst even when nobody calls ``raise_if_bad``.
    """

    max_pending = 4  # results left unread before submit waits for the oldest

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._pending: list[tuple[Tensor, torch.cuda.Event, str]] = []

    def __getstate__(self) -> dict:
        """Copies and pickles leave unread results (CUDA events) behind."""
        return {"owner": self.owner, "_pending": []}

    def submit(self, bad: Tensor, target: Tensor, expected: str) -> None:
        """bad: bool, True where ``target`` (same shape) is unusable; ``expected`` ends the
        error message: "labels [...] are <expected>"."""
        self.raise_if_bad(wait=len(self._pending) >= self.max_pending)
        if not target.is_cuda:
            if bool(bad.any()):
                values = sorted(set(target[bad].tolist()))[:5]
                raise ValueError(f"{self.owner}: labels {values} are {expected}")
            return
        if target.numel() == 0:
            return
        values = target.float()
        extremes = torch.stack(
            [
                torch.where(bad, values, math.inf).amin(),
                torch.where(bad, values, -math.inf).amax(),
            ]
        )
        host = torch.empty(2, dtype=torch.float32, pin_memory=True)
        host.copy_(extremes, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((host, event, expected))

    def raise_if_bad(self, wait: bool = True) -> None:
        """Read the results of earlier CUDA batches (those that have arrived unless
        ``wait``) and raise ``ValueError`` for the first that had unusable labels."""
        while self._pending:
            host, event, expected = self._pending[0]
            if not wait and not event.query():
                return
            event.synchronize()
            self._pending.pop(0)
            low, high = host.tolist()
            if low != math.inf:  # some pixel was unusable (a NaN label makes low NaN)
                self._pending.clear()
                raise ValueError(
                    f"{self.owner}: labels in [{low:g}, {high:g}] are {expected} "
                    "(a GPU batch: its step ignored those pixels)"
                )


def raise_label_errors(module: nn.Module) -> None:
    """Raise the unusable-label error of any loss inside ``module`` whose GPU check has
    not been read yet (waits for those checks only, not for the rest of the stream)."""
    for m in module.modules():
        check = getattr(m, "label_check", None)
        if isinstance(check, LabelCheck):
            check.raise_if_bad(wait=True)


@MODELS.register_module()
class PixelCrossEntropyLoss(nn.Module):
    """Per-pixel softmax cross-entropy, mean over pixels whose label != ``ignore_index``.

    pred (B, K, H, W) logits; target (B, 1, H, W) integer labels in [0, K) or ignore.
    """

    def __init__(self, ignore_index: int = 255, loss_name: str = "loss_ce") -> None:
        super().__init__()
        self.ignore_index, self.loss_name = ignore_index, loss_name
        self.label_check = LabelCheck(type(self).__name__)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        _check(pred, target, type(self).__name__, None, 1)
        num_classes = pred.shape[1]
        target = target[:, 0].long()
        kept = target != self.ignore_index
        valid = kept & (target >= 0) & (target < num_classes)
        self.label_check.submit(
            kept & ~valid,
            target,
            f"outside [0, {num_classes}) and not ignore_index={self.ignore_index}",
        )
        per_pixel = F.cross_entropy(pred.float(), torch.where(valid, target, 0), reduction="none")
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
        self.label_check = LabelCheck(type(self).__name__)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        _check(pred, target, type(self).__name__, 1, 1)
        kept = target != self.ignore_index
        positive, negative = kept & (target == 1), kept & (target == 0)
        valid = positive | negative
        self.label_check.submit(
            kept & ~valid, target, f"not 0, 1 or ignore_index={self.ignore_index}"
        )
        y = positive.float()
        if self.pos_weight is None:
            n_valid = valid.sum().clamp(min=1)
            w: Tensor | float = (negative.sum() / n_valid).float()
        else:
            w = self.pos_weight  # a Python number: a device tensor would be a blocking copy
        z = pred.float()
        per_pixel = -(w * y * F.logsigmoid(z) + (1 - w) * (1 - y) * F.logsigmoid(-z))
        return _masked_mean(per_pixel, valid)
