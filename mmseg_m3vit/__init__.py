"""mmseg-m3vit: M3ViT (Mixture-of-Experts ViT for multi-task dense prediction) for
MMSegmentation 1.x.

Importing the package (directly or through a config's ``custom_imports``):

1. checks the OpenMMLab versions (:mod:`mmseg_m3vit.version`);
2. installs the pure-Python ``mmcv.ops`` fallback when mmcv's compiled ops are absent
   and routes mmengine's checkpoint loading (local files and URLs) through the safe
   loader, ``weights_only=True`` with the allow-list of our Runner's checkpoints
   (:mod:`mmseg_m3vit.compat`);
3. registers every model, data set, transform, metric and hook in mmseg's registries.
"""

from .version import __version__, check_versions

check_versions()

from .compat import install_checkpoint_loader, install_mmcv_ops_fallback  # noqa: E402

install_mmcv_ops_fallback()
install_checkpoint_loader()

from . import datasets, engine, evaluation, models  # noqa: E402, F401

__all__ = ["__version__"]
