"""The build step that swaps the MoE stand-in for the reordered engine (FINN-style step).

``step_m3vit_moe_reordered(model, cfg)`` runs on the whole streamlined graph, after its
verification and before the conversion to HW layers (``finn_flow/steps.py`` lists it
there for ``--moe reordered``). It reads from the build config:

- ``verify_input_npy``: the input(s) the swap is checked on: one input array, or a stack
  (N, ...) of them (every one is checked);
- ``moe_layers`` (optional): the number of MoE layers of the pathway: the build fails
  unless exactly that many stand-in regions are replaced;
- ``moe_axi_bits`` (optional, default 128): AXI width of the expert-weight port;
- ``fpga_part``: the part (memory placement of the estimates).

It writes the per-layer reports of :func:`finn_flow.moe_ops.replace_moe_standins` to
``<output_dir>/report/moe_layers.json`` (atomically), which the build summary reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from finn_flow.moe_ops.transform import MoESwapError, replace_moe_standins

#: where the step leaves its report, relative to the FINN output_dir
REPORT = Path("report") / "moe_layers.json"


def check_inputs(model: Any, path: str) -> list[np.ndarray]:
    """The arrays in ``path``: one graph input, or a stack of them."""
    if not path or not Path(path).is_file():
        raise MoESwapError(f"verification input {path!r} does not exist: the MoE swap must be "
                           "checked on actual inputs")  # fmt: skip
    arr = np.load(path).astype(np.float32)
    shape = tuple(model.get_tensor_shape(model.graph.input[0].name))
    if tuple(arr.shape) == shape:
        return [arr]
    if tuple(arr.shape[1:]) == shape:
        return list(arr)
    raise MoESwapError(f"{path}: shape {arr.shape}, expected {shape} or (N, *{shape})")


def step_m3vit_moe_reordered(model: Any, cfg: Any) -> Any:
    """Replace every MoE stand-in region by TopKGate / ExpertDispatch / ExpertFFN /
    ExpertCombine, after checking both forms agree bit for bit on the verification
    inputs (see the module docstring)."""
    arrays = check_inputs(model, getattr(cfg, "verify_input_npy", ""))
    expected = getattr(cfg, "moe_layers", None)
    model, reports = replace_moe_standins(
        model,
        arrays,
        expected_layers=int(expected) if expected is not None and int(expected) >= 0 else None,
        axi_bits=int(getattr(cfg, "moe_axi_bits", 128) or 128),
        fpgapart=str(cfg.fpga_part),
    )
    if not reports:
        print("[moe] WARNING: no MoE stand-in region found: the design has no MoE engine")
    out = Path(cfg.output_dir) / REPORT
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(reports, indent=2) + "\n")
    os.replace(tmp, out)
    for r in reports:
        print(
            f"[moe] layer {r['layer']}: stand-in ({r['removed_nodes']} nodes) -> reordered "
            f"engine, identical on {r['swap_check']['inputs']} input(s); ExpertFFN worst case "
            f"{r['cycles']['worst_case']} cycles, this routing {r['cycles']['max']}; "
            f"{r['expert_ddr_bytes_per_frame']['max']} expert bytes from DDR"
        )
    return model


def load_reports(output_dir: str | Path) -> list[dict[str, Any]]:
    """The step's per-layer reports of a build (empty list when the step did not run)."""
    path = Path(output_dir) / REPORT
    return json.loads(path.read_text()) if path.is_file() else []
