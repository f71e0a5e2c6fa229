"""A pure-Python stand-in for ``mmcv.ops`` when mmcv's compiled ops are absent.

``mmcv-lite`` ships no ``mmcv._ext`` extension, so ``import mmcv.ops`` fails, yet
mmsegmentation imports ``point_sample`` and ``sigmoid_focal_loss`` from it at module
level. :func:`install` registers a small module under the name ``mmcv.ops`` that

* provides ``point_sample`` / ``bilinear_grid_sample`` from mmcv's own pure-PyTorch
  file ``mmcv/ops/point_sample.py`` (loaded by path, so mmcv's failing package
  ``__init__`` is never run);
* provides a ``sigmoid_focal_loss`` that raises a clear error when called (mmseg only
  calls it on CUDA tensors, and only for the focal loss, which M3ViT does not use);
* raises ``ModuleNotFoundError`` for every other name, so mmseg's own
  ``try: from mmcv.ops import X / except ImportError`` guards keep working.

When the real, compiled ``mmcv.ops`` imports, :func:`install` does nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings
from pathlib import Path

_FALLBACK_ATTR = "__m3vit_fallback__"


def _real_ops_available() -> bool:
    try:
        importlib.import_module("mmcv.ops")
    except ImportError:  # ModuleNotFoundError: No module named 'mmcv._ext'
        sys.modules.pop("mmcv.ops", None)
        return False
    return True


def _load_point_sample_file() -> types.ModuleType:
    import mmcv

    path = Path(mmcv.__file__).parent / "ops" / "point_sample.py"
    if not path.is_file():
        raise ImportError(
            f"mmcv.ops fallback: {path} is missing; install mmcv-lite==2.1.0 "
            "(see requirements/env.txt)"
        )
    spec = importlib.util.spec_from_file_location("mmseg_m3vit._mmcv_point_sample", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sigmoid_focal_loss(*args, **kwargs):  # noqa: ANN002, ANN003 - mirrors mmcv's signature
    """Placeholder for mmcv's compiled CUDA focal loss: always raises.

    Raises:
        RuntimeError: this op needs full mmcv compiled with CUDA ops.
    """
    raise RuntimeError(
        "mmcv.ops.sigmoid_focal_loss needs the compiled mmcv ops, but only mmcv-lite is "
        "installed. Use mmseg's FocalLoss on CPU (it falls back to a PyTorch version) or "
        "build full mmcv 2.1.0 with MMCV_WITH_OPS=1."
    )


def _module_getattr(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise ModuleNotFoundError(
        f"mmcv.ops.{name} needs mmcv's compiled ops (mmcv._ext), which mmcv-lite does not "
        "ship; mmseg-m3vit provides only point_sample, bilinear_grid_sample and "
        "sigmoid_focal_loss (which raises)."
    )


def install() -> bool:
    """Register the fallback as ``mmcv.ops`` unless the compiled ops import.

    Returns:
        True when the fallback was installed (or already was), False when the real
        ``mmcv.ops`` is importable and was left alone.
    """
    current = sys.modules.get("mmcv.ops")
    if current is not None and getattr(current, _FALLBACK_ATTR, False):
        return True
    if _real_ops_available():
        return False
    # mmcv.cnn warns once that deformable attention is missing; with mmcv-lite that is
    # expected and M3ViT does not use it.
    warnings.filterwarnings("ignore", message=r"Fail to import ``MultiScaleDeformableAttention``")
    source = _load_point_sample_file()
    module = types.ModuleType("mmcv.ops", __doc__)
    setattr(module, _FALLBACK_ATTR, True)
    module.point_sample = source.point_sample
    module.bilinear_grid_sample = source.bilinear_grid_sample
    module.sigmoid_focal_loss = sigmoid_focal_loss
    module.__getattr__ = _module_getattr
    module.__all__ = ["point_sample", "bilinear_grid_sample", "sigmoid_focal_loss"]
    sys.modules["mmcv.ops"] = module
    import mmcv

    mmcv.ops = module
    return True
