"""Loading local checkpoints under torch >= 2.6.

torch 2.6 made ``torch.load(weights_only=True)`` the default. Checkpoints written by
mmengine's Runner hold message-hub and history objects, so resuming or testing from
them fails with ``UnpicklingError ... was not an allowed global``. mmengine 0.10.7 calls
``torch.load`` without the argument. :func:`install` re-registers mmengine's loader for
local paths (the empty scheme prefix) with ``weights_only=False``: these are trusted
files the user chose on their own disk. Remote schemes are left untouched.
"""

from __future__ import annotations

import os

import torch
from mmengine.runner.checkpoint import CheckpointLoader


def load_local_checkpoint(filename: str, map_location: str | None = None) -> dict:
    """Load a local checkpoint file written by mmengine or plain ``torch.save``.

    Args:
        filename: path of the file (``~`` is expanded).
        map_location: as for :func:`torch.load`.

    Returns:
        Whatever the file holds (usually a dict with ``state_dict`` / ``meta``).

    Raises:
        FileNotFoundError: naming the path when it is not a file.
    """
    path = os.path.expanduser(filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {filename!r} is not a file")
    return torch.load(path, map_location=map_location, weights_only=False)


def install() -> None:
    """Make mmengine's local-file checkpoint loader pass ``weights_only=False``."""
    CheckpointLoader.register_scheme(prefixes="", loader=load_local_checkpoint, force=True)
