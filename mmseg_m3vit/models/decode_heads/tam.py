"""Training-only cross-task attention module (TAM), an optional ablation (docs/model.md s. 2).

The released M3ViT configs attach TAMs to intermediate PUP-head features. A TAM fuses
the T tasks' features of one level and predicts every task again from the fused map;
those auxiliary predictions only add training losses. Inference never runs it, so
single-task inference is unchanged. Structure (C = head channels, per level):

1. balance gate ``G = sigmoid(BN(conv3x3(ReLU(BN(conv3x3(concat_t F_t))))))`` (C ch.);
2. tasks split in two groups, the first ``floor(T/2)`` and the rest; a task of the
   first group is scaled by ``G / |group1|``, of the second by ``(1 - G) / |group2|``
   (for T = 2..5 this is the released code's table); concat -> conv3x3+BN+ReLU;
3. spatial mask ``M``: two stride-2 conv3x3+BN+ReLU, two stride-2 transposed convs (BN,
   ReLU between, sigmoid last), resized to the feature size if the size is not a
   multiple of 4;
4. ``concat_t F_t * (1 + M)`` -> per task conv3x3 (-> ``channels``)+BN+ReLU -> conv1x1
   (-> the task's output channels).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule, build_norm_layer
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import Tensor, nn

from ..task_order import TaskNamesMixin, attach_task_names


def tam_group_weights(num_tasks: int) -> list[tuple[str, float]]:
    """Per task: which gate it uses ('G' or '1-G') and its divisor's inverse.

    The first ``floor(T/2)`` tasks (at least one) use ``G / n1``, the others
    ``(1 - G) / n2``.
    """
    if num_tasks < 2:
        raise ValueError(f"TAM needs at least two tasks, got {num_tasks}")
    n1 = max(num_tasks // 2, 1)
    n2 = num_tasks - n1
    return [("G", 1.0 / n1)] * n1 + [("1-G", 1.0 / n2)] * n2


@MODELS.register_module()
class TaskAttentionModule(TaskNamesMixin, BaseModule):
    """Cross-task fusion of one level of head features, producing auxiliary logits.

    The task order fixes the concatenation and the G / 1-G groups, so the task names are
    saved with the weights and a state dict of another task order fails to load
    (:mod:`..task_order`).

    Args:
        tasks: task names, in the order used for concatenation.
        in_channels: C, channels of every task's feature map at this level.
        num_classes: ``{task: output channels}``.
        channels: hidden channels of the per-task output branch (256).
        norm_cfg: norm of every conv (BN; SyncBN in distributed configs).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        in_channels: int,
        num_classes: dict[str, int],
        channels: int = 256,
        norm_cfg: dict | None = None,
        init_cfg: dict | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        self.tasks = list(tasks)
        self.weights = tam_group_weights(len(self.tasks))
        missing = [t for t in self.tasks if t not in num_classes]
        if missing:
            raise ValueError(f"TaskAttentionModule: num_classes lacks tasks {missing}")
        norm_cfg = norm_cfg or dict(type="BN", requires_grad=True)
        t, c = len(self.tasks), in_channels

        def conv(cin, cout, act=True, stride=1):
            return ConvModule(
                cin,
                cout,
                3,
                stride=stride,
                padding=1,
                norm_cfg=norm_cfg,
                act_cfg=dict(type="ReLU") if act else None,
            )

        self.gate = nn.Sequential(conv(t * c, c), conv(c, c, act=False))
        self.fuse = conv(t * c, c)
        self.encoder = nn.Sequential(conv(c, c, stride=2), conv(c, c, stride=2))
        self.decoder0 = nn.ConvTranspose2d(c, c, 3, stride=2, padding=1, output_padding=1)
        self.decoder0_norm = build_norm_layer(norm_cfg, c)[1]
        self.decoder1 = nn.ConvTranspose2d(c, c, 3, stride=2, padding=1, output_padding=1)
        self.decoder1_norm = build_norm_layer(norm_cfg, c)[1]
        self.out_convs = nn.ModuleDict({k: conv(t * c, channels) for k in self.tasks})
        self.out_cls = nn.ModuleDict(
            {k: nn.Conv2d(channels, num_classes[k], 1) for k in self.tasks}
        )
        attach_task_names(self)

    #: the order cannot be remapped by permuting rows: loading another order fails
    mappable = False

    def task_indexed_parameters(self) -> dict[str, int]:
        """No row-per-task parameters (the order is checked, never mapped)."""
        return {}

    def forward(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{task: (B, C, H, W)}`` -> auxiliary logits ``{task: (B, K_task, H, W)}``."""
        missing = [t for t in self.tasks if t not in feats]
        if missing:
            raise ValueError(f"TaskAttentionModule: no features for tasks {missing}")
        xs = [feats[t] for t in self.tasks]
        g = torch.sigmoid(self.gate(torch.cat(xs, dim=1)))
        scaled = [
            x * (g if which == "G" else 1 - g) * scale
            for x, (which, scale) in zip(xs, self.weights)
        ]
        fb = self.encoder(self.fuse(torch.cat(scaled, dim=1)))
        fb = F.relu(self.decoder0_norm(self.decoder0(fb)))
        mask = torch.sigmoid(self.decoder1_norm(self.decoder1(fb)))
        if mask.shape[-2:] != xs[0].shape[-2:]:
            mask = F.interpolate(mask, size=xs[0].shape[-2:], mode="bilinear", align_corners=False)
        fused = torch.cat([x * (1 + mask) for x in xs], dim=1)
        return {t: self.out_cls[t](self.out_convs[t](fused)) for t in self.tasks}
