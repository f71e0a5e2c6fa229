"""FINN FPGA flow for mmseg-m3vit: Brevitas mirror of one task's pathway -> QONNX -> FINN.

Importing this package is cheap and needs neither Vivado nor finn-plus; the heavy parts
are imported by the modules that use them:

- :mod:`finn_flow.finn_env`: Vivado-free start-up of finn-plus (call before FINN builds);
- :mod:`finn_flow.quant_model`: the Brevitas mirror of one task's pathway;
- ``finn_flow/build.py``: the build script (``python finn_flow/build.py --task normals``).
"""

from finn_flow.finn_env import REQUIRED_VIVADO, VIVADO_PLACEHOLDER, FinnEnv, start_finn

__all__ = ["REQUIRED_VIVADO", "VIVADO_PLACEHOLDER", "FinnEnv", "start_finn"]
