"""Edge maps derived from label maps.

:func:`seg2bmap` is the boundary map of the BSDS / SEISM evaluation code, used for the
PASCAL-Context edge ground truth; :func:`label_boundaries` is the simpler one-sided rule
of the synthetic NYUD generator.
"""

from __future__ import annotations

import numpy as np


def seg2bmap(labels: np.ndarray) -> np.ndarray:
    """Boundary map of a label map as BSDS's / SEISM's ``seg2bmap`` computes it.

    A pixel is a boundary pixel when its label differs from its east, south or
    south-east neighbour; in the last row only the east neighbour counts, in the last
    column only the south neighbour, and the bottom-right pixel is never a boundary.
    The map is not thinned (the edge metric thins the ground truth, as SEISM does).

    Args:
        labels: integer label map of shape (H, W).

    Returns:
        bool array (H, W), True on boundary pixels.
    """
    if labels.ndim != 2:
        raise ValueError(f"seg2bmap expects an (H, W) label map, got shape {labels.shape}")
    b = np.zeros(labels.shape, dtype=bool)
    b[:, :-1] |= labels[:, :-1] != labels[:, 1:]  # east (the last row included)
    b[:-1, :] |= labels[:-1, :] != labels[1:, :]  # south (the last column included)
    b[:-1, :-1] |= labels[:-1, :-1] != labels[1:, 1:]  # south-east
    b[-1, -1] = False
    return b


def label_boundaries(labels: np.ndarray) -> np.ndarray:
    """Mark the one-pixel-wide boundaries between regions of a label map.

    A pixel is a boundary pixel when its label differs from the label of its right or
    its lower neighbour. This gives boundaries one pixel wide (on the upper/left side of
    each transition), close to the thinned Laplacian boundaries used by the MTL
    literature for PASCAL-Context, without a dependency on scikit-image.

    Args:
        labels: integer label map of shape (H, W).

    Returns:
        bool array (H, W), True on boundary pixels.
    """
    if labels.ndim != 2:
        raise ValueError(f"label_boundaries expects an (H, W) label map, got shape {labels.shape}")
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge
