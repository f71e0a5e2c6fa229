"""Package version and the supported range of the OpenMMLab stack."""

__version__ = "0.1.0"
