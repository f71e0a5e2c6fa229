"""Fast MoE dispatch paths (grouped GEMM, fused Triton kernels) against references.

References: a per-token, per-slot Python loop in float64 (small sizes), the sorted
reference dispatch in float32 (TF32 off) and in float64, and a dense "every token
through every expert" float64 evaluation (benchmark scale, GPU only). The CPU tests
exercise the grouped algorithm in float32 where this torch runs ``_grouped_mm`` on CPU;
the GPU tests run the bf16 CUDA paths. The fused-kernel tests also run on the CPU in
Triton's interpreter (``TRITON_INTERPRET=1`` with triton installed) at small sizes.
Errors are relative Frobenius norms.

Tolerances: float32 paths 1e-5 (fp32 rounding of sums over <= 384 terms); bf16 paths
1.5e-2 forward and 2e-2 gradients against float64 (bf16 has 8 mantissa bits: each
rounded operand and stored intermediate adds ~2e-3 relative), and the fused bf16 path
must also be within 1.5x (+1e-3) of the bf16 sorted reference's own error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mmseg_m3vit.models.moe import MoEFFN, fused, vmoe_top_k
from mmseg_m3vit.models.moe.dispatch import auto_dispatch, get_dispatch
from mmseg_m3vit.models.moe.fused import ExpertSort, fused_dispatch, fused_expert_ffn, fused_top_k
from mmseg_m3vit.models.moe.grouped import grouped_dispatch, grouped_expert_ffn, sort_by_expert
from mmseg_m3vit.models.moe.reference import sorted_dispatch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
#: Where the fused kernels run in this session: CUDA, else Triton's CPU interpreter.
KERNEL_DEVICE = (
    "cuda"
    if torch.cuda.is_available() and fused.kernels is not None
    else ("cpu" if fused.INTERPRET and fused.kernels is not None else None)
)
requires_kernels = pytest.mark.skipif(
    KERNEL_DEVICE is None, reason="needs CUDA + triton (or TRITON_INTERPRET=1 with triton)"
)


def rel_err(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_problem(
    m: int, d: int, hd: int, e: int, k: int, empty: tuple[int, ...], seed: int, device: str = "cpu"
) -> dict[str, Tensor]:
    """Random float64 problem; experts listed in ``empty`` receive no token."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([i for i in range(e) if i not in empty])
    pick = torch.rand(m, len(allowed), generator=g).argsort(dim=1)[:, :k]
    ids = allowed[pick]  # (m, k) distinct experts per token
    gates = torch.rand(m, k, generator=g, dtype=torch.float64)
    p = {
        "x": torch.randn(m, d, generator=g, dtype=torch.float64),
        "expert_ids": ids,
        "gates": gates,
        "w1": torch.randn(e, d, hd, generator=g, dtype=torch.float64) / d**0.5,
        "b1": torch.randn(e, hd, generator=g, dtype=torch.float64) * 0.1,
        "w2": torch.randn(e, hd, d, generator=g, dtype=torch.float64) / hd**0.5,
        "b2": torch.randn(e, d, generator=g, dtype=torch.float64) * 0.1,
    }
    return {n: t.to(device) for n, t in p.items()}


GRAD_NAMES = ("x", "gates", "w1", "b1", "w2", "b2")


def per_token_reference(
    x: Tensor, expert_ids: Tensor, gates: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor
) -> Tensor:
    """out[m] = sum_j g[m,j] * (GELU(x[m] @ w1[e] + b1[e]) @ w2[e] + b2[e]), token by token."""
    rows = []
    for i in range(x.shape[0]):
        acc = torch.zeros_like(x[i])
        for j in range(expert_ids.shape[1]):
            e = int(expert_ids[i, j])
            h = F.gelu(x[i] @ w1[e] + b1[e])
            acc = acc + gates[i, j] * (h @ w2[e] + b2[e])
        rows.append(acc)
    return torch.stack(rows)


def all_experts_reference(
    x: Tensor, expert_ids: Tensor, gates: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor
) -> Tensor:
    """Every token through every expert, weighted by the (M, E) scattered gates."""
    dense_gates = gates.new_zeros(x.shape[0], w1.shape[0]).scatter(1, expert_ids, gates)
    h = F.gelu(torch.einsum("md,edh->meh", x, w1) + b1)
    y = torch.einsum("meh,ehd->med", h, w2) + b2
    return (dense_gates.unsqueeze(-1) * y).sum(1)


def run_with_grads(fn, p: dict[str, Tensor], grad_out: Tensor, dtype: torch.dtype):
    """fn(**p cast to dtype) and the gradients of <out, grad_out> w.r.t. GRAD_NAMES."""
    leaves = {
        n: (t.detach().to(dtype).clone().requires_grad_(True) if n in GRAD_NAMES else t)
        for n, t in p.items()
    }
    out = fn(**leaves)
    out.backward(grad_out.to(out.dtype))
    return out, {n: leaves[n].grad for n in GRAD_NAMES}


def _cpu_grouped_mm_works() -> bool:
    try:
        a, b = torch.ones(4, 8), torch.ones(2, 8, 8)
        torch._grouped_mm(a, b, offs=torch.tensor([1, 4], dtype=torch.int32))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@pytest.mark.skipif(not _cpu_grouped_mm_works(), reason="torch has no CPU float32 _grouped_mm")
def test_grouped_algorithm_matches_per_token_loop_cpu() -> None:
    """Float32 grouped path vs the float64 per-token loop; experts 2 and 5 get no token."""
    p = make_problem(m=23, d=16, hd=24, e=8, k=3, empty=(2, 5), seed=0)
    grad_out = torch.randn(23, 16, dtype=torch.float64)
    ref, ref_grads = run_with_grads(per_token_reference, p, grad_out, torch.float64)

    def fn(**kw: Tensor) -> Tensor:
        return grouped_expert_ffn(**kw, compute_dtype=torch.float32)

    out, grads = run_with_grads(fn, p, grad_out, torch.float32)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5
    for n in GRAD_NAMES:
        assert rel_err(grads[n], ref_grads[n]) < 1e-5, n
    for e in (2, 5):  # unused experts: exactly zero weight gradients
        for n in ("w1", "b1", "w2", "b2"):
            assert torch.count_nonzero(grads[n][e]) == 0, (n, e)


def test_sort_by_expert_is_a_stable_sort() -> None:
    """Counting sort == stable argsort; inverse and cumulative group ends consistent."""
    ids = make_problem(m=40, d=4, hd=4, e=7, k=3, empty=(0, 6), seed=6)["expert_ids"]
    order, inv_order, offs = sort_by_expert(ids, 7)
    flat = ids.reshape(-1)
    assert torch.equal(order, torch.sort(flat, stable=True).indices)
    assert torch.equal(order[inv_order], torch.arange(flat.numel()))
    assert offs.dtype == torch.int32
    assert torch.equal(offs.long(), torch.bincount(flat, minlength=7).cumsum(0))


def test_grouped_dispatch_falls_back_to_sorted_on_cpu() -> None:
    """On CPU the registered 'grouped' entry point is the sorted path, bit for bit."""
    p = make_problem(m=9, d=8, hd=8, e=4, k=2, empty=(), seed=1)
    p32 = {n: (t.float() if t.is_floating_point() else t) for n, t in p.items()}
    assert torch.equal(grouped_dispatch(**p32), sorted_dispatch(**p32))
    assert get_dispatch("grouped") is grouped_dispatch
    assert torch.equal(auto_dispatch(**p32), sorted_dispatch(**p32))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("empty", [(), (0, 3, 7)])
def test_grouped_cuda_bf16_matches_per_token_loop(empty: tuple[int, ...]) -> None:
    """bf16 CUDA path vs the float64 per-token loop on CPU, forward and backward."""
    p = make_problem(m=37, d=64, hd=48, e=8, k=4, empty=empty, seed=2)
    grad_out = torch.randn(37, 64, dtype=torch.float64)
    ref, ref_grads = run_with_grads(per_token_reference, p, grad_out, torch.float64)
    pc = {n: t.cuda() for n, t in p.items()}
    out, grads = run_with_grads(grouped_dispatch, pc, grad_out.cuda(), torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.is_cuda
    assert rel_err(out, ref) < 1.5e-2
    for n in GRAD_NAMES:
        assert rel_err(grads[n], ref_grads[n]) < 2e-2, n
    for e in empty:
        for n in ("w1", "b1", "w2", "b2"):
            assert torch.count_nonzero(grads[n][e]) == 0, (n, e)


@pytest.mark.gpu
@requires_cuda
def test_grouped_cuda_autocast_scale_no_sync_no_stale_rows() -> None:
    """NYUD scale (8 x 1201 tokens, D=384, E=16, k=4, Hd=384) under bf16 autocast.

    Float32 inputs, as the model gives them; float64 all-experts reference. The hot path
    must not synchronise with the host, and must write every output row: the allocator
    is first filled with NaN-poisoned blocks that the path would reuse.
    """
    p = make_problem(m=8 * 1201, d=384, hd=384, e=16, k=4, empty=(11,), seed=3, device="cuda")
    grad_out = torch.randn(8 * 1201, 384, dtype=torch.float64, device="cuda")
    ref, ref_grads = run_with_grads(all_experts_reference, p, grad_out, torch.float64)
    poison = torch.full((256 * 2**20,), float("nan"), device="cuda")
    del poison

    def fn(**kw: Tensor) -> Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return grouped_dispatch(**kw)

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, grads = run_with_grads(fn, p, grad_out, torch.float32)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1.5e-2
    for n in GRAD_NAMES:
        assert grads[n].dtype == torch.float32
        assert rel_err(grads[n], ref_grads[n]) < 2e-2, n
    assert torch.count_nonzero(grads["w1"][11]) == 0


@pytest.mark.gpu
@requires_cuda
def test_grouped_cuda_float32_falls_back_exactly() -> None:
    """Without bf16 compute the CUDA call is the sorted path (float32 semantics kept)."""
    p = make_problem(m=21, d=32, hd=16, e=4, k=2, empty=(), seed=4, device="cuda")
    p32 = {n: (t.float() if t.is_floating_point() else t) for n, t in p.items()}
    assert torch.equal(grouped_dispatch(**p32), sorted_dispatch(**p32))


# ----------------------------------------------------------------------------- fused
def make_routing(m: int, e: int, k: int, case: str, seed: int) -> Tensor:
    """(m, k) distinct experts per token. 'random'; 'empty': experts 0, 3 and e-1
    get nothing; 'one': every token's first slot is expert 1 (it gets all m tokens);
    'all_one' (k = 1): every token on expert 2."""
    g = torch.Generator().manual_seed(seed)
    if case == "all_one":
        return torch.full((m, k), 2, dtype=torch.long)
    allowed = [i for i in range(e) if case != "empty" or i not in (0, 3, e - 1)]
    ids = torch.tensor(allowed)[torch.rand(m, len(allowed), generator=g).argsort(1)[:, :k]]
    if case == "one":
        ids[:, 0] = 1
        ids[:, 1:] = torch.where(ids[:, 1:] == 1, 0, ids[:, 1:])
    return ids


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("case", ["random", "empty", "one", "all_one"])
def test_expert_sort_is_a_stable_counting_sort(case: str) -> None:
    """Device counting sort == stable argsort; offsets == cumulative counts."""
    for m, e, k in ((37, 8, 3), (1, 5, 1), (1001, 16, 4)):
        k = 1 if case == "all_one" else k
        if case == "one" and k < 2:
            continue
        ids = make_routing(m, e, k, case, seed=m + e).to(KERNEL_DEVICE)
        sort = ExpertSort(ids, e)
        flat = ids.reshape(-1).cpu()
        assert sort.order.dtype == torch.int32
        assert torch.equal(sort.order.long().cpu(), torch.sort(flat, stable=True).indices)
        counts = torch.bincount(flat, minlength=e)
        assert sort.offs.tolist() == [0] + counts.cumsum(0).tolist()


FUSED_CASES = [  # (m, d, hd, e, k, routing case)
    (37, 32, 48, 8, 4, "random"),
    (37, 32, 48, 8, 4, "empty"),
    (29, 16, 24, 6, 2, "one"),
    (23, 24, 16, 5, 1, "all_one"),
    (1, 16, 16, 4, 2, "random"),
]


def _fused_problem(m, d, hd, e, k, case, seed, device):
    p = make_problem(m, d, hd, e, k, empty=(), seed=seed, device=device)
    p["expert_ids"] = make_routing(m, e, k, case, seed).to(device)
    return p


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize(
    "shape,split",
    [(c, None) for c in FUSED_CASES] + [(FUSED_CASES[1], 0), (FUSED_CASES[1], 16)],
    ids=lambda v: f"split{v}" if not isinstance(v, tuple) else f"{v[-1]}-m{v[0]}-k{v[4]}",
)
def test_fused_float32_matches_sorted_reference(shape, split, monkeypatch) -> None:
    """Fused kernels with fp32 operands (full fp32 products) vs the sorted reference in
    float32 (TF32 off), forward and all six gradients, to fp32 rounding; experts that
    get no token have exactly zero weight gradients. ``split``: rows per program of
    the weight-gradient kernels (None: the default; 0: one program per expert; 16:
    every expert's rows over several programs that add with atomics; one routing case
    each, as every new shape compiles the kernels again)."""
    if split is not None:
        monkeypatch.setitem(fused.WGRAD_TILES, "SPLIT", split)
    m, d, hd, e, k, case = shape
    p = _fused_problem(m, d, hd, e, k, case, seed=11, device=KERNEL_DEVICE)
    grad_out = torch.randn(m, d, dtype=torch.float64, device=KERNEL_DEVICE)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref, ref_grads = run_with_grads(sorted_dispatch, p, grad_out, torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32

    def fn(**kw: Tensor) -> Tensor:
        return fused_expert_ffn(**kw, compute_dtype=torch.float32)

    out, grads = run_with_grads(fn, p, grad_out, torch.float32)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5
    for n in GRAD_NAMES:
        assert grads[n].dtype == torch.float32
        assert rel_err(grads[n], ref_grads[n]) < 1e-5, n
    used = set(p["expert_ids"].flatten().tolist())
    for ex in set(range(e)) - used:
        for n in ("w1", "b1", "w2", "b2"):
            assert torch.count_nonzero(grads[n][ex]) == 0, (n, ex)


def _check_bf16_against_float64(p: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """The fused dispatch under bf16 autocast (fp32 inputs, as the model calls it) vs
    float64, output and every gradient: within 1.5e-2 (output) / 2e-2 (gradients) and,
    on CUDA with at least 16 tokens, within 1.5x (+1e-3) of the sorted reference path's
    own error under the same autocast (with a handful of roundings the ratio of two
    errors is noise; Triton's CPU interpreter rounds to bf16 by truncation, which
    doubles its error). Returns the fused path's gradients."""
    m, d = p["x"].shape
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(m, d, generator=g, dtype=torch.float64).to(KERNEL_DEVICE)
    ref, ref_grads = run_with_grads(sorted_dispatch, p, grad_out, torch.float64)

    def under_autocast(fn):
        def run(**kw: Tensor) -> Tensor:
            with torch.autocast(KERNEL_DEVICE, dtype=torch.bfloat16):
                return fn(**kw)

        return run

    out, grads = run_with_grads(under_autocast(fused_dispatch), p, grad_out, torch.float32)
    base, base_grads = run_with_grads(under_autocast(sorted_dispatch), p, grad_out, torch.float32)
    assert out.dtype == torch.bfloat16
    ratio_bound = KERNEL_DEVICE == "cuda" and m >= 16
    for n, got, want, own in [("out", out, ref, base)] + [
        (n, grads[n], ref_grads[n], base_grads[n]) for n in GRAD_NAMES
    ]:
        assert n == "out" or got.dtype == torch.float32, n
        err, base_err = rel_err(got, want), rel_err(own, want)
        assert err < (1.5e-2 if n == "out" else 2e-2), (n, err, base_err)
        assert not ratio_bound or err <= 1.5 * base_err + 1e-3, (n, err, base_err)
    return grads


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("shape", FUSED_CASES, ids=lambda c: f"{c[-1]}-m{c[0]}-k{c[4]}")
def test_fused_bf16_matches_float64_as_well_as_sorted_bf16(shape) -> None:
    """The bf16 fast path vs float64 and vs the sorted bf16 reference's own error
    (:func:`_check_bf16_against_float64`)."""
    m, d, hd, e, k, case = shape
    _check_bf16_against_float64(_fused_problem(m, d, hd, e, k, case, 12, KERNEL_DEVICE), 12)


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize(
    "train_matmuls,row_products",
    [
        ("split", "triton"),
        ("split", "cutlass"),
        ("mixed", "triton"),
        ("mixed", "cutlass"),
        ("triton", "triton"),
    ],
)
@pytest.mark.parametrize(
    "shape",
    [FUSED_CASES[1], FUSED_CASES[3], FUSED_CASES[4], (300, 64, 48, 8, 4, "empty")],
    ids=lambda c: f"{c[-1]}-m{c[0]}-k{c[4]}",
)
def test_fused_bf16_training_products_match_float64(
    shape, train_matmuls: str, row_products: str, monkeypatch
) -> None:
    """Each set of training products of the bf16 path on rows gathered into sorted
    order (``'split'``: plain products, the hidden layer's epilogues in separate
    passes; ``'mixed'``: those epilogues fused into Triton GEMMs; the plain row
    products in Triton or ``torch._grouped_mm``; ``'triton'``: every product in the
    Triton kernels) vs float64 and the sorted bf16 reference
    (:func:`_check_bf16_against_float64`); experts that get no token have exactly
    zero weight and bias gradients."""
    monkeypatch.setattr(fused, "ROW_PRODUCTS", row_products)
    monkeypatch.setattr(fused, "TRAIN_MATMULS", train_matmuls)
    m, d, hd, e, k, case = shape
    p = _fused_problem(m, d, hd, e, k, case, seed=14, device=KERNEL_DEVICE)
    grads = _check_bf16_against_float64(p, 15)
    for ex in set(range(e)) - set(p["expert_ids"].flatten().tolist()):
        for n in ("w1", "b1", "w2", "b2"):
            assert torch.count_nonzero(grads[n][ex]) == 0, (n, ex)


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize(
    "name,value", [("TRAIN_MATMULS", "grouped"), ("ROW_PRODUCTS", "cuBLAS")], ids=str
)
def test_fused_training_setting_typo_names_setting_and_choices(
    name: str, value: str, monkeypatch
) -> None:
    """A misspelt training-products setting fails naming the setting, the value and
    the choices, instead of silently taking another path."""
    monkeypatch.setattr(fused, name, value)
    p = _fused_problem(9, 16, 16, 4, 2, "random", seed=3, device=KERNEL_DEVICE)
    leaves = {n: t.float().requires_grad_(True) if n in GRAD_NAMES else t for n, t in p.items()}
    with pytest.raises(ValueError, match=f"fused.{name} = '{value}'; expected"):
        with torch.autocast(KERNEL_DEVICE, dtype=torch.bfloat16):
            fused_dispatch(**leaves)


@pytest.mark.gpu
@requires_kernels
def test_gather_rounds_to_nearest_even_and_sums_columns_and_gate_dots() -> None:
    """The sorted-order gather of fp32 rows (gate-scaled) into bf16 equals torch's
    round-to-nearest-even conversion of the same fp32 products bit for bit (on the GPU
    and in Triton's interpreter, whose own conversion truncates); its per-expert column
    sums and gate-gradient dots match float64 sums of a naive loop. One expert gets no
    row; 37 tokens leave partial tiles."""
    g = torch.Generator().manual_seed(21)
    m, d, e, k = 37, 160, 5, 2
    ids = torch.randint(0, e - 1, (m, k), generator=g)  # expert e - 1 stays empty
    src = torch.randn(m, d, generator=g) * 3
    scale = torch.rand(m, k, generator=g) + 0.5
    y = torch.randn(m * k, d, generator=g).bfloat16()
    bias = torch.randn(e, d, generator=g).bfloat16()
    dev = KERNEL_DEVICE
    sort = ExpertSort(ids.to(dev), e)
    col = torch.zeros(e, d, dtype=torch.float32, device=dev)
    dots = torch.empty(m, k, dtype=torch.float32, device=dev)
    out = fused._gather(
        src.to(dev),
        sort,
        torch.bfloat16,
        scale=scale.to(dev),
        col_sum=col,
        dot=(y.to(dev), bias.to(dev), dots),
    ).cpu()
    order = sort.order.cpu().long()
    tok, flat_scale = order // k, scale.reshape(-1)[order]
    want = (src[tok] * flat_scale[:, None]).bfloat16()
    assert torch.equal(out, want)
    expert = ids.reshape(-1)[order]
    for ex in range(e):
        rows = want[expert == ex].double()
        torch.testing.assert_close(col[ex].cpu().double(), rows.sum(0), rtol=1e-5, atol=1e-4)
    # dots[flat] = <src[token], y[sorted position] + bias[expert]>, unscaled
    ref = torch.empty(m * k, dtype=torch.float64)
    for r, f in enumerate(order.tolist()):
        ref[f] = src[f // k].double() @ (y[r].double() + bias[expert[r]].double())
    torch.testing.assert_close(dots.cpu().reshape(-1).double(), ref, rtol=1e-5, atol=1e-3)


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("train_matmuls", ["triton", "mixed", "split"])
def test_fused_inference_equals_training_forward_and_writes_every_row(
    train_matmuls: str, monkeypatch
) -> None:
    """No-grad forward (no saved pre-activations) == the autograd forward: bit for bit
    when training takes the same Triton products; with the ``'split'`` and
    ``'mixed'`` training products (``@ w2`` through ``torch._grouped_mm``, ``b2``
    added in fp32 in the slot sum) within two bf16 roundings. Outputs are written over
    NaN-poisoned memory."""
    monkeypatch.setattr(fused, "TRAIN_MATMULS", train_matmuls)
    p = _fused_problem(41, 32, 32, 6, 3, "empty", seed=13, device=KERNEL_DEVICE)
    leaves = {n: t.float().requires_grad_(True) if n in GRAD_NAMES else t for n, t in p.items()}
    poison = torch.full((1 << 20,), float("nan"), device=KERNEL_DEVICE)
    del poison
    with torch.autocast(KERNEL_DEVICE, dtype=torch.bfloat16):
        train = fused_dispatch(**leaves)
        with torch.no_grad():
            infer = fused_dispatch(**leaves)
    assert torch.isfinite(infer).all() and torch.isfinite(train).all()
    if train_matmuls == "triton":
        assert torch.equal(train.detach(), infer)
    else:
        assert rel_err(train, infer) < 2 * 2.0**-8


@pytest.mark.gpu
@requires_cuda
def test_fused_cuda_scale_no_sync_and_cuda_graph() -> None:
    """NYUD scale under bf16 autocast: float64 all-experts reference, no host
    synchronisation in forward or backward, and the inference forward captured in a
    CUDA graph gives the eager result when replayed on new routing."""
    m, d, hd, e, k = 8 * 1201, 384, 384, 16, 4
    p = make_problem(m, d, hd, e, k, empty=(11,), seed=3, device="cuda")
    grad_out = torch.randn(m, d, dtype=torch.float64, device="cuda")
    ref, ref_grads = run_with_grads(all_experts_reference, p, grad_out, torch.float64)

    def fn(**kw: Tensor) -> Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return auto_dispatch(**kw)

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, grads = run_with_grads(fn, p, grad_out, torch.float32)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rel_err(out, ref) < 1.5e-2
    for n in GRAD_NAMES:
        assert rel_err(grads[n], ref_grads[n]) < 2e-2, n
    assert torch.count_nonzero(grads["w1"][11]) == 0

    static = {n: (t.float() if t.is_floating_point() else t.clone()) for n, t in p.items()}
    with torch.no_grad():
        fn(**static)  # compile the kernels before capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fn(**static)
        new = make_problem(m, d, hd, e, k, empty=(2, 5), seed=4, device="cuda")
        for n, t in new.items():
            static[n].copy_(t)
        graph.replay()
        eager = fn(**static)
    assert torch.equal(captured, eager)


# ----------------------------------------------------------------------------- inference
def _clear_rows(probs: Tensor, k: int) -> Tensor:
    """(M,) bool: rows whose k+1 largest probabilities are more than 2 bf16 ulps apart
    (there the top-k set and its order do not depend on rounding or tie-breaking)."""
    top = probs.double().topk(min(k + 1, probs.shape[1]), dim=1).values
    gaps = top[:, :-1] - top[:, 1:]
    return (gaps > 2 * 2.0**-8 * top[:, :-1].abs()).all(dim=1)


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,e,k", [(1, 16, 4), (37, 16, 4), (1201, 16, 4), (45, 6, 3), (9, 5, 1)])
def test_fused_top_k_matches_vmoe_top_k(m: int, e: int, k: int, dtype: torch.dtype) -> None:
    """One-kernel gate (softmax, top-k, sort histogram) vs :func:`vmoe_top_k` (torch's
    softmax + topk) and a stable argsort: gates within one ulp of the logits' dtype
    (the kernel's exp/division round differently in the last fp32 bits), the same
    experts in the same order wherever the top k+1 probabilities are not within two
    ulps of each other (ties), and the sorted layout of the kernel's own choice."""
    g = torch.Generator().manual_seed(m * 100 + e)
    logits = (torch.randn(m, e, generator=g) * 2).to(dtype).to(KERNEL_DEVICE)
    ids, gates, sort = fused_top_k(logits, k)
    ref = vmoe_top_k(logits, k, with_stats=False)
    assert ids.dtype == torch.long and gates.dtype == dtype
    assert ids.shape == gates.shape == (m, k)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-20  # bf16: 1 ulp; fp32: 8
    torch.testing.assert_close(gates.double(), ref.gates.double(), rtol=ulp, atol=0)
    probs = logits.float().softmax(-1).to(dtype)
    clear = _clear_rows(probs, k).to(KERNEL_DEVICE)
    assert clear.float().mean() > 0.3  # the comparison covers a good share of rows
    assert torch.equal(ids[clear], ref.expert_ids[clear])
    # each gate is its expert's probability
    torch.testing.assert_close(probs.gather(1, ids).double(), gates.double(), rtol=ulp, atol=0)
    assert (ids.sort(1).values.diff(dim=1) > 0).all()  # k distinct experts
    flat = ids.reshape(-1).cpu()
    assert torch.equal(sort.order.long().cpu(), torch.sort(flat, stable=True).indices)
    assert sort.offs.tolist() == [0] + torch.bincount(flat, minlength=e).cumsum(0).tolist()


def _moe_layer(k: int, device: str) -> MoEFFN:
    torch.manual_seed(5)
    layer = MoEFFN(32, 48, 8, k, router="multi_gate", num_tasks=2).to(device)
    with torch.no_grad():
        for p in (layer.b1, layer.b2):
            p.normal_(0.0, 0.1)
        layer.router.weight.mul_(8.0)  # confident routing: few near-ties
    return layer.eval()


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("k", [4, 3])
def test_moe_layer_inference_fast_path(k: int, monkeypatch) -> None:
    """Eval MoE layer under bf16 autocast without autograd takes the one-kernel gate
    and cached bf16 experts: output vs float64 on the same routing, routing vs
    vmoe_top_k where not tied; the bf16 copies are reused, rebuilt after an in-place
    weight update, dropped by train(); with autograd on, the general path runs."""
    dev = KERNEL_DEVICE
    layer = _moe_layer(k, dev)
    calls = []
    real = fused.fused_top_k
    monkeypatch.setattr(fused, "fused_top_k", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, 41, 32, device=dev)
    tasks = torch.tensor([1, 0, 1], device=dev)

    def run() -> tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16):
            y, routing, _ = layer(x, tasks)
            logits = layer.router(x, tasks).reshape(-1, 8)
        return y, routing, logits

    def check(y: Tensor, routing, logits: Tensor) -> None:
        ref_gate = vmoe_top_k(logits, k, with_stats=False)
        clear = _clear_rows(logits.float().softmax(-1).to(logits.dtype), k)
        assert clear.float().mean() > 0.5
        assert torch.equal(routing.expert_ids[clear], ref_gate.expert_ids[clear])
        p64 = [t.detach().double().cpu() for t in (layer.w1, layer.b1, layer.w2, layer.b2)]
        ref = sorted_dispatch(
            x.reshape(-1, 32).double().cpu(),
            routing.expert_ids.cpu(),
            routing.gates.double().cpu(),
            *p64,
        )
        assert y.dtype == torch.bfloat16
        assert rel_err(y.reshape(-1, 32), ref) < 1.5e-2

    y, routing, logits = run()
    assert len(calls) == 1
    check(y, routing, logits)
    copies = layer._bf16_cache["experts"][1]
    assert layer._bf16_cache["router"][1][0].dtype == torch.bfloat16
    run()
    assert layer._bf16_cache["experts"][1] is copies  # cached
    with torch.no_grad():
        layer.w1.mul_(-1.5)  # in place: the version changes
    y2, routing2, logits2 = run()
    assert layer._bf16_cache["experts"][1] is not copies
    check(y2, routing2, logits2)
    with torch.no_grad():  # the router's gates too
        layer.router.weight.mul_(-1.0)
    check(*run())
    layer.train()
    assert layer._bf16_cache == {}
    layer.eval()
    with torch.autocast(dev, dtype=torch.bfloat16):
        layer(x, tasks)  # autograd on: the general path
    assert len(calls) == 4


@pytest.mark.gpu
@requires_cuda
def test_moe_layer_inference_no_sync_and_cuda_graph() -> None:
    """The eval fast path at NYUD scale (1201 tokens x 8 images) synchronises nothing
    with the host and replays from a CUDA graph with the eager result on new tokens."""
    torch.manual_seed(6)
    layer = MoEFFN(384, 384, 16, 4, router="multi_gate", num_tasks=4).cuda().eval()
    x = torch.randn(8, 1201, 384, device="cuda")
    tasks = torch.full((8,), 2, device="cuda")

    def fwd() -> Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return layer(x, tasks)[0]

    with torch.inference_mode():
        fwd()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fwd()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fwd()
        x.copy_(torch.randn(8, 1201, 384, device="cuda"))
        graph.replay()
        assert torch.equal(captured, fwd())


# ----------------------------------------------------------------------------- backbone
def _small_backbone():
    """A 4-block M3ViT (D 64, 8 experts, top-4, MoE in blocks 1 and 3), two tasks."""
    from mmseg_m3vit.models.backbones import M3ViT

    return M3ViT(
        tasks=["semseg", "depth"],
        img_size=(64, 80),
        embed_dims=64,
        num_heads=4,
        num_layers=4,
        num_experts=8,
        top_k=4,
        expert_hidden_dims=32,
    )


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("d", [384, 48])
def test_layer_norm_autocast_matches_layer_norm(d: int, monkeypatch) -> None:
    """One-kernel LayerNorm to bf16 (rows of a strided token slice) vs torch's fp32
    LayerNorm rounded to bf16: at most one bf16 ulp apart, nearly all equal, within
    bf16 rounding of float64; not used with autograd or without autocast."""
    from mmseg_m3vit.models import fast_layer_norm as fln

    torch.manual_seed(7)
    norm = torch.nn.LayerNorm(d, eps=1e-6).cuda()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    tokens = torch.randn(3, 1 + 37, d, device="cuda") * 3 + 1
    x = tokens[:, 1:]  # strided rows, as the head's slice
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        y = fln.layer_norm_autocast(norm, x)
    ref = torch.nn.functional.layer_norm(x, (d,), norm.weight, norm.bias, 1e-6)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    torch.testing.assert_close(y.float(), ref.bfloat16().float(), rtol=2.0**-7, atol=1e-6)
    assert (y == ref.bfloat16()).float().mean() > 0.99
    ref64 = torch.nn.functional.layer_norm(
        x.double(), (d,), norm.weight.double(), norm.bias.double(), 1e-6
    )
    assert rel_err(y, ref64) < 4e-3
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = fln.layer_norm_autocast(norm, x)  # autograd on: the differentiable kernel
        assert y.dtype == torch.bfloat16 and y.requires_grad
    with torch.no_grad():
        assert fln.layer_norm_autocast(norm, x) is None  # no autocast
    monkeypatch.setattr(fln, "FAST_NORM_MODE", "off")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert fln.layer_norm_autocast(norm, x) is None


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize(
    ("d", "affine", "rows"), [(384, True, 37), (48, True, 211), (48, False, 5), (384, True, 0)]
)
def test_layer_norm_rows_gradients_match_float64(d: int, affine: bool, rows: int) -> None:
    """The Triton LayerNorm's forward (bf16) and backward (fp32 input gradient, weight
    and bias gradients summed per program) against float64 autograd of the same rows,
    from a strided token slice, with the bf16 output gradient as given: forward within
    bf16 rounding, gradients within fp32 rounding; no rows gives zero weight gradients."""
    from mmseg_m3vit.models import fast_layer_norm as fln

    dev = KERNEL_DEVICE
    g = torch.Generator().manual_seed(3)
    tokens = (torch.randn(3, 1 + rows, d, generator=g) * 3 + 1).to(dev)
    xs = tokens.clone().requires_grad_(True)
    x = xs[:, 1:]
    w = (torch.rand(d, generator=g) + 0.5).to(dev).requires_grad_(affine)
    b = (torch.rand(d, generator=g) - 0.5).to(dev).requires_grad_(affine)
    weight, bias = (w, b) if affine else (None, None)
    y = fln.layer_norm_rows(x, weight, bias, 1e-6, torch.bfloat16)
    dy = torch.randn(3, rows, d, generator=g).bfloat16().to(dev)
    y.backward(dy)

    x64 = tokens.detach().double()[:, 1:].requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    b64 = b.detach().double().requires_grad_(True)
    ref = F.layer_norm(x64, (d,), w64 if affine else None, b64 if affine else None, 1e-6)
    ref.backward(dy.double())
    assert y.dtype == torch.bfloat16 and y.shape == (3, rows, d) and y.is_contiguous()
    assert xs.grad.dtype == torch.float32 and torch.equal(
        xs.grad[:, 0], torch.zeros_like(xs.grad[:, 0])
    )
    if rows == 0:
        assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
        return
    # one rounding to bf16 (the interpreter truncates: up to one ulp, 2^-7 relative)
    torch.testing.assert_close(y.double().cpu(), ref.detach().cpu(), rtol=2.0**-7, atol=1e-5)
    assert rel_err(xs.grad[:, 1:], x64.grad) < 1e-5
    if affine:
        assert rel_err(w.grad, w64.grad) < 1e-5 and rel_err(b.grad, b64.grad) < 1e-5
    else:
        assert w.grad is None and b.grad is None


@pytest.mark.gpu
@requires_cuda
def test_backbone_training_fast_layer_norm_matches_float64(monkeypatch) -> None:
    """Train-mode backbone under bf16 autocast, gradients of a random projection of its
    tokens: with the Triton LayerNorm (forward and backward) against float64, within
    1.5x (+1e-3) of the error of the same step with torch's LayerNorm."""
    import copy

    from mmseg_m3vit.models import fast_layer_norm as fln

    torch.manual_seed(9)
    bb = _small_backbone().train()
    img = torch.randn(2, 3, 64, 80)
    proj = torch.randn(64, dtype=torch.float64)

    def grads(model, x, autocast: bool) -> dict[str, Tensor]:
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model.forward_tasks(x, ["semseg", "depth"])
        (out.tokens.double() @ proj.to(x.device)).square().mean().backward()
        return {n: p.grad.detach().double().cpu() for n, p in model.named_parameters()}

    ref = grads(copy.deepcopy(bb).double(), img.double(), False)
    bb = bb.cuda()
    calls = []
    real = fln.layer_norm_rows
    monkeypatch.setattr(fln, "layer_norm_rows", lambda *a: calls.append(1) or real(*a))
    fast = grads(bb, img.cuda(), True)
    assert len(calls) == 2 * 4  # both norms of the 4 blocks, each one call
    monkeypatch.setattr(fln, "FAST_NORM_MODE", "off")
    base = grads(bb, img.cuda(), True)
    for name in ("blocks.0.norm1.weight", "blocks.2.norm2.bias", "blocks.3.attn.qkv.weight"):
        err, base_err = rel_err(fast[name], ref[name]), rel_err(base[name], ref[name])
        assert err <= 1.5 * base_err + 1e-3, (name, err, base_err)


@pytest.mark.gpu
@requires_cuda
def test_backbone_inference_fast_paths_match_float64(monkeypatch) -> None:
    """Eval backbone under bf16 autocast with every inference fast path (LayerNorm to
    bf16, one-kernel gate, cached bf16 experts, fused experts) against the float64
    backbone: error within 3e-2 and within 1.5x (+1e-3) of the same backbone run
    through the general bf16 path (torch LayerNorm, vmoe_top_k, sorted dispatch)."""
    import copy

    from mmseg_m3vit.models import fast_layer_norm as fln

    torch.manual_seed(8)
    bb = _small_backbone().eval()
    img = torch.randn(2, 3, 64, 80)
    with torch.inference_mode():
        ref = copy.deepcopy(bb).double()(img.double(), "depth").tokens
    bb = bb.cuda()
    calls = []
    real = fused.fused_top_k
    monkeypatch.setattr(fused, "fused_top_k", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        fast = bb(img.cuda(), "depth").tokens
        assert len(calls) == sum(1 for m in bb.modules() if isinstance(m, MoEFFN))
        monkeypatch.setattr(fln, "FAST_NORM_MODE", "off")
        for m in bb.modules():
            if isinstance(m, MoEFFN):
                m.dispatch = "sorted"
        base = bb(img.cuda(), "depth").tokens
    err, base_err = rel_err(fast, ref), rel_err(base, ref)
    assert err < 3e-2 and err <= 1.5 * base_err + 1e-3, (err, base_err)
