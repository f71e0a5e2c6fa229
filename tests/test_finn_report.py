"""finn_flow.report: the MoE section and the DDR traffic of a build summary.

Inputs are hand-made layer reports and a hand-written FINN performance estimate, so the
expected sums and ratios are worked out here by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from finn_flow.report import moe_summary, performance, write_summary

DIMS = SimpleNamespace(moe_layers=(1, 3), num_experts=4, dim=16, expert_hidden=8)


def layer_report(index: int, worst: int, per_input: list[int], ddr: list[int]) -> dict:
    return {
        "layer": index,
        "cycles": {
            "worst_case": worst,
            "per_input": per_input,
            "mean": sum(per_input) / 2,
            "max": max(per_input),
        },  # fmt: skip
        "non_empty_experts_per_input": [3, 4],
        "expert_ddr_bytes_per_frame": {
            "worst": 4096,
            "per_input": ddr,
            "mean": sum(ddr) / 2,
            "max": max(ddr),
        },  # fmt: skip
        "onchip_expert_buffer_bytes": 2048,
        "ddr_image_bytes": 4096,
        "swap_check": {"inputs": 2, "identical": True},
        "thresholds": "shared",
        "folding": {"ExpertFFN": {"PE": 2, "SIMD": 4}},
    }


def test_reordered_moe_sums_over_layers() -> None:
    layers = [layer_report(0, 900, [500, 700], [3072, 4096]), layer_report(1, 800, [600, 650],
              [2048, 3072])]  # fmt: skip
    moe = moe_summary("reordered", layers, DIMS, 8)
    assert moe["form"] == "reordered"
    assert [x["block"] for x in moe["layers"]] == [1, 3]
    assert moe["layers"][0]["cycles_val_mean"] == 600 and moe["layers"][1]["cycles_val_max"] == 650
    assert moe["expert_ddr_bytes_per_frame"] == {"worst": 8192, "mean": 3584 + 2560}
    assert moe["onchip_expert_buffer_bytes"] == 4096


def test_standin_keeps_every_expert_on_chip() -> None:
    moe = moe_summary("standin", [], DIMS, 8)
    # per layer: E x (D*Hd + Hd*D + D) weights of 8 bits = 4 x (128 + 128 + 16) bytes
    assert [x["onchip_expert_weight_bytes"] for x in moe["layers"]] == [1088, 1088]
    assert moe["onchip_expert_buffer_bytes"] == 2176
    assert moe["expert_ddr_bytes_per_frame"] == {"worst": 0, "mean": 0}


def test_performance_counts_expert_weights(tmp_path: Path) -> None:
    (tmp_path / "estimate_network_performance.json").write_text(
        json.dumps({"max_cycles": 1000, "critical_path_cycles": 5000})
    )
    layers = [layer_report(0, 1000, [400, 700], [1000, 3000])]
    moe = moe_summary("reordered", layers, SimpleNamespace(**{**vars(DIMS), "moe_layers": (1,)}), 8)
    hw = [{"op_type": "MVAU_rtl", "cycles": 600}, {"op_type": "ExpertFFN_hls", "cycles": 1000}]
    p = performance(tmp_path, 5.0, 100, 20, moe, hw, 19.2)
    assert p["throughput_fps"] == pytest.approx(1e9 / (5.0 * 1000))
    assert p["ddr_bytes_per_frame"] == 120 + 4096
    assert p["ddr_bytes_per_frame_val_mean"] == 120 + 2000
    assert p["ddr_GBps_at_throughput"] == pytest.approx((120 + 4096) * 200_000 / 1e9)
    # at the measured routing the engine needs 700 cycles at most, the MVAU 600
    assert p["max_cycles_per_frame_val_routing"] == 700
    assert p["throughput_fps_val_routing"] == pytest.approx(1e9 / (5.0 * 700))
    standin = performance(tmp_path, 5.0, 100, 20, moe_summary("standin", [], DIMS, 8), hw, 19.2)
    assert standin["ddr_bytes_per_frame"] == 120 and "throughput_fps_val_routing" not in standin


def test_summary_lists_moe_layers_and_what_is_not_claimed(tmp_path: Path) -> None:
    moe = moe_summary("reordered", [layer_report(0, 900, [500, 700], [3072, 4096])],
                      SimpleNamespace(**{**vars(DIMS), "moe_layers": (1,)}), 8)  # fmt: skip
    summary = {
        "task": "normals", "board": "ZCU104", "status": "complete", "config": "c.py",
        "checkpoint": "x.pth", "finn": {"finn_version": "-", "vivado_present": False},
        "quantization": "-", "calibration": "-", "moe": moe,
        "pathway": {"description": "-", "moe_form": "reordered", "not_on_fpga": "-"},
    }  # fmt: skip
    write_summary(tmp_path, summary)
    md = (tmp_path / "SUMMARY.md").read_text()
    assert "| 0 (1) | 900 | 600 / 700 | [3, 4] | 4096 / 3584 | 2048 | identical on 2 images |" in md
    assert "## What this build does not claim" in md and "no RTL simulation" in md
