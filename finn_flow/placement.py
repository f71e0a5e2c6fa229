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
        lut: LUTs (finn-plus's estimator). res_type: where an HLS MVAU's multipliers go
            (``'lut'`` or ``'dsp'``; None for the RTL MVAU, which always uses DSPs).
    """

    simd: int
    pe: int
    ram_style: str
    bram18: int
    uram: int
    dsp: int
    cycles: int
    lut: int = 0
    res_type: str | None = None

    def attrs(self) -> dict[str, Any]:
        """The node attributes of this option (folding JSON entry)."""
        out: dict[str, Any] = {
            "SIMD": self.simd,
            "PE": self.pe,
            "mem_mode": "internal_decoupled",
            "ram_style": self.ram_style,
        }
        out["runtime_writeable_weights"] = 1 if self.ram_style == "ultra" else 0
        if self.res_type is not None:
            out["resType"] = self.res_type
        return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def evaluate(
    inst: Any, simd: int, pe: int, ram_style: str, part: str, res_type: str | None = None
) -> MemoryOption:
    """Estimate one folding of an MVAU instance (on a copy of its node); ``res_type``
    sets an HLS MVAU's ``resType`` (None: leave it)."""
    from qonnx.custom_op.registry import getCustomOp

    node = copy.deepcopy(inst.onnx_node)
    trial = getCustomOp(node)
    trial.set_nodeattr("SIMD", simd)
    trial.set_nodeattr("PE", pe)
    trial.set_nodeattr("mem_mode", "internal_decoupled")
    trial.set_nodeattr("ram_style", ram_style)
    trial.set_nodeattr("runtime_writeable_weights", 1 if ram_style == "ultra" else 0)
    if res_type is not None:
        trial.set_nodeattr("resType", res_type)
    return MemoryOption(
        simd=simd,
        pe=pe,
        ram_style=ram_style,
        bram18=int(trial.bram_estimation(part)),
        uram=int(trial.uram_estimation(part)),
        dsp=int(trial.dsp_estimation(part)),
        cycles=int(trial.get_exp_cycles()),
        lut=int(trial.lut_estimation(part)),
        res_type=res_type,
    )


def options(inst: Any, part: str, max_cycles: int) -> tuple[MemoryOption | None, MemoryOption]:
    """(best URAM option or None, best BRAM option) of one MVAU within ``max_cycles``.

    URAM: 64-72-bit words, fewest blocks, then fewest LUTs, then fewest DSPs. BRAM:
    fewest BRAM_18K among the foldings that meet the cycle budget, then fewest LUTs, then
    fewest DSPs, then the widest word. An HLS MVAU (multipliers in LUTs by default) is
    also tried with its multipliers in DSPs (``resType='dsp'``): the LUTs are the scarcer
    resource of this design, the DSPs are not.
    """
    mw, mh = int(inst.get_nodeattr("MW")), int(inst.get_nodeattr("MH"))
    wbits = int(inst.get_input_datatype(1).bitwidth())
    res_types = ("lut", "dsp") if inst.onnx_node.op_type == "MVAU_hls" else (None,)
    uram: list[MemoryOption] = []
    bram: list[MemoryOption] = []
    for simd in _divisors(mw):
        for pe in _divisors(mh):
            lanes = simd * pe
            for res in res_types:
                if URAM_WORD_BITS[0] <= lanes * wbits <= URAM_WORD_BITS[1]:
                    opt = evaluate(inst, simd, pe, "ultra", part, res)
                    if opt.cycles <= max_cycles:
                        uram.append(opt)
                opt = evaluate(inst, simd, pe, "block", part, res)
                if opt.cycles <= max_cycles:
                    bram.append(opt)
    best_u = min(uram, key=lambda o: (o.uram, o.lut, o.dsp, o.cycles)) if uram else None
    if not bram:
        raise ValueError(
            f"{inst.onnx_node.name}: no folding of {mw}x{mh} meets {max_cycles} cycles"
        )
    best_b = min(bram, key=lambda o: (o.bram18, o.lut, o.dsp, -o.simd * o.pe))
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
            "lut": choice.lut,
            "cycles": choice.cycles,
            "options": {
                "ultra": None if best_u is None else vars(best_u),
                "block": vars(best_b),
            },
        }
    return out


@dataclass(frozen=True)
class ThresholdOption:
    """One memory style of an RTL thresholding layer's stages.

    Attributes:
        depth_trigger_bram: the node attribute: stages at least this deep go to BRAM,
            the others to LUTRAM (0: finn-plus's ``auto`` rule per stage).
        lut / bram18: resources as generated (:func:`finn_flow.cost_models.
            thresholding_rtl_as_generated`: memories and comparators).
    """

    depth_trigger_bram: int
    lut: float
    bram18: float


def threshold_options(model: Any, node: Any) -> list[ThresholdOption]:
    """The node's current memory style first, then every stage depth as the BRAM
    trigger (deepest first: one stage in BRAM, then two, ...)."""
    import dataclasses

    from finn_flow.cost_models import threshold_table, thresholding_rtl_as_generated

    table = threshold_table(model, node)
    depths = sorted({table.stage_depth(s) for s in range(table.stages)}, reverse=True)
    out = []
    for trigger in [table.depth_trigger_bram, *depths]:
        res = thresholding_rtl_as_generated(dataclasses.replace(table, depth_trigger_bram=trigger))
        out.append(ThresholdOption(trigger, res["LUT"], res["BRAM_18K"]))
    return out


def choose_thresholds(
    candidates: dict[str, list[ThresholdOption]], bram_budget: float, min_lut_per_bram: float
) -> dict[str, ThresholdOption]:
    """Move threshold memories from LUTRAM to BRAM where it saves the most LUTs per block.

    Starts from each layer's first option (its current style) and repeatedly takes, over
    all layers, the change of one layer's option with the most LUTs saved per BRAM_18K
    added, as long as that ratio is at least ``min_lut_per_bram`` and the added blocks fit
    in ``bram_budget`` (BRAM_18K the thresholding may add). A change that saves LUTs and
    adds no block is always taken.

    Returns:
        ``{node name: chosen option}`` for every candidate.
    """
    chosen = {name: opts[0] for name, opts in candidates.items()}
    left = bram_budget
    while True:
        best: tuple[float, str, ThresholdOption] | None = None
        for name, opts in candidates.items():
            cur = chosen[name]
            for opt in opts:
                saved, added = cur.lut - opt.lut, opt.bram18 - cur.bram18
                if saved <= 0 or added > left:
                    continue
                ratio = math.inf if added <= 0 else saved / added
                if ratio < min_lut_per_bram:
                    continue
                if best is None or ratio > best[0]:
                    best = (ratio, name, opt)
        if best is None:
            return chosen
        _, name, opt = best
        left -= opt.bram18 - chosen[name].bram18
        chosen[name] = opt


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
    p.add_argument(
        "--bram-budget",
        type=float,
        default=0.85,
        help="fraction of the board's BRAM_18K the whole design may use (threshold "
        "memories move from LUTRAM to BRAM within it)",
    )
    p.add_argument(
        "--min-lut-per-bram",
        type=float,
        default=100.0,
        help="move a threshold memory to BRAM only where each BRAM_18K saves this many LUTs",
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
    # threshold memories: LUTRAM -> BRAM within what the MVAUs leave of the BRAM budget
    thr_nodes = [n for n in model.graph.node if n.op_type == "Thresholding_rtl"]
    candidates = {n.name: threshold_options(model, n) for n in thr_nodes}
    mvau_bram = sum(lay["BRAM_18K"] for lay in layers if lay["op_type"].startswith("MVAU"))
    thr_bram = sum(opts[0].bram18 for opts in candidates.values())
    fixed = summary["resources"]["total"]["BRAM_18K"] - mvau_bram - thr_bram
    new_mvau_bram = sum(e["bram18"] for e in placed.values())
    thr_left = math.floor(args.bram_budget * cap["BRAM_18K"]) - fixed - new_mvau_bram - thr_bram
    thr_choice = choose_thresholds(candidates, max(thr_left, 0), args.min_lut_per_bram)
    moved = {k: v for k, v in thr_choice.items() if v != candidates[k][0]}
    for name, opt in moved.items():
        folding.setdefault(name, {})["depth_trigger_bram"] = opt.depth_trigger_bram
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(folding, indent=2) + "\n")
    tmp.replace(args.out)
    n_u = sum(1 for e in placed.values() if e["choice"]["ram_style"] == "ultra")
    print(
        f"{len(placed)} MVAUs: {n_u} in URAM ({sum(e['uram'] for e in placed.values())} "
        f"blocks of a budget of {budget}), {len(placed) - n_u} in BRAM "
        f"({sum(e['bram18'] for e in placed.values())} BRAM_18K); DSP "
        f"{sum(e['dsp'] for e in placed.values())}; slowest "
        f"{max(e['cycles'] for e in placed.values())} cycles; {len(moved)} of "
        f"{len(candidates)} threshold layers partly to BRAM (LUT "
        f"{sum(candidates[k][0].lut - v.lut for k, v in moved.items()):.0f} less, BRAM_18K "
        f"{sum(v.bram18 - candidates[k][0].bram18 for k, v in moved.items()):.0f} more) -> "
        f"{args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
