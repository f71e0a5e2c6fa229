"""Position-embedding resizing, shared by the backbone (any input size) and the ImageNet
loader (pretrained 14x14 grid -> the configured grid)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def resize_pos_embed(
    pos_embed: Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int], num_prefix: int = 1
) -> Tensor:
    """Bilinearly resize the patch position embeddings, keeping prefix (CLS) tokens apart.

    Args:
        pos_embed: (1, num_prefix + hs*ws, D).
        src_grid: (hs, ws) grid of ``pos_embed``.
        dst_grid: (hd, wd) target grid.

    Returns:
        (1, num_prefix + hd*wd, D); ``F.interpolate(mode='bilinear', align_corners=False)``
        on the (1, D, hs, ws) patch part.
    """
    hs, ws = src_grid
    if pos_embed.shape[1] != num_prefix + hs * ws:
        raise ValueError(
            f"pos_embed has {pos_embed.shape[1]} tokens; expected {num_prefix} + {hs}x{ws}"
        )
    if tuple(src_grid) == tuple(dst_grid):
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    d = pos_embed.shape[-1]
    patches = patches.reshape(1, hs, ws, d).permute(0, 3, 1, 2)
    compute_dtype = torch.float64 if patches.dtype == torch.float64 else torch.float32
    patches = F.interpolate(
        patches.to(compute_dtype), size=tuple(dst_grid), mode="bilinear", align_corners=False
    ).to(pos_embed.dtype)
    patches = patches.permute(0, 2, 3, 1).reshape(1, dst_grid[0] * dst_grid[1], d)
    return torch.cat([prefix, patches], dim=1)
