"""SETR progressive-upsampling (PUP) head for one task (docs/model.md s. 2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from torch import Tensor, nn

from ...tasks import get_task
from ..fast_layer_norm import layer_norm_autocast
from .conv_fold import fold_conv_bn_relu
from .upsample import upsample2x

OUTPUT_KINDS = ("argmax", "sigmoid", "normalize", "identity")

#: :class:`PUPHead`'s ``upsample_mode`` values.
UPSAMPLE_MODES = ("bilinear", "nearest")


def default_output_kind(task: str, num_classes: int) -> str:
    """How raw outputs become predictions, from the task table.

    Label tasks with several classes: 'argmax' (long ids); binary label tasks (edge,
    saliency): 'sigmoid' (probabilities); 3-channel maps (normals): 'normalize' (unit
    vectors); other maps (depth): 'identity'.
    """
    spec = get_task(task)
    if spec.is_label:
        return "argmax" if num_classes > 1 else "sigmoid"
    return "normalize" if spec.map_channels == 3 else "identity"


@MODELS.register_module()
class PUPHead(BaseModule):
    """Drop CLS -> LayerNorm -> (h, w) map -> [conv3x3+BN+ReLU, x2 up] x num_up ->
    conv3x3+BN+ReLU -> conv1x1 -> x2 up -> bilinear resize to the input size.

    Under CUDA autocast the LayerNorm writes the autocast dtype directly, in training
    too (:mod:`..fast_layer_norm`), and so do the x2 steps between convs
    (:mod:`.upsample`); inference (eval, no autograd) also runs each conv + BN + ReLU
    as one conv with the BN folded in (:mod:`.conv_fold`). All are chosen
    automatically.

    API as mmseg's decode heads: :meth:`forward` (features -> logits), :meth:`loss`
    / :meth:`loss_by_feat` (ground truth read from ``SegDataSample.<gt_field>`` of the
    task table), :meth:`predict` / :meth:`predict_by_feat` (processed maps at the
    original image size).

    Args:
        task: task name (a key of :data:`mmseg_m3vit.tasks.TASK_SPECS`).
        num_classes: output channels C (semseg 40/21, parts 7, depth/edge/sal 1, normals 3).
        in_channels: token dims D.
        channels: conv channels (256).
        num_up: conv + x2-upsampling stages before the last conv (3: 4 x2 steps = 16x).
        loss_decode: config of the task loss (``loss(pred, target) -> scalar``, see
            :mod:`mmseg_m3vit.models.losses`).
        norm_cfg: norm of the conv modules (BN; SyncBN in distributed configs).
        output_kind: how :meth:`predict_by_feat` post-processes (default from the task
            table, see :func:`default_output_kind`).
        align_corners: of every bilinear resize.
        upsample_mode: 'bilinear' (default, the paper's head) or 'nearest': the fixed x2
            steps of :meth:`forward` (and its final resize when that is an exact integer
            factor) use nearest-neighbour upsampling, the form FINN can stream
            (``UpsampleNearestNeighbour``; configs/fpga). Resizes to ground-truth or
            original image sizes stay bilinear.
    """

    def __init__(
        self,
        task: str,
        num_classes: int,
        loss_decode: dict,
        in_channels: int = 384,
        channels: int = 256,
        num_up: int = 3,
        norm_cfg: dict | None = None,
        output_kind: str | None = None,
        align_corners: bool = False,
        upsample_mode: str = "bilinear",
        init_cfg: dict | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        self.spec = get_task(task)
        self.task = task
        if num_classes < 1:
            raise ValueError(f"PUPHead({task}): num_classes must be >= 1, got {num_classes}")
        if self.spec.map_channels == 3 and num_classes != 3:
            raise ValueError(f"PUPHead({task}): needs num_classes=3, got {num_classes}")
        self.num_classes, self.align_corners = num_classes, align_corners
        if upsample_mode not in UPSAMPLE_MODES:
            raise ValueError(
                f"PUPHead({task}): unknown upsample_mode {upsample_mode!r}; "
                f"choose one of {list(UPSAMPLE_MODES)}"
            )
        self.upsample_mode = upsample_mode
        self.output_kind = output_kind or default_output_kind(task, num_classes)
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(
                f"PUPHead({task}): unknown output_kind {self.output_kind!r}; "
                f"choose one of {list(OUTPUT_KINDS)}"
            )
        norm_cfg = norm_cfg or dict(type="BN", requires_grad=True)
        self.norm = nn.LayerNorm(in_channels, eps=1e-6)
        convs = []
        for i in range(num_up + 1):
            convs.append(
                ConvModule(
                    in_channels if i == 0 else channels,
                    channels,
                    3,
                    padding=1,
                    norm_cfg=norm_cfg,
                    act_cfg=dict(type="ReLU"),
                )
            )
        self.convs = nn.ModuleList(convs)
        self.num_up, self.channels = num_up, channels
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.loss_decode = MODELS.build(loss_decode)
        if not getattr(self.loss_decode, "loss_name", "").startswith("loss"):
            raise ValueError(
                f"PUPHead({task}): loss_decode {loss_decode} needs a loss_name starting "
                "with 'loss' (mmengine only sums such keys)"
            )

    def forward(
        self, tokens: Tensor, grid: Sequence[int], out_size: Sequence[int] | None = None
    ) -> Tensor:
        """tokens (B, 1+N, D) with N = h*w -> logits (B, C, H, W).

        H, W = ``out_size`` (the padded input size), default 16 h x 16 w.
        """
        return self.forward_with_features(tokens, grid, out_size)[0]

    def forward_with_features(
        self, tokens: Tensor, grid: Sequence[int], out_size: Sequence[int] | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """As :meth:`forward`, also returning the output of every conv stage.

        Stage i (0..num_up) has shape (B, channels, h * 2^i, w * 2^i) (before its
        upsampling); used by the optional training-only TAM.
        """
        b, n, d = tokens.shape
        h, w = grid
        if n != 1 + h * w:
            raise ValueError(f"PUPHead({self.task}): {n} tokens do not match 1 + {h}x{w}")
        x = layer_norm_autocast(self.norm, tokens[:, 1:])  # autocast on CUDA
        x = self.norm(tokens[:, 1:]) if x is None else x
        x = x.transpose(1, 2).reshape(b, d, h, w)
        feats = []
        for i, conv in enumerate(self.convs):
            y = fold_conv_bn_relu(conv, x)  # eval + autocast on CUDA: BN folded
            x = conv(x) if y is None else y
            feats.append(x)
            if i < self.num_up:  # feeds the next conv only
                x = self._up_step(x, 2, feeds_autocast=True)
        x = self._up_step(self.conv_seg(x), 2)
        if out_size is not None and tuple(x.shape[-2:]) != tuple(out_size):
            out_size = tuple(out_size)
            fh, fw = out_size[0] // x.shape[-2], out_size[1] // x.shape[-1]
            exact = (fh * x.shape[-2], fw * x.shape[-1]) == out_size
            if self.upsample_mode == "nearest" and exact:
                x = F.interpolate(x, scale_factor=(fh, fw), mode="nearest")
            else:
                x = self._up(x, size=out_size)
        return x, feats

    def _up_step(self, x: Tensor, scale: int, feeds_autocast: bool = False) -> Tensor:
        """One fixed upsampling step of the head, in ``upsample_mode``;
        ``feeds_autocast``: the result only feeds a conv (see :func:`.upsample2x`)."""
        if self.upsample_mode == "nearest":
            return F.interpolate(x, scale_factor=scale, mode="nearest")
        return self._up(x, scale=scale, feeds_autocast=feeds_autocast)

    def _up(
        self,
        x: Tensor,
        scale: int | None = None,
        size: tuple[int, int] | None = None,
        feeds_autocast: bool = False,
    ) -> Tensor:
        if scale == 2 and size is None and not self.align_corners:
            return upsample2x(x, feeds_autocast=feeds_autocast)
        return F.interpolate(
            x, size=size, scale_factor=scale, mode="bilinear", align_corners=self.align_corners
        )

    # ------------------------------------------------------------------ training
    def stack_gt(self, batch_data_samples: Sequence[SegDataSample]) -> Tensor:
        """Stack ``data_sample.<gt_field>.data`` into (B, Cg, H, W)."""
        field = self.spec.gt_field
        maps = []
        for i, ds in enumerate(batch_data_samples):
            if field not in ds:
                raise KeyError(
                    f"PUPHead({self.task}): data sample {i} has no {field!r} (fields: "
                    f"{sorted(ds.keys())}); was the task's annotation loaded and packed?"
                )
            maps.append(ds.get(field).data)
        return torch.stack(maps)

    def loss(
        self, tokens: Tensor, grid: Sequence[int], batch_data_samples: Sequence[SegDataSample]
    ) -> dict[str, Tensor]:
        """Forward and loss: returns ``{loss_name: scalar}``."""
        return self.loss_by_feat(self.forward(tokens, grid), batch_data_samples)

    def loss_by_feat(
        self, logits: Tensor, batch_data_samples: Sequence[SegDataSample]
    ) -> dict[str, Tensor]:
        """Loss of ``logits`` (B, C, H, W) against the packed ground truth.

        Logits are resized bilinearly to the ground-truth size when they differ.
        """
        gt = self.stack_gt(batch_data_samples).to(logits.device)
        if logits.shape[-2:] != gt.shape[-2:]:
            logits = self._up(logits, size=tuple(gt.shape[-2:]))
        return {self.loss_decode.loss_name: self.loss_decode(logits, gt)}

    # ------------------------------------------------------------------ inference
    def predict(
        self, tokens: Tensor, grid: Sequence[int], batch_img_metas: Sequence[dict]
    ) -> list[Tensor]:
        """Forward and :meth:`predict_by_feat`."""
        return self.predict_by_feat(self.forward(tokens, grid), batch_img_metas)

    def predict_by_feat(self, logits: Tensor, batch_img_metas: Sequence[dict]) -> list[Tensor]:
        """Per image: crop the padding (``img_shape``), undo a test-time flip, resize to
        ``ori_shape`` and post-process per ``output_kind``.

        Returns one tensor per image of shape (1, H, W) (long ids for 'argmax', else
        float) or (3, H, W) unit vectors for 'normalize', with H, W = ``ori_shape``.
        """
        out = []
        for i, meta in enumerate(batch_img_metas):
            x = logits[i : i + 1]
            img_h, img_w = meta.get("img_shape", x.shape[-2:])[:2]
            x = x[..., :img_h, :img_w]
            if meta.get("flip", False):
                direction = meta.get("flip_direction", "horizontal")
                if direction not in ("horizontal", "vertical"):
                    raise ValueError(f"PUPHead({self.task}): cannot undo flip {direction!r}")
                dim = -1 if direction == "horizontal" else -2
                x = x.flip(dim)
                if self.output_kind == "normalize":
                    comp = 0 if direction == "horizontal" else 1
                    sign = torch.ones(3, device=x.device, dtype=x.dtype)
                    sign[comp] = -1
                    x = x * sign[None, :, None, None]
            ori = tuple(meta.get("ori_shape", (img_h, img_w))[:2])
            if tuple(x.shape[-2:]) != ori:
                x = self._up(x, size=ori)
            x = x[0]
            if self.output_kind == "argmax":
                x = x.argmax(dim=0, keepdim=True)
            elif self.output_kind == "sigmoid":
                x = x.float().sigmoid()
            elif self.output_kind == "normalize":
                x = F.normalize(x.float(), p=2, dim=0, eps=1e-12)
            else:
                x = x.float()
            out.append(x)
        return out
