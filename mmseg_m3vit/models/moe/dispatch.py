"""The one table of MoE dispatch implementations, and the automatic choice.

All implementations compute the same function (contract in :mod:`.reference`):

- ``'fused'``: Triton kernels that gather, multiply and combine in one pass each
  (:mod:`.fused`; a bf16 training step runs plain products over sorted rows with the
  epilogues as row passes, weight gradients through ``torch._grouped_mm``); CUDA,
  bf16 compute;
- ``'grouped'``: ``torch._grouped_mm`` with gathers and combine around it
  (:mod:`.grouped`); CUDA, bf16 compute;
- ``'sorted'``: the portable reference (:func:`.reference.sorted_dispatch`);
- ``'loop'``: the per-expert-loop baseline of the benchmarks;
- ``'auto'`` (the default): per call, the first of fused, grouped, sorted that serves
  the inputs. bf16 (autocast) CUDA runs take the fused kernels; float32 runs and CPU
  runs keep the reference path and its float32 numerics.

Fused and grouped fall back to the sorted path themselves when they cannot serve a call.
"""

from __future__ import annotations

from torch import Tensor

from .fused import fused_dispatch, fused_expert_ffn, fused_usable
from .grouped import grouped_dispatch, grouped_expert_ffn, grouped_mm_usable
from .reference import DispatchFn, check_dispatch_inputs, expert_loop_dispatch, sorted_dispatch


def auto_dispatch(
    x: Tensor, expert_ids: Tensor, gates: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor
) -> Tensor:
    """Fused kernels where usable, else the grouped GEMM, else the sorted reference."""
    check_dispatch_inputs(x, expert_ids, gates, w1, b1, w2, b2)
    if fused_usable(x, w1):
        return fused_expert_ffn(x, expert_ids, gates, w1, b1, w2, b2)
    if grouped_mm_usable(x, w1):
        return grouped_expert_ffn(x, expert_ids, gates, w1, b1, w2, b2)
    return sorted_dispatch(x, expert_ids, gates, w1, b1, w2, b2)


DISPATCH_IMPLS: dict[str, DispatchFn] = {
    "auto": auto_dispatch,
    "fused": fused_dispatch,
    "grouped": grouped_dispatch,
    "sorted": sorted_dispatch,
    "loop": expert_loop_dispatch,
}


def get_dispatch(dispatch: str | DispatchFn) -> DispatchFn:
    """The dispatch function for a name of :data:`DISPATCH_IMPLS`, or ``dispatch``
    itself when it is already a callable with the dispatch signature."""
    if callable(dispatch):
        return dispatch
    try:
        return DISPATCH_IMPLS[dispatch]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown MoE dispatch {dispatch!r}; choose one of {sorted(DISPATCH_IMPLS)}"
        ) from None
