"""Metrics: importing this registers them in mmseg's METRICS registry."""

from . import metrics  # noqa: F401
