"""Memory placement of MVAU weights: URAM words of 64-72 bits, the URAM budget, and the
BRAM fallback, against closed-form block counts."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.finn

PART = "xczu7ev-ffvc1156-2-e"


def _mvau_model(tmp_path, shapes: list[tuple[int, int]], tokens: int = 21):
    """A chain of MVAU_rtl layers with 8-bit weights: shapes = [(MW, MH), ...]."""
    from onnx import TensorProto, helper
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.basic import qonnx_make_model

    from finn_flow.finn_env import start_finn

    start_finn(tmp_path / "finn")
    nodes, names = [], ["x"]
    for i, (mw, mh) in enumerate(shapes):
        names.append(f"t{i}")
        nodes.append(
            helper.make_node(
                "MVAU_rtl",
                [names[-2], f"w{i}"],
                [names[-1]],
                domain="finn.custom_op.fpgadataflow.rtl",
                name=f"MVAU_rtl_{i}",
                MW=mw,
                MH=mh,
                SIMD=1,
                PE=1,
                inputDataType="INT8",
                weightDataType="INT8",
                outputDataType="INT32",
                numInputVectors=[1, tokens],
                noActivation=1,
                mem_mode="internal_decoupled",
            )  # fmt: skip
        )
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, shapes[0][0]])
    out = helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, [1, tokens, shapes[-1][1]])
    return ModelWrapper(qonnx_make_model(helper.make_graph(nodes, "g", [inp], [out])))


def test_uram_option_fills_72_bit_words(tmp_path) -> None:
    """192 x 768 at 8 bits: 9 weights a word (3 x 3) -> 16384 words -> exactly 4 URAM;
    192 x 64: no 9-lane folding divides both sides, 8 lanes -> 1536 words -> 1 URAM."""
    from qonnx.custom_op.registry import getCustomOp

    from finn_flow.placement import options

    model = _mvau_model(tmp_path, [(192, 768), (192, 64)])
    big, small = (getCustomOp(n) for n in model.graph.node)
    u, b = options(big, PART, max_cycles=10**9)
    assert u.simd * u.pe == 9 and u.uram == 4 and u.bram18 == 0
    assert u.cycles == 21 * 192 * 768 // 9
    # BRAM: 1.18 Mbit of weights in 18 Kbit blocks -> at least 64
    assert b.uram == 0 and b.bram18 >= math.ceil(192 * 768 * 8 / 18432)
    u2, _ = options(small, PART, max_cycles=10**9)
    assert u2.simd * u2.pe == 8 and u2.uram == 1
    # fewest DSPs among equal URAM use: PE (4 products per DSP48) rather than SIMD
    assert u2.dsp == min(math.ceil(pe / 4) * (8 // pe) for pe in (1, 2, 4, 8))


def test_cycle_budget_excludes_slow_foldings(tmp_path) -> None:
    from qonnx.custom_op.registry import getCustomOp

    from finn_flow.placement import options

    model = _mvau_model(tmp_path, [(192, 768)])
    inst = getCustomOp(model.graph.node[0])
    budget = 21 * 192 * 768 // 32  # needs at least 32 lanes: no 64-72-bit word is fast enough
    u, b = options(inst, PART, max_cycles=budget)
    assert u is None
    assert b.cycles <= budget and b.simd * b.pe >= 32


def test_plan_respects_the_uram_budget(tmp_path) -> None:
    """Three 192x768 layers (4 URAM each) and a budget of 9 blocks: two go to URAM, the
    third keeps BRAM."""
    from finn_flow.placement import plan

    model = _mvau_model(tmp_path, [(192, 768), (768, 192), (192, 768)])
    placed = plan(model, PART, max_cycles=10**9, uram_budget=9)
    styles = sorted(e["choice"]["ram_style"] for e in placed.values())
    assert styles == ["block", "ultra", "ultra"]
    for e in placed.values():
        ultra = e["choice"]["ram_style"] == "ultra"
        assert e["choice"]["runtime_writeable_weights"] == int(ultra)
        assert (e["uram"] > 0) == ultra and (e["bram18"] > 0) != ultra
    assert sum(e["uram"] for e in placed.values()) == 8


def test_choose_thresholds_takes_the_best_lut_per_bram_within_budget() -> None:
    """Hand-made options: B's move saves 400 LUT per block, A's first move 300, A's second
    (from its first) 25; the greedy order, the budget and the ratio floor decide."""
    from finn_flow.placement import ThresholdOption, choose_thresholds

    a = [ThresholdOption(0, 1000, 0), ThresholdOption(256, 400, 2), ThresholdOption(64, 300, 6)]
    b = [ThresholdOption(0, 500, 0), ThresholdOption(128, 100, 1)]
    got = choose_thresholds({"A": a, "B": b}, bram_budget=3, min_lut_per_bram=100)
    assert got == {"A": a[1], "B": b[1]}
    got = choose_thresholds({"A": a, "B": b}, bram_budget=2, min_lut_per_bram=100)
    assert got == {"A": a[0], "B": b[1]}  # after B, A's 2 blocks do not fit in the 1 left
    got = choose_thresholds({"A": a, "B": b}, bram_budget=100, min_lut_per_bram=350)
    assert got == {"A": a[0], "B": b[1]}
    got = choose_thresholds({"A": a, "B": b}, bram_budget=100, min_lut_per_bram=20)
    assert got == {"A": a[2], "B": b[1]}  # 100 LUT for 4 more blocks: 25 per block
    free = [ThresholdOption(0, 300, 1), ThresholdOption(64, 200, 1)]
    assert choose_thresholds({"F": free}, bram_budget=0, min_lut_per_bram=1e9)["F"] == free[1]


def test_threshold_options_closed_form(tmp_path) -> None:
    """32 per-channel tables of 255 16-bit thresholds, PE 1: stage s is 32 * 2^s deep; a
    stage in LUTRAM costs 16 * ceil(depth / 64) LUTs, one in BRAM the fewest BRAM_18K
    shapes; the comparators (8 stages x 16 bits) stay in LUTs."""
    import numpy as np
    from onnx import TensorProto, helper
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.basic import qonnx_make_model

    from finn_flow.finn_env import start_finn
    from finn_flow.placement import threshold_options

    start_finn(tmp_path / "finn")
    c, n, wt = 32, 255, 16
    node = helper.make_node(
        "Thresholding_rtl", ["x", "thr"], ["y"],
        domain="finn.custom_op.fpgadataflow.rtl", name="Thresholding_rtl_0",
        NumChannels=c, PE=1, numSteps=n, inputDataType="INT16", weightDataType=f"INT{wt}",
        outputDataType="UINT8", numInputVectors=[1, 21], depth_trigger_bram=0,
        depth_trigger_uram=0,
    )  # fmt: skip
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 21, c])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 21, c])
    model = ModelWrapper(qonnx_make_model(helper.make_graph([node], "g", [inp], [out])))
    thr = np.sort(np.random.default_rng(0).integers(-3000, 3000, size=(c, n)), axis=1)
    model.set_initializer("thr", thr.astype(np.float32))
    opts = threshold_options(model, model.graph.node[0])
    depths = [c * 2**s for s in range(8)]
    assert [o.depth_trigger_bram for o in opts] == [0, *sorted(depths, reverse=True)]
    bram_shapes = ((36, 512), (18, 1024), (9, 2048), (4, 4096), (2, 8192), (1, 16384))

    def bram(depth: int) -> int:  # the shape that wastes the fewest bits
        fits = [math.ceil(wt / w) * math.ceil(depth / d) for w, d in bram_shapes]
        waste = [k * w * d - wt * depth for k, (w, d) in zip(fits, bram_shapes, strict=True)]
        return fits[waste.index(min(waste))]

    logic = 8 * wt
    for opt in opts[1:]:
        in_bram = [d for d in depths if d >= opt.depth_trigger_bram]
        in_lut = [d for d in depths if d < opt.depth_trigger_bram]
        assert opt.bram18 == sum(bram(d) for d in in_bram)
        assert opt.lut == logic + sum(wt * math.ceil(d / 64) for d in in_lut)


def test_folding_mismatch_names_what_does_not_fit(tmp_path) -> None:
    """A folding JSON fits a design when it names exactly its foldable nodes and every
    PE / SIMD divides the node's MH / MW."""
    from finn_flow.steps import folding_mismatch

    model = _mvau_model(tmp_path, [(192, 768), (768, 192)])
    good = {"Defaults": {}, "MVAU_rtl_0": {"PE": 3, "SIMD": 3}, "MVAU_rtl_1": {"PE": 4}}
    assert folding_mismatch(model, good) is None
    other = {"Defaults": {}, "MVAU_rtl_0": {"PE": 1}, "MVAU_rtl_7": {"PE": 1}}
    why = folding_mismatch(model, other)
    assert "1 of its nodes are not in the design (first: ['MVAU_rtl_7'])" in why
    assert "1 of the design's are not in it (first: ['MVAU_rtl_1'])" in why
    bad_pe = {"Defaults": {}, "MVAU_rtl_0": {"PE": 5}, "MVAU_rtl_1": {"PE": 1}}
    assert folding_mismatch(model, bad_pe) == "MVAU_rtl_0: PE=5 does not divide MH=768"
    bad_simd = {"Defaults": {}, "MVAU_rtl_0": {"SIMD": 7}, "MVAU_rtl_1": {}}
    assert folding_mismatch(model, bad_simd) == "MVAU_rtl_0: SIMD=7 does not divide MW=192"


def test_set_folding_checks_the_json(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A malformed or foreign JSON the user named fails naming the file; the config's
    default JSON that does not fit falls back to auto-folding and says so."""
    import json

    model = _mvau_model(tmp_path, [(192, 64)])  # starts FINN first: steps imports finn-plus
    from finn_flow import BuildError, steps
    from finn_flow.report import StepRecords
    from finn_flow.steps import M3ViTBuildConfig, step_m3vit_set_folding

    def cfg(path, fallback=None):
        return M3ViTBuildConfig(
            output_dir=str(tmp_path / "out"), synth_clk_period_ns=5.0, fpga_part=PART,
            generate_outputs=[], folding_config_file=str(path),
            folding_fallback_fps=fallback,
        )  # fmt: skip

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BuildError, match=f"folding JSON {bad} cannot be read"):
        step_m3vit_set_folding(model, cfg(bad))
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"Defaults": {}, "MVAU_rtl_9": {"PE": 1}}))
    with pytest.raises(BuildError, match="was made for another design: 1 of its nodes"):
        step_m3vit_set_folding(model, cfg(foreign))
    # the fallback hands finn-plus's step an auto-folding config (its folder is not run
    # here: it needs a whole dataflow partition, which the build tests cover)
    seen = {}

    def fake_set_folding(m, c):
        seen.update(json=c.folding_config_file, fps=c.target_fps)
        return m

    monkeypatch.setattr(steps, "step_set_folding", fake_set_folding)
    step_m3vit_set_folding(model, cfg(foreign, fallback=1000.0))
    assert seen == {"json": None, "fps": 1000}
    rec = StepRecords.load(tmp_path / "out").folding
    assert rec["applied"] is False and rec["target_fps"] == 1000 and "MVAU_rtl_9" in rec["mismatch"]
    fits = tmp_path / "fits.json"
    fits.write_text(json.dumps({"Defaults": {}, "MVAU_rtl_0": {"PE": 4, "SIMD": 2}}))
    step_m3vit_set_folding(model, cfg(fits))
    assert seen == {"json": str(fits), "fps": None}
    assert StepRecords.load(tmp_path / "out").folding == {"json": str(fits), "applied": True}
