"""The float model one task's FPGA pathway is built from, through the plugin's public API.

The whole multi-task model is built from the config exactly as training builds it
(``MODELS.build(cfg.model)``), its checkpoint loaded strictly by the plugin's safe
loader (:func:`mmseg_m3vit.compat.load_model_checkpoint`: tensors and the globals of our
Runner's checkpoints only, unless trusted; keys and shapes must match; routers mapped by
task name), and the task's parts taken from it: ``.backbone`` (the ``M3ViT``) and
``.heads[task]`` (its ``PUPHead``); the Brevitas mirror reads each MoE layer's router for
the task through the router's ``task_gate_weight`` / ``task_logit_offset``
(:func:`finn_flow.quant_model.load_backbone`). Nothing is rebuilt by hand, so the pathway
is the model that was trained.

Shapes: images (1, 3, H, W) normalised; tokens (1, 1 + h*w, D); logits (1, C, H', W').
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class FloatPathway:
    """One task's parts of the float multi-task model (eval mode).

    Attributes:
        model: the whole ``MultiTaskSegmentor``.
        task: the task name.
        backbone: ``model.backbone`` (``M3ViT``).
        head: ``model.heads[task]`` (``PUPHead``).
        checkpoint: path of the loaded checkpoint, or None (random weights).
        meta: the checkpoint's ``meta`` dict (empty without a checkpoint).
    """

    model: nn.Module
    task: str
    checkpoint: str | None
    meta: dict = field(default_factory=dict)

    @property
    def backbone(self) -> nn.Module:
        """The ``M3ViT`` backbone."""
        return self.model.backbone

    @property
    def head(self) -> nn.Module:
        """The task's ``PUPHead``."""
        return self.model.heads[self.task]

    def moe_layers(self) -> list[nn.Module]:
        """The ``MoEFFN`` of every MoE block, in block order."""
        return [block.moe for block in self.backbone.blocks if block.is_moe]

    @torch.no_grad()
    def tokens(self, img: Tensor) -> Tensor:
        """img (1, 3, H, W) -> tokens (1, 1 + h*w, D) of the task's pathway."""
        return self.backbone(img, self.task).tokens

    @torch.no_grad()
    def logits(self, img: Tensor, out_hw: tuple[int, int]) -> Tensor:
        """img (1, 3, H, W) -> the head's logits (1, C, out_hw) NCHW."""
        out = self.backbone(img, self.task)
        return self.head(out.tokens, out.grid, out_hw)


def build_float_pathway(
    cfg: Any, task: str, checkpoint: str | None, seed: int, trust: bool | None = None
) -> FloatPathway:
    """Build ``cfg.model`` (eval mode), load ``checkpoint`` if given, pick ``task``'s parts.

    Args:
        cfg: mmengine config with ``model`` (a ``MultiTaskSegmentor``).
        task: one of the model's tasks.
        checkpoint: a checkpoint of the whole model, or None for random weights
            (``torch.manual_seed(seed)`` before building).
        seed: seed of the random initialisation.
        trust: unpickle the checkpoint without the allow-list (only for files you
            trust); None: the environment variable ``M3VIT_TRUST_CHECKPOINT`` decides.

    Raises:
        ValueError: ``task`` is not one of the model's tasks.
        UntrustedCheckpointError: the checkpoint holds objects outside the allow-list
            (names them, the file and how to opt in).
        CheckpointMismatchError: the checkpoint's keys or shapes differ from the model's.
    """
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    from mmseg_m3vit.compat import load_model_checkpoint

    init_default_scope(cfg.get("default_scope", "mmseg"))
    mcfg = copy.deepcopy(cfg.model)
    mcfg.backbone["pretrained"] = None  # the FPGA flow never loads ImageNet weights itself
    mcfg.backbone.pop("init_cfg", None)
    torch.manual_seed(seed)
    model = MODELS.build(mcfg).eval()
    if task not in model.heads:
        raise ValueError(f"unknown task {task!r}; the model's tasks are {list(model.heads)}")
    meta = {} if checkpoint is None else load_model_checkpoint(model, checkpoint, trust=trust)
    return FloatPathway(model.eval(), task, checkpoint, meta)
