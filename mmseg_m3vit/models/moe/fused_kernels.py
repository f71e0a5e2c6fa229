"""Triton kernels of the fused MoE FFN (:mod:`.fused`); importing this module needs triton.

Notation: M tokens, k slots per token, R = M*k (token, slot) assignments, E experts,
D model dims, Hd expert hidden dims. An assignment's *flat* index is ``m*k + j``; its
*sorted* position is its rank in the stable sort of the assignments by expert, so that
every expert's rows are one contiguous run ``[offs[e], offs[e+1])`` of sorted positions.
``order[r]`` is the flat index at sorted position r.

Kernels:

- :func:`expert_histogram_kernel` / :func:`expert_place_kernel`: a stable counting sort
  of the R expert ids in two launches (per-block histograms, then prefix sums and
  placement), writing ``order``, its inverse and ``offs`` with no host synchronisation.
- :func:`expert_gemm_kernel`: one grouped GEMM over the sorted rows, one expert per row
  tile. The A-operand rows are gathered on load (token ``order[r] // k``) or read in
  sorted order; the epilogue adds the expert bias, applies the exact (erf) GELU, scales
  rows by the gate, multiplies by GELU'(pre-activation) and writes rows either in sorted
  order or scattered to their flat index (so the slot combine reads contiguous rows).
- :func:`expert_wgrad_kernel`: per-expert weight gradients ``A_e^T @ B_e`` (rows of
  either operand gathered on load, B optionally gate-scaled) and the bias gradient,
  each expert's row reduction optionally split over several programs (fp32 atomics).
- :func:`top_k_gate_kernel`: softmax + top-k of the router logits (inference) and the
  per-block expert histogram of the counting sort, in one launch.
- :func:`gather_rows_kernel`: token rows (optionally gate-scaled) written in sorted
  order, with per-expert column sums (the operands of the weight gradients) and
  optionally the gate gradient (row dot products with the expert outputs).
- :func:`bias_gelu_rows_kernel`: ``GELU(z + b[e])`` of sorted rows, or its gradient
  ``g * GELU'(z + b[e])`` with the bias gradient as column sums (the hidden layer when
  the products run outside Triton).
- :func:`slot_combine_kernel`: ``out[m] = sum_j g[m, j] * (y[m*k + j] + b[e])`` (g and
  b optional; y in flat or in sorted order).
- :func:`slot_dot_kernel`: ``dg[m, j] = <dout[m], y[m*k + j]>`` (the gate gradient
  of the all-Triton step).

Matrix products take bf16 operands and accumulate in fp32.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

SQRT1_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
#: Triton's CPU interpreter (``TRITON_INTERPRET=1``, triton 3.6) multiplies bf16 tiles
#: wrongly and truncates fp32 -> bf16 conversions; there the operands are widened to
#: fp32 before ``tl.dot`` and stores round to nearest even explicitly (:func:`_round`).
_WIDEN_DOT = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _dot(a, b, acc):
    """acc + a @ b with fp32 accumulation; fp32 operands are multiplied in full fp32
    (not tf32), so that the float32 mode of the kernels is exact to fp32 rounding."""
    if _WIDEN_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _round(v, ty: tl.constexpr):
    """fp32 v converted to ty, rounding to nearest even (as the GPU converts) also in
    the interpreter, whose bf16 conversion truncates."""
    if _WIDEN_DOT:
        if ty == tl.bfloat16:
            b = v.to(tl.int32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
            v = tl.where(v != v, v, b.to(tl.float32, bitcast=True))  # NaN stays NaN
    return v.to(ty)


@triton.jit
def _gelu(x):
    """Exact GELU, 0.5 x (1 + erf(x / sqrt 2)), in fp32."""
    return 0.5 * x * (1.0 + tl.math.erf(x * SQRT1_2))


@triton.jit
def _gelu_grad(x):
    """d GELU / dx = Phi(x) + x phi(x), in fp32."""
    cdf = 0.5 * (1.0 + tl.math.erf(x * SQRT1_2))
    return cdf + x * INV_SQRT_2PI * tl.exp(-0.5 * x * x)


@triton.jit
def _store_tile(out_ptrs, v, mask, col_sum_ptrs, cmask, COL_SUMS: tl.constexpr):
    """Store the (BM, BN) tile v rounded to the output's dtype; with COL_SUMS add the
    column sums of the rounded values to ``col_sum_ptrs`` (BN,) with fp32 atomics
    (the last bits depend on the order of the additions)."""
    v = _round(v, out_ptrs.dtype.element_ty)
    tl.store(out_ptrs, v, mask=mask)
    if COL_SUMS:
        part = tl.sum(tl.where(mask, v.to(tl.float32), 0.0), axis=0)
        tl.atomic_add(col_sum_ptrs, part, mask=cmask, sem="relaxed")


@triton.jit
def expert_histogram_kernel(ids_ptr, hist_ptr, R, E_P2: tl.constexpr, BLOCK: tl.constexpr):
    """hist[s, e] = number of ids == e among ids[s*BLOCK : (s+1)*BLOCK]."""
    s = tl.program_id(0)
    idx = s * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + idx, mask=idx < R, other=E_P2).to(tl.int32)
    experts = tl.arange(0, E_P2)
    onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
    tl.store(hist_ptr + s * E_P2 + experts, tl.sum(onehot, axis=0))


@triton.jit
def expert_place_kernel(
    ids_ptr,
    hist_ptr,
    order_ptr,
    inv_ptr,
    offs_ptr,
    R,
    S,
    E: tl.constexpr,
    E_P2: tl.constexpr,
    BLOCK: tl.constexpr,
    S_CHUNK: tl.constexpr,
):
    """Stable placement: order[pos(i)] = i and inv[i] = pos(i) for the ids of block s;
    offs (E+1) from block 0.

    pos(i) = start[e] + (ids == e in blocks before s) + (ids == e before i in block s),
    e = ids[i], start = exclusive prefix sum of the expert totals.
    """
    s = tl.program_id(0)
    experts = tl.arange(0, E_P2)
    total = tl.zeros([E_P2], dtype=tl.int32)
    before = tl.zeros([E_P2], dtype=tl.int32)
    for s0 in range(0, S, S_CHUNK):
        blocks = s0 + tl.arange(0, S_CHUNK)
        h = tl.load(
            hist_ptr + blocks[:, None] * E_P2 + experts[None, :],
            mask=(blocks < S)[:, None],
            other=0,
        )
        total += tl.sum(h, axis=0)
        before += tl.sum(tl.where((blocks < s)[:, None], h, 0), axis=0)
    start = tl.cumsum(total, axis=0) - total
    if s == 0:
        tl.store(offs_ptr + experts, start, mask=experts < E)
        tl.store(offs_ptr + E, tl.sum(total, axis=0))
    idx = s * BLOCK + tl.arange(0, BLOCK)
    valid = idx < R
    ids = tl.load(ids_ptr + idx, mask=valid, other=E_P2).to(tl.int32)
    onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
    rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1
    base = tl.sum(onehot * (start + before)[None, :], axis=1)
    tl.store(order_ptr + base + rank, idx, mask=valid)
    tl.store(inv_ptr + idx, base + rank, mask=valid)


@triton.jit
def _row_tile(offs_ptr, t, E: tl.constexpr, E_P2: tl.constexpr, BM: tl.constexpr):
    """Expert e of row tile t (tiles of BM sorted rows, never straddling two experts),
    the tile's first sorted row and the expert's end row; e >= E when t is past the end."""
    experts = tl.arange(0, E_P2)
    starts = tl.load(offs_ptr + experts, mask=experts < E, other=0)
    ends = tl.load(offs_ptr + experts + 1, mask=experts < E, other=0)
    tiles = (ends - starts + BM - 1) // BM
    tile_end = tl.cumsum(tiles, axis=0)
    e = tl.sum((tile_end <= t).to(tl.int32), axis=0)
    sel = experts == e
    row_start = tl.sum(tl.where(sel, starts, 0), axis=0)
    row_end = tl.sum(tl.where(sel, ends, 0), axis=0)
    first_tile = tl.sum(tl.where(sel, tile_end - tiles, 0), axis=0)
    return e, row_start + (t - first_tile) * BM, row_end


@triton.jit
def expert_gemm_kernel(
    a_ptr,
    stride_am,
    order_ptr,
    offs_ptr,
    w_ptr,
    stride_we,
    stride_wk,
    stride_wn,
    bias_ptr,
    scale_ptr,
    pre_ptr,
    out_ptr,
    stride_om,
    col_sum_ptr,
    N,
    K,
    E: tl.constexpr,
    E_P2: tl.constexpr,
    TOP_K: tl.constexpr,
    GATHER_A: tl.constexpr,
    SCATTER_OUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    SCALE_ROWS: tl.constexpr,
    GELU_GRAD: tl.constexpr,
    COL_SUMS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """out[row(r)] = epilogue(A[src(r)] @ W[e]) for the sorted rows r of expert e.

    src(r) = order[r] // TOP_K (GATHER_A: the token) or r; row(r) = order[r]
    (SCATTER_OUT: the flat index) or r. W[e] is (K, N) with the given strides; A rows
    are converted to W's dtype as they are loaded (a no-op for the bf16 operands).
    Epilogue, in this order: + bias[e] (HAS_BIAS); store the pre-activation to
    ``pre[r]`` (SAVE_PRE); GELU; * scale[order[r]] (SCALE_ROWS); * GELU'(pre[r])
    (GELU_GRAD, ``pre`` read). COL_SUMS: add the column sums of the stored (rounded)
    rows to ``col_sum[e]`` (N,) with fp32 atomics (zeroed before; the last bits depend
    on the order of the additions). One program: BM rows x BN columns.
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    t = pid // num_n
    pid_n = pid % num_n
    e, row0, row_end = _row_tile(offs_ptr, t, E, E_P2, BM)
    if e >= E:
        return
    rows = row0 + tl.arange(0, BM)
    rmask = rows < row_end
    flat = tl.load(order_ptr + rows, mask=rmask, other=0)
    if GATHER_A:
        src = flat // TOP_K
    else:
        src = rows
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    ks = tl.arange(0, BK)
    a_ptrs = a_ptr + src.to(tl.int64)[:, None] * stride_am + ks[None, :]
    w_ptrs = w_ptr + e.to(tl.int64) * stride_we
    w_ptrs += ks[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kmask = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = _dot(a.to(w.dtype), w, acc)
        a_ptrs += BK
        w_ptrs += BK * stride_wk
    omask = rmask[:, None] & cmask[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + e * N + cols, mask=cmask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    pre_ptrs = pre_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    if SAVE_PRE:
        tl.store(pre_ptrs, _round(acc, pre_ptr.dtype.element_ty), mask=omask)
    if GELU:
        acc = _gelu(acc)
    if SCALE_ROWS:
        scale = tl.load(scale_ptr + flat, mask=rmask, other=0.0)
        acc = acc * scale.to(tl.float32)[:, None]
    if GELU_GRAD:
        pre = tl.load(pre_ptrs, mask=omask, other=0.0)
        acc = acc * _gelu_grad(pre.to(tl.float32))
    if SCATTER_OUT:
        orow = flat
    else:
        orow = rows
    out_ptrs = out_ptr + orow.to(tl.int64)[:, None] * stride_om + cols[None, :]
    _store_tile(out_ptrs, acc, omask, col_sum_ptr + e * N + cols, cmask, COL_SUMS)


@triton.jit
def gather_rows_kernel(
    src_ptr,
    stride_sm,
    order_ptr,
    offs_ptr,
    scale_ptr,
    out_ptr,
    col_sum_ptr,
    y_ptr,
    bias_ptr,
    dot_ptr,
    N,
    E: tl.constexpr,
    E_P2: tl.constexpr,
    TOP_K: tl.constexpr,
    SCALE: tl.constexpr,
    COL_SUMS: tl.constexpr,
    DOT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """out[r] = src[order[r] // TOP_K] (times scale[order[r]] with SCALE), computed in
    fp32 and rounded to out's dtype, for the sorted rows r (out (R, N) contiguous).

    Program (t, n): row tile t of BM sorted rows of one expert e (as the GEMM's tiles)
    and the column blocks n, n + G, n + 2G, ... of BN columns (G programs along axis
    1). COL_SUMS adds the tile's column sums of the stored rows to ``col_sum[e]`` (N,)
    with fp32 atomics (zeroed before). DOT (launch with G = 1): also the gate gradient
    ``dot[order[r]] = <src row, y[r] + bias[e]>`` over all N columns, fp32 sums of the
    unscaled source row and y (R, N) in sorted order.
    """
    e, row0, row_end = _row_tile(offs_ptr, tl.program_id(0), E, E_P2, BM)
    if e < E:
        rows = row0 + tl.arange(0, BM)
        rmask = rows < row_end
        flat = tl.load(order_ptr + rows, mask=rmask, other=0)
        src = (flat // TOP_K).to(tl.int64)
        if SCALE:
            scale = tl.load(scale_ptr + flat, mask=rmask, other=0.0).to(tl.float32)[:, None]
        dot = tl.zeros((BM,), dtype=tl.float32)
        for c0 in range(tl.program_id(1) * BN, N, tl.num_programs(1) * BN):
            cols = c0 + tl.arange(0, BN)
            cmask = cols < N
            mask = rmask[:, None] & cmask[None, :]
            v = tl.load(src_ptr + src[:, None] * stride_sm + cols[None, :], mask=mask, other=0.0)
            v = v.to(tl.float32)
            sorted_at = rows.to(tl.int64)[:, None] * N + cols[None, :]
            if DOT:
                y = tl.load(y_ptr + sorted_at, mask=mask, other=0.0).to(tl.float32)
                y += tl.load(bias_ptr + e * N + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
                dot += tl.sum(v * y, axis=1)
            if SCALE:
                v = v * scale
            _store_tile(out_ptr + sorted_at, v, mask, col_sum_ptr + e * N + cols, cmask, COL_SUMS)
        if DOT:
            tl.store(dot_ptr + flat, _round(dot, dot_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def bias_gelu_rows_kernel(
    z_ptr,
    bias_ptr,
    g_ptr,
    out_ptr,
    col_sum_ptr,
    offs_ptr,
    N,
    E: tl.constexpr,
    E_P2: tl.constexpr,
    GRAD: tl.constexpr,
    COL_SUMS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """Hidden layer of the sorted rows r of expert e, pre = z[r] + bias[e] in fp32:
    out[r] = GELU(pre), or with GRAD ``out[r] = g[r] * GELU'(pre)``; rounded to out's
    dtype. z, g, out: (R, N) contiguous, in sorted order. COL_SUMS adds each tile's
    column sums of the stored rows to ``col_sum[e]`` (N,) with fp32 atomics (zeroed
    before). Program (t, n): row tile t of BM rows of one expert, BN columns.
    """
    e, row0, row_end = _row_tile(offs_ptr, tl.program_id(0), E, E_P2, BM)
    if e < E:
        rows = row0 + tl.arange(0, BM)
        rmask = rows < row_end
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        cmask = cols < N
        mask = rmask[:, None] & cmask[None, :]
        at = rows.to(tl.int64)[:, None] * N + cols[None, :]
        pre = tl.load(z_ptr + at, mask=mask, other=0.0).to(tl.float32)
        pre += tl.load(bias_ptr + e * N + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if GRAD:
            v = tl.load(g_ptr + at, mask=mask, other=0.0).to(tl.float32) * _gelu_grad(pre)
        else:
            v = _gelu(pre)
        _store_tile(out_ptr + at, v, mask, col_sum_ptr + e * N + cols, cmask, COL_SUMS)


@triton.jit
def expert_wgrad_kernel(
    a_ptr,
    stride_am,
    b_ptr,
    stride_bm,
    order_ptr,
    offs_ptr,
    scale_ptr,
    dw_ptr,
    db_ptr,
    K1,
    N1,
    E: tl.constexpr,
    E_P2: tl.constexpr,
    TOP_K: tl.constexpr,
    GATHER_A: tl.constexpr,
    GATHER_B: tl.constexpr,
    SCALE_B: tl.constexpr,
    HAS_DB: tl.constexpr,
    SPLIT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """dw[e] (K1, N1) = A_e^T @ B_e and db[e] (N1) = column sums of B_e (fp32).

    A_e / B_e: the rows of expert e, gathered by token (GATHER_*) or read in sorted
    order; A is converted to B's dtype on load; B rows are scaled by scale[order[r]]
    (SCALE_B) and rounded to B's dtype before the product.

    SPLIT = 0: program (tile, e) computes one BM x BN tile of dw[e] over all of e's
    rows and stores it. SPLIT > 0: program (tile, c) takes chunk c of at most SPLIT
    sorted rows of one expert (chunks never straddle two experts, as the GEMM's row
    tiles) and adds its partial tile to dw / db with fp32 atomics (the buffers must
    start zeroed; the order of the additions, and so the last bits, may vary).
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(N1, BN)
    pid_m = pid // num_n
    pid_n = pid % num_n
    if SPLIT > 0:
        e, start, e_end = _row_tile(offs_ptr, tl.program_id(1), E, E_P2, SPLIT)
        if e >= E:
            return
        end = tl.minimum(start + SPLIT, e_end)
    else:
        e = tl.program_id(1)
        start = tl.load(offs_ptr + e)
        end = tl.load(offs_ptr + e + 1)
    cm = pid_m * BM + tl.arange(0, BM)
    cn = pid_n * BN + tl.arange(0, BN)
    mmask = cm < K1
    nmask = cn < N1
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    db = tl.zeros((BN,), dtype=tl.float32)
    for r0 in range(start, end, BK):
        rows = r0 + rk
        rmask = rows < end
        flat = tl.load(order_ptr + rows, mask=rmask, other=0)
        if GATHER_A:
            asrc = flat // TOP_K
        else:
            asrc = rows
        if GATHER_B:
            bsrc = flat // TOP_K
        else:
            bsrc = rows
        a = tl.load(
            a_ptr + asrc.to(tl.int64)[:, None] * stride_am + cm[None, :],
            mask=rmask[:, None] & mmask[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + bsrc.to(tl.int64)[:, None] * stride_bm + cn[None, :],
            mask=rmask[:, None] & nmask[None, :],
            other=0.0,
        )
        if SCALE_B:
            scale = tl.load(scale_ptr + flat, mask=rmask, other=0.0).to(tl.float32)
            b = _round(b.to(tl.float32) * scale[:, None], b_ptr.dtype.element_ty)
        acc = _dot(tl.trans(a.to(b.dtype)), b, acc)
        if HAS_DB:
            db += tl.sum(b.to(tl.float32), axis=0)
    dw_ptrs = dw_ptr + e.to(tl.int64) * K1 * N1 + cm[:, None] * N1 + cn[None, :]
    wmask = mmask[:, None] & nmask[None, :]
    if SPLIT > 0:
        tl.atomic_add(dw_ptrs, acc, mask=wmask, sem="relaxed")
        if HAS_DB:
            if pid_m == 0:
                tl.atomic_add(db_ptr + e * N1 + cn, db, mask=nmask, sem="relaxed")
    else:
        tl.store(dw_ptrs, _round(acc, dw_ptr.dtype.element_ty), mask=wmask)
        if HAS_DB:
            if pid_m == 0:
                tl.store(db_ptr + e * N1 + cn, _round(db, db_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def top_k_gate_kernel(
    logits_ptr,
    stride_lm,
    ids_ptr,
    gates_ptr,
    hist_ptr,
    M,
    E: tl.constexpr,
    E_P2: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HIST: tl.constexpr,
):
    """V-MoE gate of BLOCK_M tokens: softmax over the E logits in fp32, rounded to the
    gates' dtype, then the TOP_K largest (ties: the lower expert index first).

    Writes ids (M, TOP_K) int64 and gates (M, TOP_K), highest first; with HIST also
    hist[s, e] = the number of assignments to e among this block's M*TOP_K flat ones
    (the first pass of :func:`expert_place_kernel`, for blocks of BLOCK_M * TOP_K).
    """
    s = tl.program_id(0)
    rows = s * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    cols = tl.arange(0, E_P2)
    cmask = cols < E
    x = tl.load(
        logits_ptr + rows.to(tl.int64)[:, None] * stride_lm + cols[None, :],
        mask=rmask[:, None] & cmask[None, :],
        other=0.0,
    ).to(tl.float32)
    x = tl.where(cmask[None, :], x, float("-inf"))
    mx = tl.max(x, axis=1)
    ex = tl.exp(x - mx[:, None])
    p = ex / tl.sum(ex, axis=1)[:, None]
    p = _round(p, gates_ptr.dtype.element_ty).to(tl.float32)
    p = tl.where(cmask[None, :], p, -1.0)
    counts = tl.zeros([E_P2], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, axis=1)
        idx = tl.min(tl.where(p == best[:, None], cols[None, :], E_P2), axis=1)
        f = rows.to(tl.int64) * TOP_K + j
        tl.store(ids_ptr + f, idx.to(tl.int64), mask=rmask)
        tl.store(gates_ptr + f, _round(best, gates_ptr.dtype.element_ty), mask=rmask)
        hit = cols[None, :] == idx[:, None]
        p = tl.where(hit, -1.0, p)
        if HIST:
            counts += tl.sum((hit & rmask[:, None]).to(tl.int32), axis=0)
    if HIST:
        tl.store(hist_ptr + s * E_P2 + cols, counts)


@triton.jit
def slot_combine_kernel(
    y_ptr,
    g_ptr,
    inv_ptr,
    ids_ptr,
    bias_ptr,
    out_ptr,
    M,
    D,
    TOP_K: tl.constexpr,
    HAS_G: tl.constexpr,
    SORTED_Y: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
):
    """out[m] = sum_j g[f] * (y[row(f)] + bias[ids[f]]), f = m*k + j; row(f) = inv[f]
    (SORTED_Y: y in sorted order) or f; g = 1 without HAS_G, no bias without
    HAS_BIAS; fp32 sum."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < M
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    acc = tl.zeros((BR, BD), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        f = rows.to(tl.int64) * TOP_K + j
        yrow = f
        if SORTED_Y:
            yrow = tl.load(inv_ptr + f, mask=rmask, other=0).to(tl.int64)
        y = tl.load(y_ptr + yrow[:, None] * D + cols[None, :], mask=mask, other=0.0)
        y = y.to(tl.float32)
        if HAS_BIAS:
            e = tl.load(ids_ptr + f, mask=rmask, other=0).to(tl.int64)
            y += tl.load(bias_ptr + e[:, None] * D + cols[None, :], mask=mask, other=0.0).to(
                tl.float32
            )
        if HAS_G:
            g = tl.load(g_ptr + f, mask=rmask, other=0.0).to(tl.float32)
            y = y * g[:, None]
        acc += y
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(out_ptrs, _round(acc, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def slot_dot_kernel(
    dout_ptr,
    y_ptr,
    dg_ptr,
    R,
    D,
    TOP_K: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
):
    """dg[f] = <dout[f // k], y[f]> over the D columns (y in flat order), fp32
    accumulation."""
    f = tl.program_id(0) * BR + tl.arange(0, BR)
    fmask = f < R
    tok = (f // TOP_K).to(tl.int64)
    acc = tl.zeros((BR,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        mask = fmask[:, None] & (cols < D)[None, :]
        g = tl.load(dout_ptr + tok[:, None] * D + cols[None, :], mask=mask, other=0.0)
        y = tl.load(y_ptr + f.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(g.to(tl.float32) * y.to(tl.float32), axis=1)
    tl.store(dg_ptr + f, _round(acc, dg_ptr.dtype.element_ty), mask=fmask)
