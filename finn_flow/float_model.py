"""The float model one task's FPGA pathway is built from, through the plugin's public API.

The whole multi-task model is built from the config exactly as training builds it
(``MODELS.build(cfg.model)``), its checkpoint loaded strictly by
:func:`load_checkpoint_weights`, and the task's parts taken from it: ``.backbone`` (the
``M3ViT``), ``.heads[task]`` (its ``PUPHead``) and, per MoE layer, the router's
:meth:`task_gate_weight` / :meth:`task_logit_offset` for the task. Nothing is rebuilt by
hand, so the pathway is the model that was trained.

Shapes: images (1, 3, H, W) normalised; tokens (1, 1 + h*w, D); logits (1, C, H', W').
"""

from __future__ import annotations

import copy
import os
import pickle
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

#: Environment variable that opts in to unpickling arbitrary objects from checkpoints.
TRUST_ENV = "M3VIT_TRUST_CHECKPOINT"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and the reason."""


@dataclass
class FloatPathway:
    """One task's parts of the float multi-task model (eval mode).

    Attributes:
        model: the whole ``MultiTaskSegmentor``.
        task: the task name; ``task_index``: its index in ``model.backbone.tasks``.
        backbone: ``model.backbone`` (``M3ViT``).
        head: ``model.heads[task]`` (``PUPHead``).
        checkpoint: path of the loaded checkpoint, or None (random weights).
        meta: the checkpoint's ``meta`` dict (empty without a checkpoint).
    """

    model: nn.Module
    task: str
    task_index: int
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

    @property
    def random_weights(self) -> bool:
        """True when no checkpoint was loaded."""
        return self.checkpoint is None

    def moe_layers(self) -> list[nn.Module]:
        """The ``MoEFFN`` of every MoE block, in block order."""
        return [block.moe for block in self.backbone.blocks if block.is_moe]

    def gate_weights(self) -> list[tuple[Tensor, Tensor]]:
        """Per MoE layer, the task's router as ``(weight (D, E), offset (E,))``:
        ``logits = tokens @ weight + offset``."""
        t = self.task_index
        return [
            (moe.router.task_gate_weight(t), moe.router.task_logit_offset(t))
            for moe in self.moe_layers()
        ]

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
        trust: allow arbitrary pickled objects in the checkpoint (see
            :func:`load_checkpoint_weights`).

    Raises:
        ValueError: ``task`` is not one of the model's tasks.
        CheckpointError: the checkpoint is refused or does not fit the model.
    """
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    import mmseg_m3vit  # noqa: F401  (registers the models)

    init_default_scope(cfg.get("default_scope", "mmseg"))
    mcfg = copy.deepcopy(cfg.model)
    mcfg.backbone["pretrained"] = None  # the FPGA flow never loads ImageNet weights itself
    mcfg.backbone.pop("init_cfg", None)
    torch.manual_seed(seed)
    model = MODELS.build(mcfg).eval()
    if task not in model.heads:
        raise ValueError(f"unknown task {task!r}; the model's tasks are {list(model.heads)}")
    meta = {} if checkpoint is None else load_checkpoint_weights(model, checkpoint, trust)
    tasks = list(model.backbone.tasks)
    index = tasks.index(task) if task in tasks else 0  # shared router: no task list
    return FloatPathway(model.eval(), task, index, checkpoint, meta)


def load_checkpoint_weights(model: nn.Module, filename: str, trust: bool | None = None) -> dict:
    """Load a whole-model checkpoint into ``model`` strictly; returns its ``meta`` dict.

    The file is read with ``torch.load(weights_only=True)`` (tensors and plain
    containers only) unless ``trust`` is True (``None``: the environment variable
    ``M3VIT_TRUST_CHECKPOINT=1`` decides). Every tensor of the model must be in
    ``state_dict`` with its shape, and nothing else.

    Raises:
        CheckpointError: the file is refused (names the unsafe global and how to opt in)
            or does not fit (names the first missing / unexpected / mis-shaped keys).
    """
    if trust is None:
        trust = os.environ.get(TRUST_ENV, "") == "1"
    try:
        ckpt = torch.load(filename, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {filename!r} holds objects other than tensors and was not loaded "
            f"({str(err).splitlines()[0]}); if you trust the file, pass --trust-checkpoint "
            f"or set {TRUST_ENV}=1"
        ) from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {filename!r} holds no state dict of tensors")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    for what, keys in (("lacks", missing), ("has unexpected", unexpected), ("mis-shapes", shapes)):
        if keys:
            more = f" (and {len(keys) - 5} more)" if len(keys) > 5 else ""
            raise CheckpointError(
                f"checkpoint {filename!r} {what} keys of the config's model: {keys[:5]}{more}"
            )
    model.load_state_dict(state, strict=True)
    meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}
