"""FINN FPGA flow for mmseg-m3vit: Brevitas mirror of one task's pathway -> QONNX -> FINN.

Importing this package is cheap and needs neither Vivado nor finn-plus; the heavy parts
are imported by the modules that use them:

- ``finn_flow/build.py``: the build script (``python finn_flow/build.py --task normals``);
- :mod:`finn_flow.float_model`: the float model's task pathway (plugin API, checkpoint);
- :mod:`finn_flow.quant_model`: the Brevitas mirror of one task's pathway;
- :mod:`finn_flow.evaluate`: val frames and the float / quantized task metric;
- :mod:`finn_flow.finn_env`: Vivado-free start-up of finn-plus (before any FINN import);
- :mod:`finn_flow.steps`: the build steps; :mod:`finn_flow.graph_passes`: the passes that
  may run on pieces (:mod:`finn_flow.pieces`); :mod:`finn_flow.transforms`: own passes;
- :mod:`finn_flow.report`: resources, performance, ``summary.json`` / ``SUMMARY.md``;
  :mod:`finn_flow.cost_models`: estimates where finn-plus reports zero.
"""

import os
from pathlib import Path

from finn_flow.finn_env import REQUIRED_VIVADO, VIVADO_PLACEHOLDER, FinnEnv, start_finn


class BuildError(RuntimeError):
    """A build stage failed; the message says which and why."""


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file + rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


__all__ = [
    "REQUIRED_VIVADO",
    "VIVADO_PLACEHOLDER",
    "BuildError",
    "FinnEnv",
    "start_finn",
    "write_atomic",
]
