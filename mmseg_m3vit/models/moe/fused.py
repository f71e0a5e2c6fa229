"""Fused MoE dispatch: Triton kernels that gather, multiply and combine in one pass each.

Same contract as :func:`.reference.sorted_dispatch` (M tokens, D dims, Hd expert hidden
dims, E experts, k slots)::

    x (M, D), expert_ids (M, k) int, gates (M, k)
    w1 (E, D, Hd), b1 (E, Hd), w2 (E, Hd, D), b2 (E, D)
    -> (M, D) = sum_j gates[m, j] * (GELU(x[m] @ w1[e] + b1[e]) @ w2[e] + b2[e]),
       e = expert_ids[m, j]

Forward, with no host synchronisation (so a CUDA graph can capture it):

1. a stable counting sort of the M*k assignments by expert (two small kernels);
2. one grouped GEMM that gathers each assignment's token row while loading its operand
   and applies ``+ b1``, the exact GELU (and keeps the pre-activation for backward);
3. one grouped GEMM for ``@ w2 + b2`` that writes each row to its (token, slot) place;
4. one kernel that sums each token's k rows weighted by its gates.

Backward (all products in Triton, :data:`TRAIN_MATMULS` ``'triton'``): the gate
gradient (row dot products), one grouped GEMM for the hidden-layer
gradient with the gate scale and GELU' in its epilogue, two weight-gradient kernels
(with the bias gradients; each expert's rows split over several programs that add
their partial products with fp32 atomics), one grouped GEMM for the input rows and
one slot sum.

A bf16 training step takes other products (:data:`TRAIN_MATMULS`). All of them work on
rows that one gather kernel put in sorted order (x's rows, kept for the backward, k
times the memory of x; gate-scaled ``dout`` rows with the ``b2`` gradient as column
sums and the gate gradient as row dot products), add ``b2`` in the slot sum, and take
both weight gradients from ``torch._grouped_mm`` (CUTLASS on sm90, bf16 results as
autocast's dense layers give them) on a second CUDA stream (:data:`TRAIN_STREAMS`).

- ``'split'`` (default): four plain grouped products over sorted rows (``@ w1``,
  ``@ w2``, ``@ w2^T``, ``@ w1^T``; :data:`ROW_PRODUCTS`: the Triton GEMM or
  ``torch._grouped_mm``) and the hidden layer's epilogues as passes over the sorted
  rows (``+ b1`` and GELU; GELU' with the ``b1`` gradient as column sums). ``x @ w1``
  without ``b1`` is kept for the backward.
- ``'mixed'``: the two hidden-layer products are Triton GEMMs with those epilogues
  fused (keeping the pre-activation), the other two as in ``'split'``.
- ``'triton'``: the all-Triton backward above.

Inference (:func:`fused_top_k`): the router's softmax, top-k and the sort's histogram
run in one kernel before the same forward.
Operands are bf16 with fp32 accumulation; weight gradients are written in fp32 (bf16
with the ``'split'`` and ``'mixed'`` products), bias gradients in fp32, and both
returned in the parameters' dtype. The kernels are in :mod:`.fused_kernels`;
this path is used for CUDA tensors computed in bf16 (:func:`fused_usable`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

from .reference import check_dispatch_inputs, matmul_dtype, sorted_dispatch

try:  # torch's CUDA wheels ship triton; CPU installs usually do not
    import triton

    from . import fused_kernels as kernels
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    kernels = None

#: Whether the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``), which
#: the tests use to check them without a GPU.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Tile shapes (rows x columns x reduction, warps, pipeline stages) of the grouped GEMM
#: and weight-gradient kernels, from the tile sweep of
#: ``tools/analysis_tools/benchmark_moe.py --tile-sweep`` on an H200 (benchmarks/RESULTS.md).
#: ``SPLIT`` of the weight-gradient kernels: sorted rows per program (each expert's row
#: reduction split over programs that add into fp32 with atomics), 0 = one program per
#: expert and tile.
GEMM_TILES = dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)
#: Tiles of the two epilogue GEMMs of a ``'mixed'`` training step (:data:`TRAIN_MATMULS`):
#: smaller programs, so that one program's epilogue overlaps another's main loop on the
#: same SM (fwd+bwd 0.487 vs 0.499 ms at :data:`GEMM_TILES`, ``benchmark_moe.py
#: --variants``; for inference's forward the larger tiles measured faster).
TRAIN_GEMM_TILES = dict(BM=64, BN=128, BK=64, num_warps=4, num_stages=4)
WGRAD_TILES = dict(BM=128, BN=128, BK=64, num_warps=4, num_stages=3, SPLIT=512)
_ROWS_CFG = dict(BR=16, BD=128, num_warps=4)
# gather (with column sums) and hidden-layer row passes: the fastest of the tiles timed
# alone on the H200 (benchmarks/RESULTS.md, "Split training products")
_GATHER_CFG = dict(BM=32, BN=128, num_warps=2)
_ROWS_TILE_CFG = dict(BM=16, BN=128, num_warps=2)
#: Whether the backward of the split / mixed training products runs both weight
#: gradients on a second CUDA stream, beside the hidden-layer GEMM, the input product
#: and the slot sum on the current one (torch's grouped GEMM runs a weight gradient on
#: 96 of an H200's 132 SMs). Joined on the current stream, with no host synchronisation.
TRAIN_STREAMS = True
#: The plain products over sorted rows of the split / mixed training step (``x @ w1``,
#: ``h @ w2``, ``@ w2^T``, ``@ w1^T``; the mixed step has only the last three):
#: ``'triton'`` = the Triton grouped GEMM with :data:`PLAIN_GEMM_TILES`,
#: ``'cutlass'`` = ``torch._grouped_mm`` (whose 128x256 tiles waste a quarter of the
#: work at N = 384; fwd+bwd 0.454 vs 0.422 ms, ``benchmark_moe.py --variants``). The
#: weight gradients always take ``torch._grouped_mm``.
ROW_PRODUCTS = "triton"
#: Tiles of that Triton GEMM (128x128x64 with 8 warps: 0.417 vs 0.426 ms fwd+bwd for
#: 64x128x64 with 4 warps, ``benchmark_moe.py --variants``, two runs agreeing).
PLAIN_GEMM_TILES = dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
#: Matrix products of a bf16 training step (forward with autograd, and backward; see
#: the module docstring): ``'split'`` = plain grouped products with the hidden
#: layer's bias, GELU and GELU' in passes over the sorted rows; ``'mixed'`` = those
#: epilogues fused into two Triton GEMMs; ``'triton'`` = every product in the Triton
#: kernels (gathers on load, fp32 weight gradients). Float32 operands and inference
#: always use the Triton kernels.
TRAIN_MATMULS = "split"
TRAIN_MATMULS_CHOICES = ("split", "mixed", "triton")
_SORT_BLOCK_ELEMS = 8192  # BLOCK x E_P2 one-hot elements per sort program


def fused_usable(x: Tensor, w1: Tensor) -> bool:
    """Whether :func:`fused_expert_ffn` serves this call: triton is installed, the
    tensors are on CUDA (or the Triton interpreter is on), the matmuls run in bf16
    (bf16 inputs or bf16 autocast) and D, Hd are multiples of 8 (16-byte rows)."""
    return (
        kernels is not None
        and (x.is_cuda or INTERPRET)
        and matmul_dtype(x) == torch.bfloat16
        and x.shape[1] % 8 == 0
        and w1.shape[2] % 8 == 0
    )


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def sort_block(num_experts: int) -> int:
    """Assignments per program of the counting sort (a power of two)."""
    return max(16, _SORT_BLOCK_ELEMS // max(_next_pow2(num_experts), 2))


class ExpertSort:
    """Sorted layout of the (token, slot) assignments, computed on the device.

    ``hist``: the per-block expert histogram (blocks of :func:`sort_block` assignments,
    (blocks, E rounded up to a power of two) int32) when the gate kernel already
    counted it (:func:`fused_top_k`); else the first sort kernel computes it.

    Attributes:
        order: (R,) int32 flat index ``m*k + j`` at each sorted position.
        inv: (R,) int32 sorted position of each flat index (``inv[order[r]] = r``).
        offs: (E+1,) int32 first sorted position of each expert; ``offs[E] = R``.
        ids: (R,) the expert ids in flat order.
        num_experts: E. top_k: k.
    """

    def __init__(self, expert_ids: Tensor, num_experts: int, hist: Tensor | None = None) -> None:
        m, k = expert_ids.shape
        r = m * k
        ids = expert_ids.reshape(-1)
        e_p2 = max(_next_pow2(num_experts), 2)
        block = sort_block(num_experts)
        blocks = triton.cdiv(r, block) if r else 0
        self.ids = ids
        self.order = torch.empty(r, dtype=torch.int32, device=ids.device)
        self.inv = torch.empty(r, dtype=torch.int32, device=ids.device)
        self.offs = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device)
        self.num_experts, self.top_k = num_experts, k
        if r == 0:
            return
        if hist is None:
            hist = torch.empty(blocks, e_p2, dtype=torch.int32, device=ids.device)
            kernels.expert_histogram_kernel[(blocks,)](ids, hist, r, E_P2=e_p2, BLOCK=block)
        elif tuple(hist.shape) != (blocks, e_p2):
            raise ValueError(
                f"ExpertSort: hist of shape {tuple(hist.shape)}, need {(blocks, e_p2)}"
            )
        kernels.expert_place_kernel[(blocks,)](
            ids,
            hist,
            self.order,
            self.inv,
            self.offs,
            r,
            blocks,
            E=num_experts,
            E_P2=e_p2,
            BLOCK=block,
            S_CHUNK=64,
        )


def _gemm(
    a: Tensor,
    sort: ExpertSort,
    w: Tensor,
    transpose_w: bool,
    out: Tensor,
    *,
    gather_a: bool,
    scatter_out: bool,
    bias: Tensor | None = None,
    gelu: bool = False,
    pre: Tensor | None = None,
    save_pre: bool = False,
    scale: Tensor | None = None,
    gelu_grad: bool = False,
    col_sum: Tensor | None = None,
    tiles: dict | None = None,
) -> None:
    """One :func:`.fused_kernels.expert_gemm_kernel` launch over all sorted rows
    (``tiles``: its tile shape, default :data:`GEMM_TILES`).

    ``w`` (E, K, N), or (E, N, K) used transposed when ``transpose_w``. ``col_sum``
    (E, N) fp32 zeros: add each expert's column sums of the written rows.
    """
    e = w.shape[0]
    if transpose_w:
        n, k = w.shape[1], w.shape[2]
        s_k, s_n = w.stride(2), w.stride(1)
    else:
        k, n = w.shape[1], w.shape[2]
        s_k, s_n = w.stride(1), w.stride(2)
    r = sort.order.shape[0]
    cfg = tiles or GEMM_TILES
    tiles = triton.cdiv(r, cfg["BM"]) + e
    grid = (tiles * triton.cdiv(n, cfg["BN"]),)
    dummy = out
    kernels.expert_gemm_kernel[grid](
        a,
        a.stride(0),
        sort.order,
        sort.offs,
        w,
        w.stride(0),
        s_k,
        s_n,
        bias if bias is not None else dummy,
        scale if scale is not None else dummy,
        pre if pre is not None else dummy,
        out,
        out.stride(0),
        col_sum if col_sum is not None else dummy,
        n,
        k,
        E=e,
        E_P2=max(_next_pow2(e), 2),
        TOP_K=sort.top_k,
        GATHER_A=gather_a,
        SCATTER_OUT=scatter_out,
        HAS_BIAS=bias is not None,
        GELU=gelu,
        SAVE_PRE=save_pre,
        SCALE_ROWS=scale is not None,
        GELU_GRAD=gelu_grad,
        COL_SUMS=col_sum is not None,
        **cfg,
    )


def _gather(
    src: Tensor,
    sort: ExpertSort,
    dtype: torch.dtype,
    scale: Tensor | None = None,
    col_sum: Tensor | None = None,
    dot: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """(R, N) rows ``src[order[r] // k]`` (times ``scale[order[r]]``) in sorted order,
    in ``dtype``; ``col_sum`` (E, N) fp32 zeros: add each expert's column sums.

    ``dot`` = (y (R, N) sorted, bias (E, N), out (M*k,)): also
    ``out[order[r]] = <src[order[r] // k], y[r] + bias[e]>`` (the gate gradient)."""
    r, n = sort.order.shape[0], src.shape[1]
    out = torch.empty(r, n, dtype=dtype, device=src.device)
    if r == 0:
        return out
    cfg = _GATHER_CFG
    col_programs = 1 if dot is not None else triton.cdiv(n, cfg["BN"])
    grid = (triton.cdiv(r, cfg["BM"]) + sort.num_experts, col_programs)
    y, bias, dot_out = dot if dot is not None else (src, src, src)
    kernels.gather_rows_kernel[grid](
        src,
        src.stride(0),
        sort.order,
        sort.offs,
        scale if scale is not None else src,
        out,
        col_sum if col_sum is not None else out,
        y,
        bias,
        dot_out,
        n,
        E=sort.num_experts,
        E_P2=max(_next_pow2(sort.num_experts), 2),
        TOP_K=sort.top_k,
        SCALE=scale is not None,
        COL_SUMS=col_sum is not None,
        DOT=dot is not None,
        **cfg,
    )
    return out


def _bias_gelu(
    z: Tensor,
    bias: Tensor,
    sort: ExpertSort,
    grad: Tensor | None = None,
    col_sum: Tensor | None = None,
) -> Tensor:
    """Hidden layer of sorted rows z (R, Hd) of ``x @ w1`` without the bias:
    ``GELU(z + bias[e])``, or with ``grad`` (R, Hd) ``grad * GELU'(z + bias[e])``;
    (R, Hd) in z's dtype. ``col_sum`` (E, Hd) fp32 zeros: add each expert's column sums
    of the result (the bias gradient)."""
    r, n = z.shape
    out = torch.empty_like(z)
    if r == 0:
        return out
    cfg = _ROWS_TILE_CFG
    grid = (triton.cdiv(r, cfg["BM"]) + sort.num_experts, triton.cdiv(n, cfg["BN"]))
    kernels.bias_gelu_rows_kernel[grid](
        z,
        bias,
        grad if grad is not None else z,
        out,
        col_sum if col_sum is not None else out,
        sort.offs,
        n,
        E=sort.num_experts,
        E_P2=max(_next_pow2(sort.num_experts), 2),
        GRAD=grad is not None,
        COL_SUMS=col_sum is not None,
        **cfg,
    )
    return out


def _train_products(cd: torch.dtype, device: torch.device) -> str:
    """The products a training step takes: :data:`TRAIN_MATMULS` for bf16 operands
    with a torch that has ``_grouped_mm``, else ``'triton'``."""
    if TRAIN_MATMULS not in TRAIN_MATMULS_CHOICES:
        raise ValueError(
            f"fused.TRAIN_MATMULS = {TRAIN_MATMULS!r}; expected one of {TRAIN_MATMULS_CHOICES}"
        )
    if ROW_PRODUCTS not in ("triton", "cutlass"):
        raise ValueError(f"fused.ROW_PRODUCTS = {ROW_PRODUCTS!r}; expected 'triton' or 'cutlass'")
    if (
        cd == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and (device.type == "cuda" or INTERPRET)
    ):
        return TRAIN_MATMULS
    return "triton"


def _row_product(a: Tensor, w: Tensor, sort: ExpertSort) -> Tensor:
    """(R, N) = rows of expert e of ``a`` (R, K, sorted) @ ``w[e]`` (E, K, N, any
    strides), through ``torch._grouped_mm`` or the Triton GEMM (:data:`ROW_PRODUCTS`)."""
    if a.shape[0] == 0:
        return a.new_empty(0, w.shape[2])
    if ROW_PRODUCTS == "triton":
        out = a.new_empty(a.shape[0], w.shape[2])
        _gemm(a, sort, w, False, out, gather_a=False, scatter_out=False, tiles=PLAIN_GEMM_TILES)
        return out
    return torch._grouped_mm(a, w, offs=sort.offs[1:])


def _grouped_wgrad(a: Tensor, b: Tensor, sort: ExpertSort, dtype: torch.dtype) -> Tensor:
    """(E, K1, N1) per-expert ``A_e^T @ B_e`` of sorted rows a (R, K1), b (R, N1)
    through ``torch._grouped_mm`` (groups along the reduction; bf16 result, converted
    to ``dtype``). An expert with no rows gets zeros: the library writes them for an
    empty group (CUTLASS on sm90 and the CPU fallback; the GPU tests check it)."""
    if a.shape[0] == 0:
        e = sort.num_experts
        return torch.zeros(e, a.shape[1], b.shape[1], dtype=dtype, device=a.device)
    return torch._grouped_mm(a.t(), b, offs=sort.offs[1:]).to(dtype)


def _fork(fn: Callable[[], Tensor], on_side: bool) -> Tensor:
    """``fn()``, on a second CUDA stream when ``on_side``, after the work queued so far
    on the current stream. The caller must :func:`_join` before the tensors fn reads
    or returns are freed or used on the current stream: then the caching allocator's
    stream-ordered reuse stays safe without ``record_stream`` (whose deferred frees
    grow the pool while the host runs ahead of the GPU)."""
    if not on_side:
        return fn()
    main = torch.cuda.current_stream()
    side = _SIDE_STREAMS.get(main.device)
    if side is None:  # one per device, made on first use
        side = _SIDE_STREAMS[main.device] = torch.cuda.Stream(main.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        return fn()


def _join(on_side: bool) -> None:
    """Make the current stream wait for the work :func:`_fork` queued."""
    if on_side:
        main = torch.cuda.current_stream()
        main.wait_stream(_SIDE_STREAMS[main.device])


def _wgrad(
    a: Tensor,
    b: Tensor,
    sort: ExpertSort,
    *,
    gather_a: bool,
    gather_b: bool,
    scale: Tensor | None,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """(dw (E, K1, N1), db (E, N1)) = per expert A_e^T @ B_e and column sums of B_e
    (in ``dtype``; in fp32 when the row reduction is split)."""
    e = sort.num_experts
    k1, n1 = a.shape[1], b.shape[1]
    cfg = dict(WGRAD_TILES)
    split = cfg["SPLIT"]
    tiles = triton.cdiv(k1, cfg["BM"]) * triton.cdiv(n1, cfg["BN"])
    if split:  # partial sums are added with atomics: fp32 buffers that start at zero
        dw = torch.zeros(e * k1 * n1 + e * n1, dtype=torch.float32, device=a.device)
        dw, db = dw[: e * k1 * n1].view(e, k1, n1), dw[e * k1 * n1 :].view(e, n1)
        grid = (tiles, triton.cdiv(sort.order.shape[0], split) + e)
    else:
        dw = torch.empty(e, k1, n1, dtype=dtype, device=a.device)
        db = torch.empty(e, n1, dtype=dtype, device=a.device)
        grid = (tiles, e)
    kernels.expert_wgrad_kernel[grid](
        a,
        a.stride(0),
        b,
        b.stride(0),
        sort.order,
        sort.offs,
        scale if scale is not None else b,
        dw,
        db,
        k1,
        n1,
        E=e,
        E_P2=max(_next_pow2(e), 2),
        TOP_K=sort.top_k,
        GATHER_A=gather_a,
        GATHER_B=gather_b,
        SCALE_B=scale is not None,
        HAS_DB=True,
        **cfg,
    )
    return dw, db


def _combine(
    y: Tensor,
    gates: Tensor | None,
    m: int,
    k: int,
    dtype: torch.dtype,
    sort: ExpertSort | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """(M*k, D) rows -> (M, D) sums over the k slots (gate-weighted), each row plus its
    expert's ``bias`` (E, D) when given. y in flat order, or in sorted order when
    ``sort`` is given."""
    d = y.shape[1]
    out = torch.empty(m, d, dtype=dtype, device=y.device)
    if m == 0:
        return out
    if bias is not None and sort is None:
        raise ValueError("_combine: the bias needs the sort (the rows' experts)")
    cfg = _ROWS_CFG
    grid = (triton.cdiv(m, cfg["BR"]), triton.cdiv(d, cfg["BD"]))
    kernels.slot_combine_kernel[grid](
        y,
        gates if gates is not None else y,
        sort.inv if sort is not None else y,
        sort.ids if sort is not None else y,
        bias if bias is not None else y,
        out,
        m,
        d,
        TOP_K=k,
        HAS_G=gates is not None,
        SORTED_Y=sort is not None,
        HAS_BIAS=bias is not None,
        **cfg,
    )
    return out


def _forward(
    x: Tensor,
    gates: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    sort: ExpertSort,
    save: bool,
    cd: torch.dtype,
    products: str = "triton",
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Fused forward with operands in ``cd``; returns (out (M, D) in ``cd``, the tensors
    the backward needs when ``save``).

    ``products`` (:data:`TRAIN_MATMULS`): with ``'split'`` and ``'mixed'`` x's rows
    are gathered into sorted order once (kept for the weight gradient), and ``h @ w2``
    is a plain product over sorted rows (:func:`_row_product`) with ``b2`` added in
    the slot sum; ``'split'`` also multiplies ``@ w1`` that way and applies ``+ b1``
    and GELU in a separate pass (keeping ``x @ w1`` instead of the pre-activation).
    With ``'triton'`` the first GEMM gathers x's rows on load and the second adds
    ``b2`` and writes rows in flat order.
    """
    m, k = gates.shape
    r = m * k
    hd = w1.shape[2]
    w1b, b1b, w2b, b2b = (t.to(cd).contiguous() for t in (w1, b1, w2, b2))
    gb = gates.to(cd).contiguous()
    if products in ("split", "mixed"):
        xs = _gather(x, sort, cd)  # (R, D) sorted rows, converted on the way
        if products == "split":
            pre = _row_product(xs, w1b, sort)  # x @ w1 without b1
            h = _bias_gelu(pre, b1b, sort)
        else:
            h = torch.empty(r, hd, dtype=cd, device=x.device)
            pre = torch.empty(r, hd, dtype=cd, device=x.device) if save else None
            if r:
                _gemm(xs, sort, w1b, False, h, gather_a=False, scatter_out=False, bias=b1b,
                      gelu=True, pre=pre, save_pre=save, tiles=TRAIN_GEMM_TILES)  # fmt: skip
        y = _row_product(h, w2b, sort)  # (R, D) sorted, without b2
        out = _combine(y, gb, m, k, cd, sort=sort, bias=b2b)
        return out, ((xs, gb, w1b, b1b, w2b, b2b, pre, h, y) if save else ())
    h = torch.empty(r, hd, dtype=cd, device=x.device)
    pre = torch.empty(r, hd, dtype=cd, device=x.device) if save else None
    xc = x.to(cd).contiguous()  # (a GEMM load converting fp32 rows measured slower)
    y = torch.empty(r, x.shape[1], dtype=cd, device=x.device)
    if r:
        _gemm(xc, sort, w1b, False, h, gather_a=True, scatter_out=False, bias=b1b,
              gelu=True, pre=pre, save_pre=save)  # fmt: skip
        _gemm(h, sort, w2b, False, y, gather_a=False, scatter_out=True, bias=b2b)
    out = _combine(y, gb, m, k, cd)
    return out, ((xc, gb, w1b, b1b, w2b, b2b, pre, h, y) if save else ())


class _FusedExpertFFN(torch.autograd.Function):
    """Autograd wrapper of the fused forward and backward (see the module docstring)."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        gates: Tensor,
        w1: Tensor,
        b1: Tensor,
        w2: Tensor,
        b2: Tensor,
        sort: ExpertSort,
        cd: torch.dtype,
    ) -> Tensor:
        ctx.products = _train_products(cd, x.device)
        out, saved = _forward(x, gates, w1, b1, w2, b2, sort, True, cd, ctx.products)
        ctx.save_for_backward(*saved)
        ctx.sort = sort
        ctx.dtypes = (x.dtype, gates.dtype, w1.dtype, b1.dtype, w2.dtype, b2.dtype)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        # x_: x (M, D), or its rows in sorted order (R, D) with the split / mixed
        # products; y likewise in flat order with b2, or sorted without; pre: the
        # pre-activation, or x @ w1 without b1 with the split products
        x_, gb, w1b, b1b, w2b, b2b, pre, h, y = ctx.saved_tensors
        sort: ExpertSort = ctx.sort
        products = ctx.products
        x_dtype, g_dtype, w1_dtype, b1_dtype, w2_dtype, b2_dtype = ctx.dtypes
        m, k = gb.shape
        r = m * k
        e, d, hd = w1b.shape
        cd = w1b.dtype
        db16 = dout.to(cd).contiguous()
        dgates = None
        if ctx.needs_input_grad[1]:
            dgates = torch.empty(m, k, dtype=g_dtype, device=dout.device)
        # the weight gradients on a second stream (TRAIN_STREAMS)
        side = TRAIN_STREAMS and products in ("split", "mixed") and dout.is_cuda and r > 0
        # dL/dpre = gate * (dout[token] @ w2[e]^T) * GELU'(pre), sorted rows
        if products in ("split", "mixed"):
            sums = torch.zeros(e * (d + hd), dtype=torch.float32, device=dout.device)
            db2, db1 = sums[: e * d].view(e, d), sums[e * d :].view(e, hd)
            dot = (y, b2b, dgates) if dgates is not None else None
            # gate * dout rows in sorted order, the b2 gradient and the gate gradient
            gds = _gather(db16, sort, cd, scale=gb, col_sum=db2, dot=dot)
            dw2 = _fork(lambda: _grouped_wgrad(h, gds, sort, w2_dtype), side)
            if products == "split":
                dh = _row_product(gds, w2b.transpose(1, 2), sort)
                dpre = _bias_gelu(pre, b1b, sort, grad=dh, col_sum=db1)
            else:
                dpre = torch.empty(r, hd, dtype=cd, device=dout.device)
                if r:
                    _gemm(gds, sort, w2b, True, dpre, gather_a=False, scatter_out=False,
                          pre=pre, gelu_grad=True, col_sum=db1,
                          tiles=TRAIN_GEMM_TILES)  # fmt: skip
            dw1 = _fork(lambda: _grouped_wgrad(x_, dpre, sort, w1_dtype), side)
        else:
            if dgates is not None and r:
                cfg = _ROWS_CFG
                kernels.slot_dot_kernel[(triton.cdiv(r, cfg["BR"]),)](
                    db16, y, dgates, r, d, TOP_K=k, **cfg
                )
            dpre = torch.empty(r, hd, dtype=cd, device=dout.device)
            if r:
                _gemm(db16, sort, w2b, True, dpre, gather_a=True, scatter_out=False, scale=gb,
                      pre=pre, gelu_grad=True)  # fmt: skip
            dw2, db2 = _wgrad(
                h, db16, sort, gather_a=False, gather_b=True, scale=gb, dtype=torch.float32
            )
            dw1, db1 = _wgrad(
                x_, dpre, sort, gather_a=True, gather_b=False, scale=None, dtype=torch.float32
            )
        dx = None
        if ctx.needs_input_grad[0]:
            if products in ("split", "mixed"):
                dxs = _row_product(dpre, w1b.transpose(1, 2), sort)  # sorted rows
                dx = _combine(dxs, None, m, k, x_dtype, sort=sort)
            else:
                dxs = torch.empty(r, d, dtype=cd, device=dout.device)
                if r:
                    _gemm(dpre, sort, w1b, True, dxs, gather_a=False, scatter_out=True)
                dx = _combine(dxs, None, m, k, x_dtype)
        _join(side)
        return (
            dx,
            dgates,
            dw1.to(w1_dtype),
            db1.to(b1_dtype),
            dw2.to(w2_dtype),
            db2.to(b2_dtype),
            None,
            None,
        )


def fused_expert_ffn(
    x: Tensor,
    expert_ids: Tensor,
    gates: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    compute_dtype: torch.dtype = torch.bfloat16,
    sort: ExpertSort | None = None,
) -> Tensor:
    """Dropless top-k expert FFN through the fused kernels (shapes: module docstring).

    Operands are cast to ``compute_dtype``: bf16 (the fast path), or float32, multiplied
    in full fp32 (slow; used to check the kernels to fp32 rounding). Returns (M, D) in
    ``compute_dtype``. Differentiable in ``x``, ``gates`` and all weights; the
    backward skips the input and gate kernels whose gradients are not needed. Runs
    where the kernels can (:func:`fused_usable` without the dtype condition).
    ``sort``: the sorted layout of ``expert_ids`` when already computed
    (:func:`fused_top_k`).
    """
    if sort is None:
        sort = ExpertSort(expert_ids, w1.shape[0])
    inputs = (x, gates, w1, b1, w2, b2)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _FusedExpertFFN.apply(*inputs, sort, compute_dtype)
    return _forward(*inputs, sort, False, compute_dtype)[0]


def fused_top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor, ExpertSort]:
    """Inference gate in one kernel: :func:`.gating.vmoe_top_k` without noise or
    statistics, plus the sorted layout of the chosen experts.

    logits (M, E) -> (expert_ids (M, k) int64, gates (M, k) in the logits' dtype,
    :class:`ExpertSort`). The softmax runs in fp32 and is rounded to the logits' dtype
    before the top-k, as in ``vmoe_top_k``; equal probabilities go to the lower expert
    index. No autograd (the gates carry no gradient to the router). When k is a power of
    two the gate kernel also counts the sort's per-block histogram (one launch less).
    """
    m, e = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    e_p2 = max(_next_pow2(e), 2)
    ids = torch.empty(m, k, dtype=torch.long, device=logits.device)
    gates = torch.empty(m, k, dtype=logits.dtype, device=logits.device)
    block = sort_block(e)
    fuse_hist = block % k == 0 and _next_pow2(k) == k
    block_m = block // k if fuse_hist else 64
    blocks = triton.cdiv(m, block_m) if m else 0
    hist = torch.empty(blocks, e_p2, dtype=torch.int32, device=logits.device) if fuse_hist else None
    if m:
        kernels.top_k_gate_kernel[(blocks,)](
            logits,
            logits.stride(0),
            ids,
            gates,
            hist if hist is not None else ids,
            m,
            E=e,
            E_P2=e_p2,
            TOP_K=k,
            BLOCK_M=block_m,
            HIST=fuse_hist,
        )
    return ids, gates, ExpertSort(ids, e, hist)


def fused_dispatch(
    x: Tensor, expert_ids: Tensor, gates: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor
) -> Tensor:
    """Dispatch entry point ``'fused'``: the fused kernels where :func:`fused_usable`,
    else :func:`.reference.sorted_dispatch` (same function in the input precision)."""
    check_dispatch_inputs(x, expert_ids, gates, w1, b1, w2, b2)
    if not fused_usable(x, w1):
        return sorted_dispatch(x, expert_ids, gates, w1, b1, w2, b2)
    return fused_expert_ffn(x, expert_ids, gates, w1, b1, w2, b2)
