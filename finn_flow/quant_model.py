"""Brevitas mirror of ONE task's pathway of the float M3ViT, in FINN-friendly form.

The float model (``mmseg_m3vit.models.backbones.m3vit.M3ViT``) is pre-norm ViT with MoE FFNs;
a forward pass for task ``t`` uses only task ``t``'s routers. This module builds the same
computation with Brevitas quantizers so that it exports to QONNX and streamlines in FINN:

============================  =============================================================
float model                   FPGA form (this module)
============================  =============================================================
Conv2d(3, D, p, stride p)     host/DMA cuts patches (pure pixel reordering; row 0 = zeros
                              for CLS) -> QuantLinear(3*p*p, D) on chip (same weights)
cat(CLS) + pos_embed          + constant token table T (1+N, D): T[0] = cls + pos[0] - bias
                              (the zero row gives ``bias``), T[i] = pos[i]; exact
LayerNorm(D)                  LayerNorm (float, finn-plus LayerNorm HW op; affine part
                              moved out by FINN's ExtractNormScaleBias)
attention, H heads            per-head QuantLinear q/k/v (slices of ``qkv``), q k^T, scale,
                              softmax, 8-bit probabilities, @ v, concat heads, QuantLinear
GELU                          GELU between quantizers (finn-plus PWPolyF, ~1 LSB approx.)
MoE FFN (top-k of E)          *stand-in computing the same function*: router ->
                              softmax -> probabilities quantized to 1/255 ->
                              exact top-k mask (pairwise comparisons with a lower-index
                              tie-break, two tiny integer MVAUs + 1-bit thresholds) ->
                              gates g (zero outside top-k); ALL experts computed as one
                              stacked QuantLinear(D, E*Hd) + GELU; hidden scaled by g
                              (expanded by a 0/1 matrix); QuantLinear(E*Hd, D) +
                              g @ b2. The FINN build replaces this region by the
                              expert-by-expert engine (``--moe reordered``).
PUP head (task head)          :class:`QuantPUPHead`: drop CLS (Gather -> Crop) -> LayerNorm
                              -> (h, w, D) map -> [QuantConv2d 3x3 + BN + ReLU (BN and ReLU
                              become thresholds), nearest x2 (UpsampleNearestNeighbour)]
                              x num_up -> conv 3x3 -> conv1x1 -> nearest x2 -> NHWC
                              output (B, H, W, C). Needs ``upsample_mode='nearest'`` in the
                              float head (configs/fpga); bilinear has no FINN layer.
============================  =============================================================

Everything the FINN build sees is defined here; the Brevitas model (not the float model) is
the reference that FINN's execution is verified against. Shapes: B = 1 (FINN streams one
frame at a time), N = h*w patches, D embed dims, E experts, Hd expert hidden dims.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU
from brevitas.quant import (
    Int8ActPerTensorFloat,
    Int8WeightPerTensorFloat,
    Int32Bias,
    SignedBinaryActPerTensorConst,
    Uint8ActPerTensorFloat,
)
from torch import Tensor, nn


@dataclass(frozen=True)
class QuantSpec:
    """Bit widths and integer arithmetic of the quantized pathway.

    Attributes:
        weight_bits: weights of every learned linear layer (per-tensor scale).
        act_bits: activations between layers (signed, per-tensor scale, calibrated).
        prob_bits: softmax probabilities / MoE gates (unsigned, fixed scale 1/(2^b - 1)).
        attn_weight_bits: weights of the attention projections (q, k, v, proj); None:
            ``weight_bits``.
        int_bias: every bias of a learned linear layer (patch projection, q / k / v /
            proj, dense and expert fc1, dense fc2, router) is quantized to its
            accumulator grid: scale = input scale x weight scale, 32-bit signed integer
            (Brevitas ``Int32Bias``). The layer is then integer MACs + an integer bias,
            and the quantizer after it one threshold table shared by all channels (see
            ``finn_flow/transforms.py`` SharedThresholdTable). Not here: the experts'
            fc2 bias (an 8-bit matrix applied to the gates, already integer) and the
            head's conv_seg (C classes; qonnx cannot extract a quantized conv bias).
            False: float biases, which FINN folds into one threshold row per channel.
        fold_norm_affine: the affine part (gain, bias) of each block's two LayerNorms is
            folded into the linear layers that read them (q / k / v; dense fc1; router
            and expert fc1), so that the quantizers after the LayerNorms see the
            normalised tokens and need one threshold table, not one per channel. The
            head's LayerNorm keeps its affine part (its conv is zero-padded, so a folded
            bias would be wrong at the borders).
    """

    weight_bits: int = 8
    act_bits: int = 8
    prob_bits: int = 8
    attn_weight_bits: int | None = None
    int_bias: bool = True
    fold_norm_affine: bool = True

    @property
    def attn_bits(self) -> int:
        """Weight bits of the attention projections."""
        return self.attn_weight_bits or self.weight_bits

    def as_dict(self) -> dict[str, int | bool | None]:
        """JSON-serialisable form for build summaries."""
        return asdict(self)


def _act(spec: QuantSpec, signed: bool = True, feeds_int_bias: bool = False) -> QuantIdentity:
    """A calibrated per-tensor activation quantizer.

    Returns plain tensors, except where it feeds a linear layer whose bias is quantized
    to the accumulator grid (``feeds_int_bias`` and ``spec.int_bias``): that bias
    quantizer needs the input's scale, which travels in a Brevitas ``QuantTensor``.
    """
    quant = Int8ActPerTensorFloat if signed else Uint8ActPerTensorFloat
    return QuantIdentity(
        act_quant=quant,
        bit_width=spec.act_bits,
        return_quant_tensor=bool(feeds_int_bias and spec.int_bias),
    )


def _const_act(bits: int, max_value: float) -> QuantIdentity:
    """Unsigned quantizer with a fixed range [0, max_value] (scale max_value / (2^bits - 1))."""
    return QuantIdentity(
        act_quant=Uint8ActPerTensorFloat,
        bit_width=bits,
        scaling_impl_type="const",
        scaling_init=float(max_value),
        return_quant_tensor=False,
    )


def _sign_act() -> QuantIdentity:
    """Bipolar quantizer: +1 for x > 0, -1 otherwise (inputs here are never 0)."""
    return QuantIdentity(
        act_quant=SignedBinaryActPerTensorConst, scaling_init=1.0, return_quant_tensor=False
    )


def _linear(in_f: int, out_f: int, bias: bool, bits: int, int_bias: bool = False) -> QuantLinear:
    """QuantLinear with per-tensor weights; ``int_bias``: bias on the accumulator grid
    (its input must come from an ``_act(..., feeds_int_bias=True)`` quantizer)."""
    return QuantLinear(
        in_f,
        out_f,
        bias=bias,
        weight_quant=Int8WeightPerTensorFloat,
        weight_bit_width=bits,
        bias_quant=Int32Bias if (bias and int_bias) else None,
        return_quant_tensor=False,
    )


def _fixed_linear(weight: Tensor, bias: Tensor | None) -> QuantLinear:
    """A frozen linear layer whose weights are small integers (exact at 2..4 bits).

    Args:
        weight: (out, in) integer-valued matrix; all non-zero entries share one magnitude
            ``m`` or lie in {-m, 0, m}, so a 2-bit narrow quantizer with scale m is exact.
        bias: (out,) float or None.
    """
    lin = QuantLinear(
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        weight_quant=Int8WeightPerTensorFloat,
        weight_bit_width=2,
        return_quant_tensor=False,
    )
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    lin.weight.requires_grad_(False)
    return lin


class QuantTopKGate(nn.Module):
    """Softmax router probabilities -> gates of the top-k experts, zero elsewhere.

    ``g[e] = p[e]`` if fewer than k experts beat e, else 0, where j beats e when
    ``p[j] > p[e]`` or (``p[j] == p[e]`` and j < e): exactly top-k with ties broken
    towards the lower expert index. p is quantized to multiples of ``1/(2^b-1)`` first.

    The comparisons are integer linear algebra followed by sign (bipolar) quantizers:
    with q = p * (2^b-1) integers, ``s[e,j] = sign(q[j] - q[e] + [j<e] - 1/2)`` (+1 when j
    beats e, never 0) via a fixed {-L,0,L} matrix; ``count[e] = (sum_j s[e,j] + E) / 2``
    (the diagonal always gives -1); ``drop[e] = sign(count[e] - k + 1/2)``;
    ``g = p * (1 - drop) / 2``.

    Shapes: p (1, N, E) -> gates (1, N, E).
    """

    def __init__(self, num_experts: int, top_k: int, prob_bits: int) -> None:
        super().__init__()
        e = num_experts
        self.num_experts, self.top_k = e, top_k
        levels = 2**prob_bits - 1
        self.prob_quant = _const_act(prob_bits, 1.0)
        self.diff_in = _const_act(prob_bits, 1.0)  # same grid as prob_quant: one per consumer
        diff = torch.zeros(e * e, e)  # row e*E+j: L * (p[j] - p[e]) = q[j] - q[e]
        tie = torch.full((e * e,), -0.5)
        for ei in range(e):
            for j in range(e):
                if j == ei:
                    continue
                diff[ei * e + j, j] += levels
                diff[ei * e + j, ei] -= levels
                if j < ei:
                    tie[ei * e + j] += 1.0
        self.diff = _fixed_linear(diff, tie)
        self.beats = _sign_act()
        count = torch.zeros(e, e * e)
        for ei in range(e):
            count[ei, ei * e : (ei + 1) * e] = 0.5
        # count - k + 1/2 = sum_j s / 2 + E/2 + 1/2 - k  (> 0: dropped, < 0: kept).
        # Positive weights on purpose: finn-plus's weight-bit-width minimisation types a
        # {-c, 0} matrix as BIPOLAR, which cannot hold the zeros.
        self.count = _fixed_linear(count, torch.full((e,), 0.5 * e + 0.5 - top_k))
        self.drop = _sign_act()
        self.gate_quant = _const_act(prob_bits, 1.0)

    def forward(self, p: Tensor) -> Tensor:
        """p (1, N, E) softmax probabilities -> gates (1, N, E) on the 1/(2^b-1) grid."""
        pq = self.prob_quant(p)
        drop = self.drop(self.count(self.beats(self.diff(self.diff_in(p)))))
        return self.gate_quant(pq * (1.0 - drop) * 0.5)


class QuantAttention(nn.Module):
    """Multi-head self-attention, one q/k/v projection per head (slices of the fused qkv).

    Every projection has its own input quantizer and each head its own slice of the
    output projection (``proj(cat(heads)) = sum_h heads[h] @ proj_w[:, h]^T + b``): FINN
    can only turn a MatMul into an MVAU when its input is an integer stream, i.e. when
    no fork sits between a quantizer and the MatMul.

    x (1, T, D) float (LayerNorm output) -> (1, T, D) float (sum of head projections).
    """

    def __init__(self, dim: int, num_heads: int, spec: QuantSpec) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        b, nh, dh, ib = spec.attn_bits, num_heads, self.head_dim, spec.int_bias
        self.q_in = nn.ModuleList(_act(spec, feeds_int_bias=True) for _ in range(nh))
        self.k_in = nn.ModuleList(_act(spec, feeds_int_bias=True) for _ in range(nh))
        self.v_in = nn.ModuleList(_act(spec, feeds_int_bias=True) for _ in range(nh))
        self.q = nn.ModuleList(_linear(dim, dh, True, b, ib) for _ in range(nh))
        self.k = nn.ModuleList(_linear(dim, dh, True, b, ib) for _ in range(nh))
        self.v = nn.ModuleList(_linear(dim, dh, True, b, ib) for _ in range(nh))
        self.q_quant = nn.ModuleList(_act(spec) for _ in range(nh))
        self.k_quant = nn.ModuleList(_act(spec) for _ in range(nh))
        self.v_quant = nn.ModuleList(_act(spec) for _ in range(nh))
        self.score_quant = nn.ModuleList(_act(spec) for _ in range(nh))
        self.prob_quant = nn.ModuleList(_const_act(spec.prob_bits, 1.0) for _ in range(nh))
        self.out_quant = nn.ModuleList(_act(spec, feeds_int_bias=h == 0) for h in range(nh))
        self.proj = nn.ModuleList(_linear(dh, dim, h == 0, b, ib) for h in range(nh))

    @torch.no_grad()
    def load_float(self, qkv_w: Tensor, qkv_b: Tensor, proj_w: Tensor, proj_b: Tensor) -> None:
        """Copy the float ``attn.qkv`` (3D, D) / ``attn.proj`` (D, D) weights in."""
        d, dh = qkv_w.shape[1], self.head_dim
        for h in range(self.num_heads):
            for i, lins in enumerate((self.q, self.k, self.v)):
                rows = slice(i * d + h * dh, i * d + (h + 1) * dh)
                lins[h].weight.copy_(qkv_w[rows])
                lins[h].bias.copy_(qkv_b[rows])
            self.proj[h].weight.copy_(proj_w[:, h * dh : (h + 1) * dh])
        self.proj[0].bias.copy_(proj_b)

    def forward(self, x: Tensor) -> Tensor:
        """x (1, T, D) -> (1, T, D)."""
        out = None
        for h in range(self.num_heads):
            q = self.q_quant[h](self.q[h](self.q_in[h](x)))
            k = self.k_quant[h](self.k[h](self.k_in[h](x)))
            v = self.v_quant[h](self.v[h](self.v_in[h](x)))
            s = self.score_quant[h](torch.matmul(q, k.transpose(-1, -2)) * self.scale)
            a = self.prob_quant[h](torch.softmax(s, dim=-1))
            y = self.proj[h](self.out_quant[h](torch.matmul(a, v)))
            out = y if out is None else out + y
        return out


class QuantMlp(nn.Module):
    """Dense FFN ``fc2(GELU(fc1(x)))`` with quantizers: x float (1,T,D) -> (1,T,D)."""

    def __init__(self, dim: int, hidden: int, spec: QuantSpec) -> None:
        super().__init__()
        b, ib = spec.weight_bits, spec.int_bias
        self.in_quant = _act(spec, feeds_int_bias=True)
        self.fc1 = _linear(dim, hidden, True, b, ib)
        self.pre_act = _act(spec)
        self.act = nn.GELU()
        self.post_act = _act(spec, feeds_int_bias=True)
        self.fc2 = _linear(hidden, dim, True, b, ib)

    def forward(self, x: Tensor) -> Tensor:
        """x (1, T, D) -> (1, T, D)."""
        return self.fc2(self.post_act(self.act(self.pre_act(self.fc1(self.in_quant(x))))))


class QuantMoE(nn.Module):
    """MoE FFN stand-in for one task: every expert computed, weighted by top-k gates.

    ``y = sum_e g[e] * (GELU(x w1[e] + b1[e]) w2[e] + b2[e])`` with ``g`` from
    :class:`QuantTopKGate` (zero outside the top-k), which equals the dropless top-k
    dispatch of the float model up to quantization. Shapes: x (1, T, D) -> (1, T, D).
    """

    def __init__(
        self, dim: int, hidden: int, num_experts: int, top_k: int, spec: QuantSpec
    ) -> None:
        super().__init__()
        e, b = num_experts, spec.weight_bits
        self.num_experts, self.hidden = e, hidden
        # the router's bias is zero unless a LayerNorm bias was folded into it
        self.router_in = _act(spec, feeds_int_bias=True)
        self.router = _linear(dim, e, True, b, spec.int_bias)
        self.logit_quant = _act(spec)
        self.gate = QuantTopKGate(e, top_k, spec.prob_bits)
        self.fc1_in = _act(spec, feeds_int_bias=True)
        self.fc1 = _linear(dim, e * hidden, True, b, spec.int_bias)
        self.pre_act = _act(spec)
        self.act = nn.GELU()
        self.post_act = _act(spec)
        expand = torch.zeros(e * hidden, e)
        for ei in range(e):
            expand[ei * hidden : (ei + 1) * hidden, ei] = 1.0
        self.expand_in = _const_act(spec.prob_bits, 1.0)
        self.expand = _fixed_linear(expand, None)
        self.expand_quant = _const_act(spec.prob_bits, 1.0)
        self.hidden_quant = _act(spec)
        self.fc2 = _linear(e * hidden, dim, False, b)
        self.bias2_in = _const_act(spec.prob_bits, 1.0)
        self.bias2 = _linear(e, dim, False, b)

    @torch.no_grad()
    def load_float(self, router_w: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> None:
        """Copy one task's router (D, E) and the stacked experts in.

        Args:
            router_w: (D, E) this task's gate matrix (logits = x @ router_w).
            w1: (E, D, Hd); b1: (E, Hd); w2: (E, Hd, D); b2: (E, D).
        """
        e, d, hd = w1.shape
        self.router.weight.copy_(router_w.t())
        self.router.bias.zero_()
        self.fc1.weight.copy_(w1.permute(0, 2, 1).reshape(e * hd, d))
        self.fc1.bias.copy_(b1.reshape(e * hd))
        self.fc2.weight.copy_(w2.reshape(e * hd, d).t())
        self.bias2.weight.copy_(b2.t())

    def forward(self, x: Tensor) -> Tensor:
        """x (1, T, D) float (LayerNorm output) -> (1, T, D)."""
        # g is already on the 1/(2^b-1) grid: expand_in / bias2_in re-quantize exactly
        # (one quantizer per consumer keeps every MatMul input an integer stream)
        p = torch.softmax(self.logit_quant(self.router(self.router_in(x))), dim=-1)
        g = self.gate(p)
        h = self.post_act(self.act(self.pre_act(self.fc1(self.fc1_in(x)))))
        gh = self.hidden_quant(h * self.expand_quant(self.expand(self.expand_in(g))))
        return self.fc2(gh) + self.bias2(self.bias2_in(g))


class QuantBlock(nn.Module):
    """Pre-norm block ``x + attn(LN(x))`` then ``x + ffn(LN(x))``, residual stream quantized."""

    def __init__(self, dim: int, num_heads: int, ffn: nn.Module, eps: float, spec: QuantSpec):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = QuantAttention(dim, num_heads, spec)
        self.res1 = _act(spec)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.ffn = ffn
        self.res2 = _act(spec)

    def forward(self, x: Tensor) -> Tensor:
        """x (1, T, D) quantized residual stream -> (1, T, D) quantized."""
        x = self.res1(x + self.attn(self.norm1(x)))
        return self.res2(x + self.ffn(self.norm2(x)))


@dataclass(frozen=True)
class PathwayDims:
    """Sizes of the pathway (read from the float backbone).

    Attributes:
        grid: (h, w) patch grid; tokens T = 1 + h*w.
        patch: patch side p in pixels; in_channels: image channels.
        dim: D; num_heads: H; mlp_hidden: dense FFN hidden; expert_hidden: Hd.
        num_experts: E; top_k: k; moe_layers: indices of MoE blocks; num_layers: blocks.
        eps: LayerNorm eps.
    """

    grid: tuple[int, int]
    patch: int
    in_channels: int
    dim: int
    num_heads: int
    mlp_hidden: int
    expert_hidden: int
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    num_layers: int
    eps: float

    @property
    def tokens(self) -> int:
        """T = 1 + h*w (CLS first)."""
        return 1 + self.grid[0] * self.grid[1]

    @property
    def patch_features(self) -> int:
        """Features of one patch row: in_channels * p * p."""
        return self.in_channels * self.patch * self.patch


def patchify(img: Tensor, patch: int) -> Tensor:
    """Cut an image into the FPGA input layout (done by host/DMA: a pure reordering).

    Args:
        img: (B, C, H, W) normalised image, H and W multiples of ``patch``.

    Returns:
        (B, 1 + N, C*p*p): row 0 zeros (CLS slot), then patches in raster order, each
        flattened in (c, i, j) order to match ``Conv2d`` weights ``(D, C, p, p)``.
    """
    b, c, h, w = img.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch}")
    x = img.reshape(b, c, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)
    return torch.cat([x.new_zeros(b, 1, x.shape[-1]), x], dim=1)


class QuantM3ViTPathway(nn.Module):
    """One task's backbone pathway: patches (1, T, C*p*p) -> tokens (1, T, D) quantized.

    Build it with :func:`build_quant_pathway` from a float ``M3ViT``; the head stage is
    appended by :class:`QuantTaskModel`.
    """

    def __init__(self, dims: PathwayDims, spec: QuantSpec) -> None:
        super().__init__()
        self.dims, self.spec = dims, spec
        self.in_quant = _act(spec, feeds_int_bias=True)
        self.patch_embed = _linear(
            dims.patch_features, dims.dim, True, spec.weight_bits, spec.int_bias
        )
        self.register_buffer("token_table", torch.zeros(1, dims.tokens, dims.dim))
        self.embed_quant = _act(spec)
        blocks = []
        for i in range(dims.num_layers):
            if i in dims.moe_layers:
                ffn: nn.Module = QuantMoE(
                    dims.dim, dims.expert_hidden, dims.num_experts, dims.top_k, spec
                )
            else:
                ffn = QuantMlp(dims.dim, dims.mlp_hidden, spec)
            blocks.append(QuantBlock(dims.dim, dims.num_heads, ffn, dims.eps, spec))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, patches: Tensor) -> Tensor:
        """patches (1, T, C*p*p) from :func:`patchify` -> tokens (1, T, D)."""
        x = self.patch_embed(self.in_quant(patches)) + self.token_table
        x = self.embed_quant(x)
        for block in self.blocks:
            x = block(x)
        return x


def pathway_dims(backbone: nn.Module, grid: tuple[int, int]) -> PathwayDims:
    """Read :class:`PathwayDims` off a float ``M3ViT`` for an input of ``grid`` patches."""
    blk0 = backbone.blocks[0]
    moe_idx = tuple(i for i, b in enumerate(backbone.blocks) if b.is_moe)
    dense = [b for b in backbone.blocks if not b.is_moe]
    mlp_hidden = dense[0].mlp.fc1.out_features if dense else 0
    if moe_idx:
        moe = backbone.blocks[moe_idx[0]].moe
        num_experts, _, expert_hidden = moe.w1.shape
        top_k = moe.top_k
    else:
        num_experts, expert_hidden, top_k = 0, 0, 0
    conv = backbone.patch_embed.proj
    return PathwayDims(
        grid=tuple(grid),
        patch=backbone.patch_size,
        in_channels=conv.in_channels,
        dim=backbone.embed_dims,
        num_heads=blk0.attn.num_heads,
        mlp_hidden=mlp_hidden,
        expert_hidden=int(expert_hidden),
        num_experts=int(num_experts),
        top_k=int(top_k),
        moe_layers=moe_idx,
        num_layers=len(backbone.blocks),
        eps=blk0.norm1.eps,
    )


@torch.no_grad()
def load_backbone(qpath: QuantM3ViTPathway, backbone: nn.Module, task: str) -> None:
    """Copy the float backbone's weights for ``task`` into ``qpath``.

    Each MoE layer's router for ``task`` comes from the router's public
    ``task_gate_weight`` / ``task_logit_offset``; the mirror's router bias only ever
    holds the folded LayerNorm bias, so a task whose router adds constant logits (the
    task-conditioned router) is refused. With ``qpath.spec.fold_norm_affine`` the
    blocks' LayerNorm affine parts are then folded into their readers
    (:func:`fold_layernorm_affine`).

    Raises:
        ValueError: ``task`` is not one of the backbone's tasks, or its router has a
            non-zero logit offset.
    """
    from mmseg_m3vit.models.backbones.m3vit import resize_pos_embed

    if backbone.tasks and task not in backbone.tasks:
        raise ValueError(f"task {task!r} is not one of the backbone's tasks {backbone.tasks}")
    task_index = backbone.tasks.index(task) if backbone.tasks else 0
    dims = qpath.dims
    conv = backbone.patch_embed.proj
    qpath.patch_embed.weight.copy_(conv.weight.reshape(conv.out_channels, -1))
    qpath.patch_embed.bias.copy_(conv.bias)
    pos = resize_pos_embed(backbone.pos_embed, backbone.pos_grid, dims.grid)[0]
    table = pos.clone()
    table[0] = backbone.cls_token[0, 0] + pos[0] - conv.bias
    qpath.token_table.copy_(table[None])
    for i, (fb, qb) in enumerate(zip(backbone.blocks, qpath.blocks)):
        for fn, qn in ((fb.norm1, qb.norm1), (fb.norm2, qb.norm2)):
            qn.weight.copy_(fn.weight)
            qn.bias.copy_(fn.bias)
        qb.attn.load_float(
            fb.attn.qkv.weight, fb.attn.qkv.bias, fb.attn.proj.weight, fb.attn.proj.bias
        )
        if fb.is_moe:
            moe = fb.moe
            if moe.router.task_logit_offset(task_index).abs().max() > 0:
                raise ValueError(
                    f"block {i}: the {backbone.router_variant!r} router adds constant logits "
                    f"for task {task!r}; the FPGA mirror's router has no bias (supported: "
                    "'multi_gate', 'shared')"
                )
            router_w = moe.router.task_gate_weight(task_index)
            qb.ffn.load_float(router_w, moe.w1, moe.b1, moe.w2, moe.b2)
        else:
            qb.ffn.fc1.weight.copy_(fb.mlp.fc1.weight)
            qb.ffn.fc1.bias.copy_(fb.mlp.fc1.bias)
            qb.ffn.fc2.weight.copy_(fb.mlp.fc2.weight)
            qb.ffn.fc2.bias.copy_(fb.mlp.fc2.bias)
    if qpath.spec.fold_norm_affine:
        fold_layernorm_affine(qpath)


def _fold_affine_into(lin: nn.Linear, gain: Tensor, shift: Tensor) -> None:
    """``lin(gain * v + shift) == lin'(v)``: W' = W diag(gain), b' = b + W shift."""
    lin.bias.add_(lin.weight @ shift)
    lin.weight.mul_(gain[None, :])


@torch.no_grad()
def fold_layernorm_affine(qpath: QuantM3ViTPathway) -> None:
    """Fold the gain and bias of every block's LayerNorms into the layers that read them.

    ``norm1`` feeds the q / k / v projections of every head, ``norm2`` the dense fc1 or
    the MoE router and expert fc1; each reader gets ``W diag(gain)`` and ``b + W bias``
    and the LayerNorm becomes a plain normalisation (gain 1, bias 0). The float
    function is unchanged; the quantizers after the LayerNorms now see the normalised
    tokens (one per-tensor scale suits every channel).
    """
    for qb in qpath.blocks:
        g1, b1 = qb.norm1.weight.clone(), qb.norm1.bias.clone()
        for lins in (qb.attn.q, qb.attn.k, qb.attn.v):
            for lin in lins:
                _fold_affine_into(lin, g1, b1)
        g2, b2 = qb.norm2.weight.clone(), qb.norm2.bias.clone()
        readers = [qb.ffn.fc1] + ([qb.ffn.router] if isinstance(qb.ffn, QuantMoE) else [])
        for lin in readers:
            _fold_affine_into(lin, g2, b2)
        for norm in (qb.norm1, qb.norm2):
            norm.weight.fill_(1.0)
            norm.bias.zero_()


@torch.no_grad()
def calibrate(model: nn.Module, batches: list[Tensor]) -> None:
    """Run Brevitas activation calibration over ``batches`` (each (1, ...)), then eval()."""
    from brevitas.graph.calibrate import calibration_mode

    model.eval()
    with calibration_mode(model):
        for x in batches:
            model(x)
    model.eval()


def count_parameters(module: nn.Module) -> int:
    """Number of learned weights (excludes the fixed top-k comparison matrices)."""
    total = 0
    for name, p in module.named_parameters():
        if any(s in name for s in ("gate.diff", "gate.count", ".expand.")):
            continue
        if p.dim() >= 1 and "scaling" not in name and "value" not in name:
            total += p.numel()
    return total


class QuantPUPHead(nn.Module):
    """FPGA form of ``PUPHead`` (``upsample_mode='nearest'``): tokens -> NHWC logits.

    tokens (1, 1+h*w, D) quantized -> (1, H, W, C) quantized, H = h * 2^(num_up+1) *
    ``extra[0]`` (``extra``: an exact integer final resize, (1, 1) when none). The output
    is channels-last so that the stream order is the FINN order (no final transpose).
    """

    def __init__(
        self,
        grid: tuple[int, int],
        dim: int,
        channels: int,
        num_up: int,
        num_classes: int,
        spec: QuantSpec,
        conv_bias: bool = False,
        extra: tuple[int, int] = (1, 1),
    ) -> None:
        super().__init__()
        self.grid, self.dim, self.num_up, self.extra = tuple(grid), dim, num_up, tuple(extra)
        h, w = grid
        b = spec.weight_bits
        self.register_buffer("patch_index", torch.arange(1, 1 + h * w))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.norm_quant = _act(spec)
        self.convs = nn.ModuleList(
            QuantConv2d(
                dim if i == 0 else channels,
                channels,
                3,
                padding=1,
                bias=conv_bias,
                weight_quant=Int8WeightPerTensorFloat,
                weight_bit_width=b,
                return_quant_tensor=False,
            )
            for i in range(num_up + 1)
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(num_up + 1))
        self.relus = nn.ModuleList(
            QuantReLU(
                act_quant=Uint8ActPerTensorFloat,
                bit_width=spec.act_bits,
                return_quant_tensor=False,
            )
            for _ in range(num_up + 1)
        )
        self.conv_seg = QuantConv2d(
            channels,
            num_classes,
            1,
            bias=True,  # float bias: qonnx's ExtractBiasFromConv fails on a quantized one
            weight_quant=Int8WeightPerTensorFloat,
            weight_bit_width=b,
            return_quant_tensor=False,
        )
        self.out_quant = _act(spec)

    @property
    def out_hw(self) -> tuple[int, int]:
        """(H, W) of the output: the grid x 2^(num_up+1) x ``extra``."""
        up = 2 ** (self.num_up + 1)
        return (self.grid[0] * up * self.extra[0], self.grid[1] * up * self.extra[1])

    @torch.no_grad()
    def load_float(self, head: nn.Module) -> None:
        """Copy a float ``PUPHead``'s LayerNorm, conv, BN and conv_seg weights in."""
        self.norm.weight.copy_(head.norm.weight)
        self.norm.bias.copy_(head.norm.bias)
        self.norm.eps = head.norm.eps
        for module, conv, bn in zip(head.convs, self.convs, self.bns):
            conv.weight.copy_(module.conv.weight)
            if conv.bias is not None:
                conv.bias.copy_(module.conv.bias)
            fbn = module.bn
            bn.load_state_dict(fbn.state_dict())
            bn.eps = fbn.eps
        self.conv_seg.weight.copy_(head.conv_seg.weight)
        self.conv_seg.bias.copy_(head.conv_seg.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (1, 1+h*w, D) -> (1, H, W, C)."""
        h, w = self.grid
        x = torch.index_select(tokens, 1, self.patch_index)  # drop CLS (Gather -> Crop)
        x = self.norm_quant(self.norm(x))
        x = x.reshape(1, h, w, self.dim).permute(0, 3, 1, 2)
        for i in range(self.num_up + 1):
            x = self.relus[i](self.bns[i](self.convs[i](x)))
            if i < self.num_up:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = F.interpolate(self.out_quant(self.conv_seg(x)), scale_factor=2.0, mode="nearest")
        if self.extra != (1, 1):
            x = F.interpolate(x, scale_factor=tuple(float(f) for f in self.extra), mode="nearest")
        return x.permute(0, 2, 3, 1)


class QuantTaskModel(nn.Module):
    """Backbone pathway + task head: patches (1, T, C*p*p) -> logits (1, H, W, C)."""

    def __init__(self, pathway: QuantM3ViTPathway, head: QuantPUPHead) -> None:
        super().__init__()
        self.pathway, self.head = pathway, head

    def forward(self, patches: Tensor) -> Tensor:
        """patches (1, T, C*p*p) -> (1, H, W, C)."""
        return self.head(self.pathway(patches))


def build_quant_task_model(
    backbone: nn.Module, head: nn.Module, task: str, spec: QuantSpec, size: tuple[int, int]
) -> QuantTaskModel:
    """The Brevitas mirror of ``task``'s pathway (float weights copied in, not calibrated).

    Args:
        backbone: the float ``M3ViT``; head: the task's float ``PUPHead``.
        size: (H, W) of the FPGA input frame, multiples of the patch size.

    The head ends with a nearest-neighbour resize to ``size`` when that is an integer
    multiple of its native output (grid x 2^(num_up+1)); otherwise its output stays
    native (the host resizes it; :attr:`QuantPUPHead.out_hw` says which).

    Raises:
        ValueError: ``size`` is not a multiple of the patch size, or the task is refused
            by :func:`load_backbone`.
    """
    p = backbone.patch_size
    if size[0] % p or size[1] % p:
        raise ValueError(f"FPGA input size {tuple(size)} is not a multiple of the patch {p}")
    grid = (size[0] // p, size[1] // p)
    dims = pathway_dims(backbone, grid)
    qpath = QuantM3ViTPathway(dims, spec)
    load_backbone(qpath, backbone, task)
    up = 2 ** (head.num_up + 1)
    extra = (size[0] // (grid[0] * up), size[1] // (grid[1] * up))
    if (extra[0] * grid[0] * up, extra[1] * grid[1] * up) != tuple(size):
        extra = (1, 1)  # the head's native output; the host resizes it
    conv_bias = head.convs[0].conv.bias is not None
    qhead = QuantPUPHead(
        grid, dims.dim, head.channels, head.num_up, head.num_classes, spec,
        conv_bias=conv_bias, extra=extra,
    )  # fmt: skip
    qhead.load_float(head)
    return QuantTaskModel(qpath, qhead)
