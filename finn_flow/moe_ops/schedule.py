"""Cycle model of the reordered, double-buffered expert-by-expert schedule.

Everything is counted in kernel clock cycles. One MoE layer's ``ExpertFFN`` does, per frame:

1. prologue: read the routing (T beats), prefix-sum the per-expert counts (E) and place
   the T*k (token, gate) pairs in expert order (T*k): ``T + E + T*k`` cycles;
2. for the non-empty experts ``n_1 < n_2 < ... < n_m`` (empty experts are never loaded):
   load expert ``n_i``'s image from DDR into buffer ``i mod 2`` (``L = latency + beats``
   cycles, one AXI beat per cycle) and compute its ``c_i`` rows
   (``C_i = c_i * row_cycles``, ``row_cycles = (Hd/PE)(D/SIMD) + (D/PE)(Hd/SIMD)``: fc1
   then fc2 on one PE x SIMD MAC array).

With one DMA engine and two buffers the recursion is (``Le_0 = prologue``, ``Ce_0 = Ce_-1
= prologue``)::

    load start    Ls_i = max(Le_{i-1}, Ce_{i-2})   # DMA free and buffer i mod 2 released
    load end      Le_i = Ls_i + L
    compute start Cs_i = max(Le_i, Ce_{i-1})       # weights present, MAC array free
    compute end   Ce_i = Cs_i + C_i

and the frame takes ``Ce_m`` cycles; without overlap it takes ``prologue + sum(L + C_i)``.
The recursion is max-plus linear, so ``Ce_m`` is the longest path through the DAG of
loads and computes. That gives the worst case over all routings in closed form: for a
fixed number m of non-empty experts and R = T*k rows, every path holds at least one
compute, and putting all rows beyond one per expert on one compute of the path adds
``row_cycles * (R - m)`` to it, so the worst case is
``max_m [makespan(m experts with one row each) + row_cycles * (R - m)]``,
``1 <= m <= min(E, R)`` (:func:`ffn_worst_case`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ExpertStep:
    """One non-empty expert in the schedule (cycles from the start of the frame)."""

    expert: int
    rows: int
    buffer: int
    load_beats: int
    load_cycles: int
    compute_cycles: int
    load_start: int
    load_end: int
    compute_start: int
    compute_end: int


@dataclass(frozen=True)
class FFNSchedule:
    """The double-buffered schedule of one frame (see the module docstring)."""

    steps: tuple[ExpertStep, ...]
    prologue_cycles: int
    total_cycles: int
    no_overlap_cycles: int
    load_bytes: int

    @property
    def experts(self) -> list[int]:
        """Non-empty experts in the order they are loaded (ascending id)."""
        return [s.expert for s in self.steps]

    def as_dict(self) -> dict:
        """JSON-ready form."""
        d = asdict(self)
        d["steps"] = [asdict(s) for s in self.steps]
        return d


def routing_ids(routing: np.ndarray, top_k: int) -> np.ndarray:
    """Expert ids (T, k) from a routing tensor (1, T, 2k) or (T, 2k) or ids (T, k)."""
    r = np.asarray(routing)
    r = r.reshape(-1, r.shape[-1])
    if r.shape[1] == 2 * top_k:
        r = r[:, :top_k]
    elif r.shape[1] != top_k:
        raise ValueError(f"routing of shape {routing.shape} has neither k={top_k} nor 2k columns")
    return r.astype(np.int64)


def expert_counts(routing: np.ndarray, num_experts: int, top_k: int) -> np.ndarray:
    """Rows per expert (E,) for a routing (see :func:`routing_ids`)."""
    ids = routing_ids(routing, top_k)
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise ValueError(f"expert ids outside [0, {num_experts}): {ids.min()}..{ids.max()}")
    return np.bincount(ids.ravel(), minlength=num_experts).astype(np.int64)


def ffn_schedule(
    counts: np.ndarray,
    load_beats: int,
    latency: int,
    row_cycles: int,
    prologue: int,
    bytes_per_beat: int,
) -> FFNSchedule:
    """Schedule of the non-empty experts of ``counts`` (rows per expert, ascending ids).

    Args:
        counts: (E,) rows per expert.
        load_beats: AXI beats of one expert image.
        latency: cycles from issuing an expert's read to its first beat.
        row_cycles: MAC-array cycles of one row (fc1 + fc2).
        prologue: cycles before the first load may start (routing read + ordering).
        bytes_per_beat: AXI data width in bytes.
    """
    load = latency + load_beats
    steps = []
    le_prev = prologue
    ce = [prologue, prologue]  # Ce_{i-2}, Ce_{i-1}
    for i, e in enumerate(int(x) for x in np.flatnonzero(np.asarray(counts) > 0)):
        rows = int(counts[e])
        ls = max(le_prev, ce[0])
        le = ls + load
        cs = max(le, ce[1])
        cc = rows * row_cycles
        cend = cs + cc
        steps.append(ExpertStep(e, rows, i % 2, load_beats, load, cc, ls, le, cs, cend))
        le_prev = le
        ce = [ce[1], cend]
    total = steps[-1].compute_end if steps else prologue
    no_overlap = prologue + sum(s.load_cycles + s.compute_cycles for s in steps)
    return FFNSchedule(
        tuple(steps), prologue, total, no_overlap, len(steps) * load_beats * bytes_per_beat
    )


def ffn_worst_case(
    num_experts: int, rows: int, load_beats: int, latency: int, row_cycles: int, prologue: int
) -> tuple[int, int]:
    """Worst case over all routings of R = ``rows`` rows on E experts.

    Returns:
        (cycles, m): the largest frame time and the number of non-empty experts that
        reaches it (see the module docstring for why this is the maximum).
    """
    best, best_m = -1, 0
    for m in range(1, min(num_experts, rows) + 1):
        counts = np.ones(m, dtype=np.int64)
        sched = ffn_schedule(counts, load_beats, latency, row_cycles, prologue, 1)
        cyc = sched.total_cycles + row_cycles * (rows - m)
        if cyc > best:
            best, best_m = cyc, m
    return best, best_m
