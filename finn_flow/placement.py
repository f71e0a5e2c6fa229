#!/usr/bin/env python
"""Memory placement of the on-chip MVAU weights for a board, as a folding JSON.

finn-plus's auto-folding picks PE / SIMD for throughput only and leaves every weight
memory to ``ram_style="auto"`` in BRAM; URAM stays unused. On the ZCU104 (XCZU7EV) the
BRAM is 11.2 Mbit and the URAM 27.6 Mbit, so the large weight matrices must go to URAM.
A URAM block is 72 bits x 4096 words, so a memory uses it well when one word holds 8 or 9
weights (``SIMD * PE * weight bits`` of 64-72 bits at 8 bits) and the matrix has a
multiple of 4096 such words (a 192 x 768 matrix at 9 weights a word: exactly 4 blocks).
On UltraScale+ finn-plus generates URAM weight memories only with
``runtime_writeable_weights=1`` (the weights are then also writable over AXI-lite).

:func:`plan` decides, for every MVAU whose weights stay on chip:

- URAM candidates: the (SIMD, PE) with 64-72-bit words that needs the fewest URAM
  blocks (ties: fewer DSPs, i.e. PE rather than SIMD on DSP48 parts), provided the layer
  still meets the cycle budget;
- which candidates go to URAM: greedily the ones that save the most BRAM per URAM block,
  while the URAM stays within its budget; the others keep a BRAM memory
  (``ram_style="block"``, the auto-folded SIMD / PE, or the narrowest word that meets the
  cycle budget when that needs fewer BRAM_18K).

Everything else keeps the folding of the build it starts from (the build's
``folding.json``). The result is a folding JSON for ``build.py --folding`` (finn-plus's
``ApplyConfig`` format), written by::

    python finn_flow/placement.py --build OUT --out finn_flow/folding/normals.json

where OUT is a finished ``build.py`` output folder of the same config (auto-folded or
not): its ``folding.json`` gives the node names and the starting folding, its final
model the layer sizes, and ``summary.json`` the other layers' memory use (taken as
fixed). Estimates use finn-plus's own MVAU estimators.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow `python finn_flow/placement.py` from a checkout
    sys.path.insert(0, str(REPO))

#: Word widths (bits) that fill a 72-bit URAM word well.
URAM_WORD_BITS = (64, 72)


@dataclass(frozen=True)
class MemoryOption:
    """One way to fold and store one MVAU's weights.

    Attributes:
        simd / pe: folding. ram_style: ``'ultra'`` or ``'block'``.
        bram18 / uram: blocks used (finn-plus's MVAU estimators).
        dsp: DSPs of the MAC array (finn-plus's estimator). cycles: per frame.
    """

    simd: int
    pe: int
    ram_style: str
    bram18: int
    uram: int
    dsp: int
    cycles: int

    def attrs(self) -> dict[str, Any]:
        """The node attributes of this option (folding JSON entry)."""
        out: dict[str, Any] = {
            "SIMD": self.simd,
            "PE": self.pe,
            "mem_mode": "internal_decoupled",
            "ram_style": self.ram_style,
        }
        out["runtime_writeable_weights"] = 1 if self.ram_style == "ultra" else 0
        return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def evaluate(inst: Any, simd: int, pe: int, ram_style: str, part: str) -> MemoryOption:
    """Estimate one folding of an MVAU instance (on a copy of its node)."""
    from qonnx.custom_op.registry import getCustomOp

    node = copy.deepcopy(inst.onnx_node)
    trial = getCustomOp(node)
    trial.set_nodeattr("SIMD", simd)
    trial.set_nodeattr("PE", pe)
    trial.set_nodeattr("mem_mode", "internal_decoupled")
    trial.set_nodeattr("ram_style", ram_style)
    trial.set_nodeattr("runtime_writeable_weights", 1 if ram_style == "ultra" else 0)
    return MemoryOption(
        simd=simd,
        pe=pe,
        ram_style=ram_style,
        bram18=int(trial.bram_estimation(part)),
        uram=int(trial.uram_estimation(part)),
        dsp=int(trial.dsp_estimation(part)),
        cycles=int(trial.get_exp_cycles()),
    )


def options(inst: Any, part: str, max_cycles: int) -> tuple[MemoryOption | None, MemoryOption]:
    """(best URAM option or None, best BRAM option) of one MVAU within ``max_cycles``.

    URAM: 64-72-bit words, fewest blocks, then fewest DSPs. BRAM: fewest BRAM_18K among
    the foldings that meet the cycle budget, then fewest DSPs, then the widest word.
    """
    mw, mh = int(inst.get_nodeattr("MW")), int(inst.get_nodeattr("MH"))
    wbits = int(inst.get_input_datatype(1).bitwidth())
    uram: list[MemoryOption] = []
    bram: list[MemoryOption] = []
    for simd in _divisors(mw):
        for pe in _divisors(mh):
            lanes = simd * pe
            if URAM_WORD_BITS[0] <= lanes * wbits <= URAM_WORD_BITS[1]:
                opt = evaluate(inst, simd, pe, "ultra", part)
                if opt.cycles <= max_cycles:
                    uram.append(opt)
            opt = evaluate(inst, simd, pe, "block", part)
            if opt.cycles <= max_cycles:
                bram.append(opt)
    best_u = min(uram, key=lambda o: (o.uram, o.dsp, o.cycles)) if uram else None
    if not bram:
        raise ValueError(
            f"{inst.onnx_node.name}: no folding of {mw}x{mh} meets {max_cycles} cycles"
        )
    best_b = min(bram, key=lambda o: (o.bram18, o.dsp, -o.simd * o.pe))
    return best_u, best_b


def plan(
    model: Any,
    part: str,
    max_cycles: int,
    uram_budget: float,
    skip: set[str] | frozenset[str] = frozenset(),
) -> dict[str, dict[str, Any]]:
    """Memory placement of every on-chip MVAU of ``model`` (see the module docstring).

    Args:
        model: the HW-layer graph (``ModelWrapper``), MVAUs specialised.
        part: FPGA part. max_cycles: cycle budget of every layer per frame.
        uram_budget: URAM blocks these MVAUs may use.
        skip: node names to leave alone (e.g. weights streamed from DDR).

    Returns:
        ``{node name: {"choice": MemoryOption attrs, "uram": ..., "bram18": ..., "dsp":
        ..., "cycles": ..., "options": {"ultra": ..., "block": ...}}}``.
    """
    from qonnx.custom_op.registry import getCustomOp

    layers = []
    for node in model.graph.node:
        if not node.op_type.startswith("MVAU") or node.name in skip:
            continue
        inst = getCustomOp(node)
        if inst.get_nodeattr("mem_mode") in ("external", "external_mem", "dynamic"):
            continue
        best_u, best_b = options(inst, part, max_cycles)
        layers.append((node.name, best_u, best_b))
    # greedy: BRAM saved per URAM block, largest first
    gain = sorted(
        (lay for lay in layers if lay[1] is not None),
        key=lambda lay: lay[2].bram18 / max(lay[1].uram, 1),
        reverse=True,
    )
    to_uram: set[str] = set()
    used = 0
    for name, best_u, best_b in gain:
        if best_b.bram18 <= 0 or used + best_u.uram > uram_budget:
            continue
        to_uram.add(name)
        used += best_u.uram
    out: dict[str, dict[str, Any]] = {}
    for name, best_u, best_b in layers:
        choice = best_u if name in to_uram else best_b
        out[name] = {
            "choice": choice.attrs(),
            "uram": choice.uram,
            "bram18": choice.bram18,
            "dsp": choice.dsp,
            "cycles": choice.cycles,
            "options": {
                "ultra": None if best_u is None else vars(best_u),
                "block": vars(best_b),
            },
        }
    return out


def main(argv: list[str] | None = None) -> int:
    """Write the folding JSON with the planned memory placement (see module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", required=True, help="finished build.py output folder")
    p.add_argument("--out", required=True, help="folding JSON to write")
    p.add_argument("--fps", type=float, default=30.0, help="throughput every layer must meet")
    p.add_argument("--clock-ns", type=float, default=5.0)
    p.add_argument(
        "--uram-budget",
        type=float,
        default=0.95,
        help="fraction of the board's URAM the whole design may use",
    )
    args = p.parse_args(argv)
    build = Path(args.build)
    for need in ("folding.json", "summary.json"):
        if not (build / need).is_file():
            print(f"placement.py: error: {build / need} missing (run build.py first)")
            return 2
    from finn_flow.finn_env import start_finn

    start_finn(build / "placement_finn")
    from finn_flow import report

    summary = json.loads((build / "summary.json").read_text())
    folding = json.loads((build / "folding.json").read_text())
    final = build / "finn" / "intermediate_models" / f"{summary['steps'][-1]}.onnx"
    model = report.dataflow_model(final)
    cap = summary["board_capacity"]
    layers = summary["resources"]["layers"]
    mvau_uram = sum(lay["URAM"] for lay in layers if lay["op_type"].startswith("MVAU"))
    other_uram = summary["resources"]["total"]["URAM"] - mvau_uram
    budget = math.floor(args.uram_budget * cap["URAM"] - other_uram)
    max_cycles = int(1e9 / (args.clock_ns * args.fps))
    placed = plan(model, summary["fpga_part"], max_cycles, budget)
    for name, entry in placed.items():
        folding.setdefault(name, {}).update(entry["choice"])
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(folding, indent=2) + "\n")
    tmp.replace(args.out)
    n_u = sum(1 for e in placed.values() if e["choice"]["ram_style"] == "ultra")
    print(
        f"{len(placed)} MVAUs: {n_u} in URAM ({sum(e['uram'] for e in placed.values())} "
        f"blocks of a budget of {budget}), {len(placed) - n_u} in BRAM "
        f"({sum(e['bram18'] for e in placed.values())} BRAM_18K); DSP "
        f"{sum(e['dsp'] for e in placed.values())}; slowest "
        f"{max(e['cycles'] for e in placed.values())} cycles -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
