"""finn_flow/analyze_schedule.py: the three schedules on hand-made routings with answers
worked out by hand, the modelled-routing helpers, and the command line on a tiny config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from finn_flow.analyze_schedule import (
    EngineCosts,
    all_resident,
    reordered,
    sample_routing,
    stretch_profile,
    token_order,
)

REPO = Path(__file__).resolve().parents[1]
# 4 experts, k = 1, 160-byte experts over a 16-byte port: a fetch is 10 cycles; a row 3
COSTS = dict(experts=4, top_k=1, expert_bytes=160, axi_bytes=16, latency=0, row_cycles=3)


def test_alternating_two_experts() -> None:
    c = EngineCosts(tokens=4, **COSTS)
    ids = np.array([[0], [1], [0], [1]])
    a = token_order(c, ids)  # misses 0, 1; then hits
    assert (a["loads"], a["ddr_bytes"], a["onchip_bytes"]) == (2, 320, 320)
    # prologue 4; fetch 0: 4-14, row 14-17; fetch 1: 14-24, row 24-27; rows 27-30, 30-33
    assert (a["cycles_overlap"], a["cycles_serial"]) == (33, 4 + 2 * 10 + 4 * 3)
    b = reordered(c, ids)  # experts 0 and 1, two rows each
    # prologue 4 + 4 + 4 = 12; fetch 0: 12-22, rows 22-28; fetch 1: 22-32, rows 32-38
    assert (b["loads"], b["ddr_bytes"], b["onchip_bytes"]) == (2, 320, 320)
    assert (b["cycles_overlap"], b["cycles_serial"]) == (38, 12 + 2 * 10 + 4 * 3)
    r = all_resident(c, ids)
    assert (r["ddr_bytes"], r["onchip_bytes"], r["cycles_overlap"]) == (0, 640, 4 + 4 * 3)


def test_three_experts_thrash_a_two_slot_cache() -> None:
    c = EngineCosts(tokens=6, **COSTS)
    ids = np.array([[0], [1], [2], [0], [1], [2]])
    a = token_order(c, ids)  # LRU with 2 slots misses every access of 0, 1, 2, 0, 1, 2
    assert (a["loads"], a["ddr_bytes"]) == (6, 960)
    # fetches 6-16, 16-26, 26-36, 36-46, 46-56, 56-66 (each waits for the previous one);
    # the last row runs 66-69
    assert (a["cycles_overlap"], a["cycles_serial"]) == (69, 6 + 6 * 10 + 6 * 3)
    b = reordered(c, ids)  # each of 0, 1, 2 fetched once, 2 rows (6 cycles) each
    # prologue 6 + 4 + 6 = 16; fetch 16-26, 26-36, 36-46; rows 26-32, 36-42, 46-52
    assert (b["loads"], b["ddr_bytes"]) == (3, 480)
    assert (b["cycles_overlap"], b["cycles_serial"]) == (52, 16 + 3 * (10 + 6))


def test_top2_rank_order_and_empty_experts() -> None:
    c = EngineCosts(tokens=3, experts=8, top_k=2, expert_bytes=32, axi_bytes=16, latency=2,
                    row_cycles=1)  # fmt: skip
    ids = np.array([[5, 1], [1, 5], [5, 1]])  # only experts 1 and 5: never 6 empty ones
    assert reordered(c, ids)["loads"] == 2
    assert token_order(c, ids)["loads"] == 2  # both stay in the 2 slots
    assert token_order(c, ids, slots=1)["loads"] == 4  # 5, 1, (1), 5, (5), 1: four misses


def test_stretched_profile() -> None:
    flat = np.ones(16)
    for e in (4, 16, 64):
        q = stretch_profile(flat, e)
        assert q.shape == (e,) and np.allclose(q, 1 / e)
    skew = np.array([8.0, 4, 2, 1, 1, 0, 0, 0])
    q = stretch_profile(skew, 8)
    assert np.allclose(q, np.sort(skew / skew.sum())[::-1], atol=1e-9)
    q16 = stretch_profile(skew, 16)
    assert np.isclose(q16.sum(), 1) and q16[0] == pytest.approx(q[0] / 2, rel=1e-6)
    rng = np.random.default_rng(0)
    ids = sample_routing(q16, 200, 3, rng)
    assert ids.shape == (200, 3) and all(len(set(row)) == 3 for row in ids.tolist())


@pytest.mark.slow
def test_command_line_on_a_tiny_config(tmp_path: Path) -> None:
    from finn_flow import analyze_schedule

    fpga_cfg = (
        REPO / "configs" / "fpga" / "m3vit_vit-t16-6blk-moe16-top2-mg_fpga_synthnyud-64x80.py"
    )
    cfg = tmp_path / "tiny.py"
    cfg.write_text(
        f"_base_ = [{str(fpga_cfg)!r}]\n"
        "model = dict(backbone=dict(img_size=(32, 32), patch_size=16, embed_dims=16, "
        "num_layers=2, num_heads=1, moe_layers=[1], num_experts=4, top_k=2, "
        "expert_hidden_dims=8),\n"
        "  decode_heads=dict(semseg=dict(channels=8, num_up=0), depth=dict(channels=8, "
        "num_up=0), normals=dict(channels=8, num_up=0), edge=dict(channels=8, num_up=0)))\n"
        "fpga = dict(input_size=(32, 32))\n"
    )
    out = tmp_path / "out"
    rc = analyze_schedule.main(["--task", "depth", "--config", str(cfg), "--images", "2",
                                "--samples", "2", "--out", str(out)])  # fmt: skip
    assert rc == 0
    rep = json.loads((out / "schedule_analysis.json").read_text())
    assert rep["untrained_routing"] is True and rep["tokens"] == 5
    assert set(rep["measured"]) == {"semseg", "depth", "normals", "edge"}
    b = rep["measured"]["depth"]["all_layers"]["reordered_double_buffered"]
    assert b["onchip_bytes"] == 2 * rep["engine"]["expert_bytes"]
    sources = {(p["tokens"], p["experts"]): p["source"] for p in rep["scaling"]}
    assert sources[(21, 16)] == "modelled" and list(sources.values()).count("measured") == 0
    for name in ("ddr_bytes", "onchip_bytes", "cycles_overlap", "cycles_serial"):
        assert (out / f"schedule_{name}.png").stat().st_size > 1000
