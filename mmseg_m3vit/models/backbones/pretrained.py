"""Initialising an :class:`~.m3vit.M3ViT` from ImageNet ViT / DeiT weights (timm layout).

The backbone's parameter names follow timm's ViT, so dense tensors load by name. What
differs is handled here: the position embeddings are resized to the backbone's grid, a
distillation token is dropped, and MoE blocks build their experts from the dense MLP
(``expert_init``). Routers and task heads have no ImageNet counterpart and keep their
random init; everything else must come from the file, or loading fails.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from mmengine.logging import print_log
from torch import Tensor

from ...compat.checkpoint import SHOWN, extract_state_dict, load_checkpoint_file
from ..task_order import EXTRA_STATE

if TYPE_CHECKING:
    from .m3vit import M3ViT


def load_timm_checkpoint(
    backbone: M3ViT, path: str, trust: bool | None = None
) -> dict[str, list[str]]:
    """Load a timm-layout ViT/DeiT checkpoint file into ``backbone`` and log what was
    left out (see :func:`load_timm_state_dict`).

    The file may hold the state dict itself, or under ``'model'`` (DeiT releases) or
    ``'state_dict'``; it is read with
    :func:`~mmseg_m3vit.compat.checkpoint.load_checkpoint_file` (safe unpickling;
    ``trust`` as there).

    Returns:
        ``{'missing': [...], 'unexpected': [...]}`` key lists.

    Raises:
        FileNotFoundError: naming the path.
        ValueError: see :func:`load_timm_state_dict`.
    """
    try:
        ckpt = load_checkpoint_file(path, map_location="cpu", trust=trust)
    except FileNotFoundError:
        raise FileNotFoundError(f"pretrained checkpoint {path!r} does not exist") from None
    report = load_timm_state_dict(backbone, extract_state_dict(ckpt, path), source=path)
    print_log(
        f"M3ViT: loaded {path} (expert_init={backbone.expert_init}); "
        f"not in checkpoint: {len(report['missing'])} tensors (routers"
        f"{', experts' if backbone.expert_init == 'random' else ''}), "
        f"ignored: {report['unexpected']}",
        logger="current",
    )
    return report


def _may_stay_random(backbone: M3ViT, key: str) -> bool:
    """Tensors with no ImageNet counterpart: routers, task names, experts ('random')."""
    if ".router." in key or key.endswith(EXTRA_STATE):
        return True
    return backbone.expert_init == "random" and ".moe." in key


@torch.no_grad()
def load_timm_state_dict(
    backbone: M3ViT, state_dict: dict[str, Tensor], source: str = "the state dict"
) -> dict[str, list[str]]:
    """Copy timm ViT weights into ``backbone``; returns ``{'missing', 'unexpected'}``.

    ``pos_embed`` is resized bilinearly from its (square) grid to the backbone's grid,
    CLS kept apart (a distillation token, if any, is dropped). Dense blocks copy
    ``mlp.fc1/fc2``; MoE blocks build their experts from them per ``expert_init``
    (:func:`split_dense_mlp`). Head / final-norm weights are ignored.

    Raises:
        ValueError: a shape mismatch (naming the tensor and both shapes), or a backbone
            tensor other than routers (and experts with ``expert_init='random'``) that
            the file lacks: the first few are named (an empty or unrelated file fails).
    """
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    new: dict[str, Tensor] = {}
    used: set[str] = set()
    if "pos_embed" in sd:
        pe = sd["pos_embed"]
        n = pe.shape[1]
        side = math.isqrt(n - 1)
        prefix = n - side * side
        if prefix not in (1, 2) or pe.shape[-1] != backbone.embed_dims:
            raise ValueError(
                f"{source}: pos_embed of shape {tuple(pe.shape)} is not a square grid plus "
                f"CLS with D={backbone.embed_dims}"
            )
        from .m3vit import resize_pos_embed

        pe = torch.cat([pe[:, :1], pe[:, prefix:]], dim=1)
        new["pos_embed"] = resize_pos_embed(pe, (side, side), backbone.pos_grid)
        used.add("pos_embed")
    own = backbone.state_dict()
    for i, block in enumerate(backbone.blocks):
        if not block.is_moe:
            continue
        keys = [f"blocks.{i}.mlp.fc{j}.{t}" for j in (1, 2) for t in ("weight", "bias")]
        if not all(k in sd for k in keys):
            continue
        used.update(keys)
        if backbone.expert_init == "random":
            continue
        new.update(split_dense_mlp(backbone, i, *(sd[k] for k in keys)))
    for k, v in sd.items():
        if k in own and k not in new and k not in used and not k.endswith(EXTRA_STATE):
            new[k] = v
            used.add(k)
    for k, v in new.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{source}: tensor {k!r} has shape {tuple(v.shape)}, "
                f"model expects {tuple(own[k].shape)}"
            )
    missing = sorted(k for k in own if k not in new)
    required = [k for k in missing if not _may_stay_random(backbone, k)]
    if required:
        found = ", ".join(sorted(sd)[:SHOWN]) or "nothing"
        raise ValueError(
            f"{source} lacks {len(required)} backbone tensors in the timm ViT layout, e.g. "
            f"{required[:SHOWN]} (the file holds {len(sd)} entries: {found}"
            f"{' ...' if len(sd) > SHOWN else ''}). Point model.backbone.pretrained at a "
            "timm/DeiT ViT checkpoint with this embed_dims and at least num_layers blocks, "
            "or train from scratch with model.backbone.pretrained=None"
        )
    backbone.load_state_dict(new, strict=False)
    return {
        "missing": [k for k in missing if not k.endswith(EXTRA_STATE)],
        "unexpected": sorted(k for k in sd if k not in used),
    }


def split_dense_mlp(
    backbone: M3ViT, i: int, fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor, fc2_b: Tensor
) -> dict[str, Tensor]:
    """Experts of MoE block ``i`` cut from a dense MLP (``expert_init='split'``).

    fc1_w (Hdense, D), fc1_b (Hdense,), fc2_w (D, Hdense), fc2_b (D,) -> ``blocks.i.moe``
    tensors w1 (E, D, Hd), b1 (E, Hd), w2 (E, Hd, D), b2 (E, D): the dense hidden units
    are cut into G = Hdense / Hd contiguous groups, expert e takes group ``e % G``, and
    ``b2 = fc2_b / G``, so experts 0..G-1 together compute the dense MLP.
    """
    moe = backbone.blocks[i].moe
    e, _, hd = moe.w1.shape
    dense_hidden = fc1_w.shape[0]
    if dense_hidden % hd:
        raise ValueError(
            f"expert_init='split' needs the dense hidden size {dense_hidden} (block {i}) "
            f"to be a multiple of expert_hidden_dims={hd}"
        )
    groups = dense_hidden // hd
    idx = [(x % groups) for x in range(e)]
    w1 = torch.stack([fc1_w[g * hd : (g + 1) * hd].t() for g in idx])
    b1 = torch.stack([fc1_b[g * hd : (g + 1) * hd] for g in idx])
    w2 = torch.stack([fc2_w[:, g * hd : (g + 1) * hd].t() for g in idx])
    b2 = (fc2_b / groups).unsqueeze(0).expand(e, -1)
    p = f"blocks.{i}.moe."
    return {p + "w1": w1, p + "b1": b1, p + "w2": w2, p + "b2": b2.clone()}
