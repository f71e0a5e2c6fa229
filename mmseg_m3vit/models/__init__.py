"""Models: importing this registers every model component in mmseg's MODELS registry."""

from . import backbones, data_preprocessor, decode_heads, losses, moe, segmentors  # noqa: F401
