"""The double-buffered schedule's cycle model against a cycle-by-cycle event simulation.

The simulation knows nothing of the closed-form recursion: it steps a clock, with one
DMA engine (one expert image at a time), two buffers (free -> loading -> ready ->
computing -> free) and one MAC array, and starts whatever may start on each cycle.
The worst case (get_exp_cycles) is checked against all routings of small cases.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from finn_flow.moe_ops.schedule import expert_counts, ffn_schedule, ffn_worst_case


def simulate(counts, load: int, row_cycles: int, prologue: int) -> dict:
    """Cycle-stepped: returns the finishing cycle and the (start, end) of every action."""
    experts = [e for e, c in enumerate(counts) if c > 0]
    buf = ["free", "free"]
    dma = cmp = None  # (index, finishes at)
    nxt_load = nxt_cmp = 0
    loads, computes = {}, {}
    t = 0
    while nxt_cmp < len(experts) or cmp is not None:
        # completions at the start of cycle t
        if dma is not None and dma[1] == t:
            buf[dma[0] % 2] = "ready"
            loads[dma[0]] = (loads[dma[0]], t)
            dma = None
        if cmp is not None and cmp[1] == t:
            buf[cmp[0] % 2] = "free"
            computes[cmp[0]] = (computes[cmp[0]], t)
            cmp = None
            if nxt_cmp == len(experts):
                break
        # starts
        if (
            t >= prologue
            and dma is None
            and nxt_load < len(experts)
            and buf[nxt_load % 2] == "free"
        ):
            buf[nxt_load % 2] = "loading"
            dma = (nxt_load, t + load)
            loads[nxt_load] = t
            nxt_load += 1
        if cmp is None and nxt_cmp < len(experts) and buf[nxt_cmp % 2] == "ready":
            buf[nxt_cmp % 2] = "computing"
            cmp = (nxt_cmp, t + counts[experts[nxt_cmp]] * row_cycles)
            computes[nxt_cmp] = t
            nxt_cmp += 1
        t += 1
    return {"end": t, "loads": loads, "computes": computes}


@pytest.mark.parametrize("seed", range(40))
def test_schedule_matches_event_simulation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    e = int(rng.integers(1, 9))
    counts = rng.integers(0, 6, e) * (rng.random(e) < 0.8)
    if counts.sum() == 0:
        counts[int(rng.integers(0, e))] = 1
    beats, latency = int(rng.integers(1, 40)), int(rng.integers(0, 12))
    row_cycles, prologue = int(rng.integers(1, 30)), int(rng.integers(0, 20))
    s = ffn_schedule(counts, beats, latency, row_cycles, prologue, bytes_per_beat=16)
    sim = simulate(counts.tolist(), beats + latency, row_cycles, prologue)
    assert s.total_cycles == sim["end"]
    for i, st in enumerate(s.steps):
        assert (st.load_start, st.load_end) == sim["loads"][i]
        assert (st.compute_start, st.compute_end) == sim["computes"][i]
    assert s.experts == [i for i, c in enumerate(counts) if c > 0]  # empty experts skipped
    assert s.load_bytes == len(s.steps) * beats * 16
    assert s.no_overlap_cycles == prologue + sum(
        (beats + latency) + c * row_cycles for c in counts if c
    )
    assert s.total_cycles <= s.no_overlap_cycles


def test_closed_cases() -> None:
    # load-bound: 3 experts x 1 row, L = 10, C = 2: loads back to back, last compute after
    s = ffn_schedule(np.array([1, 1, 1]), 10, 0, 2, 0, 16)
    assert s.total_cycles == 3 * 10 + 2
    # compute-bound: one load, then computes back to back
    s = ffn_schedule(np.array([5, 5, 5]), 2, 0, 10, 0, 16)
    assert s.total_cycles == 2 + 3 * 50
    # the second buffer blocks the third load until the first expert is done
    s = ffn_schedule(np.array([20, 1, 1]), 10, 0, 1, 0, 16)
    assert [st.load_start for st in s.steps] == [0, 10, 30]
    assert s.total_cycles == 41


@pytest.mark.parametrize("experts,rows", [(2, 3), (3, 4), (4, 5), (4, 6), (5, 4)])
@pytest.mark.parametrize("load,row_cycles", [(10, 1), (3, 7), (5, 5)])
def test_worst_case_is_the_maximum_over_all_routings(experts, rows, load, row_cycles) -> None:
    worst = 0
    for counts in itertools.product(range(rows + 1), repeat=experts):
        if sum(counts) != rows:
            continue
        worst = max(worst, simulate(list(counts), load, row_cycles, 3)["end"])
    got, _ = ffn_worst_case(experts, rows, load - 1, 1, row_cycles, 3)
    assert got == worst


def test_expert_counts_from_routing() -> None:
    ids = np.array([[0, 2], [2, 1], [2, 0]])
    routing = np.concatenate([ids, np.full_like(ids, 9)], axis=1)[None]
    assert expert_counts(routing, 4, 2).tolist() == [2, 1, 3, 0]
    with pytest.raises(ValueError, match="outside"):
        expert_counts(routing, 2, 2)
