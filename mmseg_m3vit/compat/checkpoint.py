"""Safe checkpoint loading: ``torch.load(weights_only=True)`` with an exact allow-list.

A checkpoint is a pickle, and unpickling an arbitrary pickle runs arbitrary code. Every
checkpoint read by the plugin, its tools and mmengine's loaders (once :func:`install`
has run) goes through :func:`load_checkpoint_file`, which unpickles with torch's
restricted unpickler and allows, besides tensors and plain containers, only the
globals that checkpoints written by an mmengine ``Runner`` training our configs hold
(found by saving such checkpoints, with and without resuming and with the best-checkpoint
hook, and listing them with ``torch.serialization.get_unsafe_globals_in_checkpoint``):

* ``mmengine.logging.history_buffer.HistoryBuffer`` (the message hub's logged scalars);
* ``builtins.getattr``, used by those buffers to pickle their statistics methods
  (``getattr(HistoryBuffer, 'mean')``): mapped to a getattr that answers only for
  ``HistoryBuffer``'s own statistics methods and refuses everything else;
* numpy arrays and scalars in the message hub (``numpy.ndarray``, ``numpy.dtype``,
  ``numpy._core.multiarray._reconstruct`` / ``scalar``; numpy 1.x writes the same two
  functions as ``numpy.core.multiarray.*``, accepted under that name too) and the two
  dtypes they hold, float64 and int64 (``numpy.dtypes.Float64DType`` /
  ``Int64DType``: the loader must be allowed to restore their state; this list came
  from loading the saved files, as these are not pickled as globals).

Anything else fails with :class:`UntrustedCheckpointError`, naming the global(s), the
file and the two ways to opt in for a file you trust: the ``--trust-checkpoint`` flag of
the tools, or the environment variable ``M3VIT_TRUST_CHECKPOINT=1`` (for configs and
scripts; it is what the flag sets).

Remote files (``http://``, ``https://``, and mmengine's ``torchvision://``, ``mmcls://``,
``open-mmlab://`` names, which resolve to URLs) are downloaded into torch's hub cache and
then loaded by the same function. mmengine's other schemes (``pavi://``, ``s3://``) call
``torch.load`` with torch's own default, ``weights_only=True``, without our allow-list.
"""

from __future__ import annotations

import contextlib
import os
import os.path as osp
import pickle
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner import checkpoint as mme_checkpoint
from mmengine.runner.checkpoint import CheckpointLoader
from torch import nn

#: Environment variable that, set to ``1``, lets every checkpoint load unrestricted.
TRUST_ENV = "M3VIT_TRUST_CHECKPOINT"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
#: How many names an error lists before "... and N more".
SHOWN = 5


class UntrustedCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs globals outside the allow-list (the message says which)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not match the model (missing / unexpected / shapes)."""


#: ``HistoryBuffer``'s own statistics methods, pickled as ``getattr(HistoryBuffer, name)``.
HISTORY_STATISTICS = ("min", "max", "current", "mean")


def _statistics_getattr(obj: Any, name: str) -> Any:
    """The only ``getattr`` a checkpoint may call: a ``HistoryBuffer`` statistics method."""
    if obj is HistoryBuffer and name in HISTORY_STATISTICS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f"the checkpoint calls getattr({obj!r}, {name!r}); only "
        f"getattr(HistoryBuffer, <statistics method>) is allowed"
    )


def _numpy_functions() -> tuple[Callable, Callable]:
    """numpy's array and scalar reconstructors, whatever module numpy keeps them in."""
    reconstruct = np.zeros(1).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    return reconstruct, scalar


def allowed_globals() -> list[Any]:
    """The allow-list, in ``torch.serialization.safe_globals`` form (objects, or
    ``(object, 'module.name')`` pairs for names that differ from the object's own)."""
    reconstruct, scalar = _numpy_functions()
    return [
        HistoryBuffer,
        np.ndarray,
        np.dtype,
        type(np.dtype(np.float64)),
        type(np.dtype(np.int64)),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (scalar, "numpy._core.multiarray.scalar"),
        (scalar, "numpy.core.multiarray.scalar"),
        (_statistics_getattr, "builtins.getattr"),
    ]


def allowed_global_names() -> list[str]:
    """Fully qualified names of :func:`allowed_globals`."""
    names = []
    for g in allowed_globals():
        names.append(g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}")
    return names


def trust_from_env() -> bool:
    """``True`` when ``M3VIT_TRUST_CHECKPOINT`` is set to 1 / true / yes / on.

    Raises:
        ValueError: for any other non-empty value (naming it and what is accepted).
    """
    value = os.environ.get(TRUST_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"environment variable {TRUST_ENV}={os.environ[TRUST_ENV]!r}: expected 1 (trust "
        f"checkpoints) or 0 / unset"
    )


@contextlib.contextmanager
def trusted_checkpoints(trust: bool) -> Iterator[None]:
    """Within the block, load checkpoints unrestricted when ``trust`` (sets
    ``M3VIT_TRUST_CHECKPOINT=1``, which worker processes inherit); restores it after.
    With ``trust=False`` the environment is left as it is."""
    if not trust:
        yield
        return
    old = os.environ.get(TRUST_ENV)
    os.environ[TRUST_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(TRUST_ENV, None)
        else:
            os.environ[TRUST_ENV] = old


def _is_url(filename: str) -> bool:
    return filename.startswith(("http://", "https://"))


def _refused_globals(path: str, error: Exception) -> list[str]:
    """The globals of ``path`` outside the allow-list (from the file, else the error)."""
    allowed = set(allowed_global_names())
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        names = sorted(g for g in found if g not in allowed)
        if names:
            return names
    except Exception:  # not a zip-format file: fall back to torch's message
        pass
    return sorted(set(re.findall(r"GLOBAL ([\w.]+) was not an allowed global", str(error))))


def load_checkpoint_file(
    filename: str, map_location: Any = "cpu", trust: bool | None = None
) -> Any:
    """Load a checkpoint file (local path or http(s) URL) safely.

    Args:
        filename: local path (``~`` expanded) or ``http(s)://`` URL (downloaded once into
            ``<torch hub dir>/checkpoints``).
        map_location: as for :func:`torch.load`.
        trust: ``True`` unpickles without restriction (only for files you trust);
            ``False`` allows only :func:`allowed_globals`; ``None``: the environment
            variable ``M3VIT_TRUST_CHECKPOINT`` decides.

    Returns:
        What the file holds (for mmengine checkpoints a dict with ``state_dict``,
        ``meta``, ``message_hub``, ``optimizer``, ``param_schedulers``).

    Raises:
        FileNotFoundError: naming the path when it is not a file.
        UntrustedCheckpointError: naming the refused global(s), the file and how to opt in.
    """
    if _is_url(filename):
        return load_url(filename, map_location=map_location, trust=trust)
    path = osp.expanduser(filename)
    if not osp.isfile(path):
        raise FileNotFoundError(f"checkpoint {filename!r} is not a file")
    if trust is None:
        trust = trust_from_env()
    if trust:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        names = _refused_globals(path, err)
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", str(err), re.S)
        reason = found.group(1) if found else str(err).strip().splitlines()[-1]
        reason = " ".join(reason.split(" Please use")[0].split())
        what = f"the global(s) {names}" if names else "an object torch's safe loader refuses"
        raise UntrustedCheckpointError(
            f"refusing to load checkpoint {filename!r}: it needs {what}, which checkpoints "
            f"written by our mmengine Runner never hold, and unpickling it could run "
            f"arbitrary code. If you trust this file, run the tool with "
            f"--trust-checkpoint, or set {TRUST_ENV}=1 in the environment. "
            f"(torch: {reason[:300]})"
        ) from None


def load_url(
    url: str,
    model_dir: str | None = None,
    map_location: Any = None,
    progress: bool = True,
    check_hash: bool = False,
    file_name: str | None = None,
    trust: bool | None = None,
) -> Any:
    """Download ``url`` into the torch hub cache (once) and load it with
    :func:`load_checkpoint_file`; the signature of mmengine's / torch's ``load_url``.

    In distributed runs every rank downloads into the same cache; torch's downloader
    writes to a temporary file and renames it, so a partial file is never loaded.
    """
    if model_dir is None:
        model_dir = osp.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(model_dir, exist_ok=True)
    name = file_name or osp.basename(urlparse(url).path)
    if not name:
        raise ValueError(f"cannot tell a file name from the URL {url!r}; pass file_name")
    cached = osp.join(model_dir, name)
    if not osp.exists(cached):
        hash_prefix = None
        if check_hash:
            match = torch.hub.HASH_REGEX.search(name)
            hash_prefix = match.group(1) if match else None
        torch.hub.download_url_to_file(url, cached, hash_prefix, progress=progress)
    return load_checkpoint_file(cached, map_location=map_location, trust=trust)


def _mmengine_local_loader(filename: str, map_location: Any = None) -> Any:
    return load_checkpoint_file(filename, map_location=map_location)


def _mmengine_url_loader(filename: str, map_location: Any = None) -> Any:
    return load_url(filename, map_location=map_location, progress=False)


def install() -> None:
    """Route mmengine's checkpoint loading through :func:`load_checkpoint_file`.

    Registers it for local paths (the empty scheme prefix) and for ``http://`` /
    ``https://``, and replaces the ``load_url`` that mmengine's URL-based schemes
    (``torchvision://``, ``mmcls://``, ``open-mmlab://``) call, which passes
    ``weights_only=False``.
    """
    CheckpointLoader.register_scheme(prefixes="", loader=_mmengine_local_loader, force=True)
    CheckpointLoader.register_scheme(
        prefixes=("http://", "https://"), loader=_mmengine_url_loader, force=True
    )
    mme_checkpoint.load_url = load_url


# --------------------------------------------------------------------------- models
def _unwrap(model: nn.Module) -> nn.Module:
    from mmengine.model import is_model_wrapper

    return model.module if is_model_wrapper(model) else model


def extract_state_dict(checkpoint: Any, filename: str) -> dict[str, Any]:
    """The state dict of a loaded checkpoint: ``checkpoint['state_dict']`` (mmengine),
    ``checkpoint['model']`` (timm / DeiT) or the checkpoint itself when it is one; a
    leading ``module.`` (DDP) is stripped.

    Raises:
        ValueError: naming the file when it holds no state dict.
    """
    sd = checkpoint
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), Mapping):
                sd = checkpoint[key]
                break
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) for k in sd):
        raise ValueError(
            f"checkpoint {filename!r} holds no state dict (got {type(checkpoint).__name__}; "
            "expected a dict of tensors, or one under 'state_dict' or 'model')"
        )
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    more = f" ... and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return f"{len(names)}: {shown}{more}"


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Any], filename: str) -> None:
    """Fail unless ``state_dict`` has exactly the model's keys with the model's shapes.

    Task orders are checked first (:func:`mmseg_m3vit.models.task_order.check_task_orders`):
    a checkpoint of other tasks fails naming both task lists; a checkpoint of the same
    tasks in another order passes (loading maps its routers by name).

    Raises:
        CheckpointMismatchError: naming the file and the first few missing, unexpected
            and mis-shaped keys (with both shapes).
    """
    from ..models.task_order import EXTRA_STATE, check_task_orders

    check_task_orders(model, state_dict, filename)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} (model: {tuple(v.shape)})"
        for k, v in own.items()
        if k in state_dict
        and not k.endswith(EXTRA_STATE)
        and isinstance(v, torch.Tensor)
        and isinstance(state_dict[k], torch.Tensor)
        and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing from the checkpoint {_listed(missing)}")
    if unexpected:
        parts.append(f"not in the model {_listed(unexpected)}")
    if shapes:
        parts.append(f"different shapes {_listed(shapes)}")
    raise CheckpointMismatchError(
        f"checkpoint {filename!r} does not match the model built from the config: "
        + "; ".join(parts)
        + ". Use the config the checkpoint was trained with (e.g. the same "
        "num_experts, embed_dims, tasks and heads)."
    )


def load_model_checkpoint(
    model: nn.Module,
    filename: str,
    *,
    trust: bool | None = None,
    prefix: str = "",
    map_location: Any = "cpu",
) -> dict:
    """Load a full-model checkpoint strictly into ``model`` (unwrapped if DDP).

    Nothing is copied unless every key matches: missing, unexpected and mis-shaped keys
    fail, naming the first few. Task routers are mapped by task name (the names are
    stored with the backbone's weights), so a config that lists the same tasks in another
    order gets each task's own router; other tasks fail.

    Args:
        model: the model built from the config (e.g. ``MultiTaskSegmentor``).
        filename: checkpoint path or URL (loaded with :func:`load_checkpoint_file`).
        trust: see :func:`load_checkpoint_file`.
        prefix: load only the keys under this prefix (stripped) into ``model``, e.g.
            ``'backbone.'`` into a bare backbone, ``'heads.depth.'`` into a head.
        map_location: as for :func:`torch.load`.

    Returns:
        The checkpoint's ``meta`` dict (empty when it has none).

    Raises:
        FileNotFoundError, UntrustedCheckpointError: see :func:`load_checkpoint_file`.
        ValueError: no state dict, or no key under ``prefix``.
        CheckpointMismatchError: keys or shapes differ (nothing is loaded).
    """
    model = _unwrap(model)
    checkpoint = load_checkpoint_file(filename, map_location=map_location, trust=trust)
    state_dict = extract_state_dict(checkpoint, filename)
    if prefix:
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not state_dict:
            raise ValueError(f"checkpoint {filename!r} has no keys under {prefix!r}")
    check_state_dict(model, state_dict, filename)
    model.load_state_dict(state_dict, strict=True)
    meta = checkpoint.get("meta") if isinstance(checkpoint, Mapping) else None
    return dict(meta) if isinstance(meta, Mapping) else {}
