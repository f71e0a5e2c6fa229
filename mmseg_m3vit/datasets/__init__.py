"""Data sets and transforms: importing this registers them in mmseg's registries."""

from . import transforms  # noqa: F401
